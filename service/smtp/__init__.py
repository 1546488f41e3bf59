"""SMTP delivery over aiosmtplib: sessions, TLS policy, error classification.

Public API::

    SMTPServer(host, port, security, username=None, password=None, allow_insecure_auth=False,
               ca_file=None, connect_address=None, local_hostname=None, timeouts=SMTPTimeouts())
    async with SMTPSession(server) as session:
        result: SendResult = await session.send(mail_from, recipients, data, smtputf8=False)
    await verify(server, envelope=(mail_from, rcpt), timeout_s=30) -> list[VerifyStep]

Errors: :class:`SMTPDeliveryError` and subclasses (see ``service.smtp.errors``).
"""

from service.smtp.config import DEFAULT_TIMEOUTS, SMTPServer, SMTPTimeouts
from service.smtp.errors import (
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPDeliveryError,
    SMTPErrorCode,
    SMTPExtensionMissing,
    SMTPProtocolError,
    SMTPReplyError,
    SMTPSecurityError,
    SMTPStage,
    SMTPTimedOut,
    reply_is_transient,
)
from service.smtp.session import (
    RcptStatus,
    RecipientOutcome,
    SendResult,
    SMTPSession,
    prepare_data,
)
from service.smtp.verify import VerifyStep, VerifyStepName, verify

__all__ = [
    "DEFAULT_TIMEOUTS",
    "RcptStatus",
    "RecipientOutcome",
    "SMTPAllRecipientsRefused",
    "SMTPAuthError",
    "SMTPConnectionFailed",
    "SMTPDeliveryError",
    "SMTPErrorCode",
    "SMTPExtensionMissing",
    "SMTPProtocolError",
    "SMTPReplyError",
    "SMTPSecurityError",
    "SMTPServer",
    "SMTPSession",
    "SMTPStage",
    "SMTPTimedOut",
    "SMTPTimeouts",
    "SendResult",
    "VerifyStep",
    "VerifyStepName",
    "prepare_data",
    "reply_is_transient",
    "verify",
]

"""Errors of the SMTP sender, each with a stable ``code`` and a retry verdict.

Hierarchy::

    SMTPDeliveryError               base: code, detail, stage, transient, smtp_code, smtp_message
    ├── SMTPConnectionFailed        also ConnectionError    connect_failed, connection_lost
    ├── SMTPTimedOut                also TimeoutError       timeout
    ├── SMTPSecurityError           account-level           tls_required, tls_certificate_invalid,
    │                                                       tls_failed, insecure_auth_refused
    ├── SMTPAuthError               account-level           auth_failed, auth_not_supported
    ├── SMTPReplyError              4xx/5xx to a command    deferred (4xx), rejected (5xx)
    │   └── SMTPAllRecipientsRefused    no RCPT accepted; ``recipients`` has every outcome
    ├── SMTPProtocolError           garbled/unexpected      protocol_error
    └── SMTPExtensionMissing        no SMTPUTF8/8BITMIME    extension_not_supported

Retry verdict (``transient``): 4xx replies, network errors, drops (including a 421 that
closes the session) and timeouts are transient; 5xx replies are permanent. Security and
authentication failures are *account-level* (``account_level``): they say nothing about
the message, everything about the account's settings or the server, so a worker should stop
using the account until it is changed rather than burn through the retry schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.smtp.session import RecipientOutcome


class SMTPErrorCode(StrEnum):
    """Stable machine-readable failure reasons (documented in the OpenAPI spec)."""

    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    TLS_REQUIRED = "tls_required"
    TLS_CERTIFICATE_INVALID = "tls_certificate_invalid"
    TLS_FAILED = "tls_failed"
    AUTH_FAILED = "auth_failed"
    AUTH_NOT_SUPPORTED = "auth_not_supported"
    INSECURE_AUTH_REFUSED = "insecure_auth_refused"
    CONNECTION_LOST = "connection_lost"
    REJECTED = "rejected"
    DEFERRED = "deferred"
    PROTOCOL_ERROR = "protocol_error"
    EXTENSION_NOT_SUPPORTED = "extension_not_supported"


class SMTPStage(StrEnum):
    """Where in the SMTP dialogue a failure happened."""

    CONNECT = "connect"  # TCP connection
    TLS = "tls"  # implicit TLS handshake
    GREETING = "greeting"  # the server's 220 banner
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command, before any of the message is sent
    MESSAGE = "message"  # sending the message and waiting for the reply to the final dot
    RSET = "rset"
    NOOP = "noop"


def reply_is_transient(smtp_code: int) -> bool:
    """RFC 5321 section 4.2.1: 4yz is a transient negative reply, everything else is not."""
    return 400 <= smtp_code < 500


class SMTPDeliveryError(Exception):
    """Base of every failure of the SMTP sender."""

    account_level: bool = False
    default_transient: bool = True

    def __init__(
        self,
        code: SMTPErrorCode,
        detail: str,
        *,
        stage: SMTPStage,
        smtp_code: int | None = None,
        smtp_message: str | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.stage = stage
        self.smtp_code = smtp_code
        self.smtp_message = smtp_message
        if transient is None:
            transient = (
                reply_is_transient(smtp_code) if smtp_code is not None else self.default_transient
            )
        self.transient = transient

    def __str__(self) -> str:
        reply = ""
        if self.smtp_code is not None:
            text = f" {self.smtp_message}" if self.smtp_message else ""
            reply = f" ({self.smtp_code}{text})"
        return f"{self.code} at {self.stage}: {self.detail}{reply}"


class SMTPConnectionFailed(SMTPDeliveryError, ConnectionError):
    """Could not connect, or the connection dropped (``connect_failed``, ``connection_lost``)."""


class SMTPTimedOut(SMTPDeliveryError, TimeoutError):
    """The server did not answer within the stage's timeout (``timeout``)."""


class SMTPSecurityError(SMTPDeliveryError):
    """TLS could not be established as the account requires, or AUTH would go in clear."""

    account_level = True
    default_transient = False


class SMTPAuthError(SMTPDeliveryError):
    """The server refused the credentials or offers no usable AUTH mechanism."""

    account_level = True
    default_transient = False


class SMTPReplyError(SMTPDeliveryError):
    """The server answered a mail transaction command with 4xx (deferred) or 5xx (rejected).

    ``recipients`` holds the RCPT outcomes known when the transaction failed (empty before
    RCPT); a failure at DATA applies to every recipient that was accepted.
    """

    def __init__(
        self,
        code: SMTPErrorCode,
        detail: str,
        *,
        stage: SMTPStage,
        smtp_code: int | None = None,
        smtp_message: str | None = None,
        transient: bool | None = None,
        recipients: Sequence[RecipientOutcome] = (),
    ) -> None:
        super().__init__(
            code,
            detail,
            stage=stage,
            smtp_code=smtp_code,
            smtp_message=smtp_message,
            transient=transient,
        )
        self.recipients: tuple[RecipientOutcome, ...] = tuple(recipients)


class SMTPAllRecipientsRefused(SMTPReplyError):
    """Every RCPT was refused: nothing was sent. ``transient`` if any refusal was 4xx."""


class SMTPProtocolError(SMTPDeliveryError):
    """The server's reply was malformed or made no sense at this point (``protocol_error``)."""


class SMTPExtensionMissing(SMTPDeliveryError):
    """The message needs an extension (SMTPUTF8, 8BITMIME) the server does not offer."""

    default_transient = False

"""Errors of the SMTP sender, each with a stable ``code`` and a retry verdict.

Hierarchy::

    SMTPDeliveryError               base: code, detail, stage, transient, smtp_code, smtp_message
    ├── SMTPConnectionFailed        also ConnectionError    connect_failed, connection_lost
    ├── SMTPTimedOut                also TimeoutError       timeout
    ├── SMTPSecurityError           account-level           tls_required, tls_certificate_invalid,
    │                                                       tls_failed, insecure_auth_refused
    ├── SMTPAuthError               account-level           auth_failed, auth_not_supported
    ├── SMTPReplyError              4xx/5xx to a command    deferred (4xx), rejected (5xx;
    │                                                       account-level at EHLO/HELO)
    │   └── SMTPAllRecipientsRefused    no RCPT accepted; ``recipients`` has every outcome
    ├── SMTPProtocolError           garbled/unexpected      protocol_error
    └── SMTPExtensionMissing        no SMTPUTF8/8BITMIME    smtputf8_not_supported,
                                                            extension_not_supported

Retry verdict (``transient``): 4xx replies, network errors, drops (including a 421 that
closes the session) and timeouts are transient; 5xx replies are permanent. Security and
authentication failures are *account-level* (``account_level``): they say nothing about
the message, everything about the account's settings or the server, so a worker should stop
using the account until it is changed rather than burn through the retry schedule. So is a
5xx to EHLO and HELO: the server refuses to talk to this client at all.

Every code is a member of the one catalogue, :class:`service.codes.ErrorCode`. ``str(error)``
is the text for callers: what the server answered to which step (``the SMTP server answered
535 5.7.8 Authentication failed to AUTH``), never the code again.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

from service.codes import ErrorCode

if TYPE_CHECKING:
    from service.smtp.session import RecipientOutcome


# The codes come from the one catalogue (``service.codes``): SMTP failures share their codes
# with POP3 wherever the cause is the same. Kept under this name for existing imports.
SMTPErrorCode = ErrorCode


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


# How texts for callers name each stage ("the SMTP server answered 535 ... to AUTH").
_STAGE_WORDS = {
    SMTPStage.CONNECT: "the connection",
    SMTPStage.TLS: "the TLS handshake",
    SMTPStage.GREETING: "its greeting",
    SMTPStage.EHLO: "EHLO",
    SMTPStage.STARTTLS: "STARTTLS",
    SMTPStage.AUTH: "AUTH",
    SMTPStage.MAIL: "MAIL FROM",
    SMTPStage.RCPT: "RCPT TO",
    SMTPStage.DATA: "DATA",
    SMTPStage.MESSAGE: "the end of the message data",
    SMTPStage.RSET: "RSET",
    SMTPStage.NOOP: "NOOP",
}
MAX_REPLY_TEXT = 500  # characters of a server reply quoted in a text (all of it is kept apart)


def stage_words(stage: SMTPStage) -> str:
    """How a text for callers names ``stage``: a command, or a step of the session."""
    return _STAGE_WORDS[stage]


def reply_text(smtp_code: int, smtp_message: str | None) -> str:
    """A server reply on one line, e.g. ``535 5.7.8 Authentication failed``."""
    text = " ".join((smtp_message or "").split())
    if len(text) > MAX_REPLY_TEXT:
        text = text[:MAX_REPLY_TEXT] + "..."
    return f"{smtp_code} {text}".rstrip()


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
        account_level: bool | None = None,
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
        if account_level is not None:
            self.account_level = account_level

    def __str__(self) -> str:
        """The text for callers: what the server did at which step, never the code
        (callers have it apart); the server's own reply is quoted when there is one."""
        if self.smtp_code is None:
            return self.detail
        reply = reply_text(self.smtp_code, self.smtp_message)
        if self.stage is SMTPStage.GREETING:
            return f"the SMTP server greeted with {reply}"
        return f"the SMTP server answered {reply} to {stage_words(self.stage)}"


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
        account_level: bool | None = None,
        recipients: Sequence[RecipientOutcome] = (),
    ) -> None:
        super().__init__(
            code,
            detail,
            stage=stage,
            smtp_code=smtp_code,
            smtp_message=smtp_message,
            transient=transient,
            account_level=account_level,
        )
        self.recipients: tuple[RecipientOutcome, ...] = tuple(recipients)


class SMTPAllRecipientsRefused(SMTPReplyError):
    """Every RCPT was refused: nothing was sent. ``transient`` if any refusal was 4xx."""

    def __str__(self) -> str:
        if self.smtp_code is None:
            return self.detail
        count = len(self.recipients)
        every = {0: "every recipient", 1: "the only recipient"}.get(
            count, f"all {count} recipients"
        )
        return (
            f"the SMTP server refused {every}; its last answer to RCPT TO was"
            f" {reply_text(self.smtp_code, self.smtp_message)}"
        )


class SMTPProtocolError(SMTPDeliveryError):
    """The server's reply was malformed or made no sense at this point (``protocol_error``)."""


class SMTPExtensionMissing(SMTPDeliveryError):
    """The message needs an extension (SMTPUTF8, 8BITMIME) the server does not offer."""

    default_transient = False

"""Errors of the POP3 package, each with a stable machine-readable ``code``.

Hierarchy (``code`` in brackets)::

    POP3Error                               base of everything raised here    [protocol_error]
    ├── POP3ConnectError (ConnectionError)  TCP connect failed, -ERR greeting [connect_failed]
    │   └── TLSHandshakeError               TLS failed for a non-certificate reason, often a
    │                                       TLS mode that does not fit the port   [tls_failed]
    ├── POP3TimeoutError (TimeoutError)     a network step outlived ``timeout``       [timeout]
    │   ├── SessionDeadlineExceeded         the whole session outlived its deadline [timeout]
    │   └── TransferTooSlow                 the server sent less than the minimum rate
    │                                                                               [timeout]
    ├── POP3ConnectionLost (ConnectionError) the server closed or reset mid-exchange
    │                                                                         [connection_lost]
    ├── TLSRequired                         TLS was asked for but STLS is not offered or
    │                                       refused; no credential was sent   [tls_required]
    ├── TLSCertificateInvalid               untrusted, expired or wrong-host certificate
    │                                                                 [tls_certificate_invalid]
    ├── InvalidArgument (ValueError)        a command argument was refused before anything
    │                                       was written (CR, LF, NUL...)  [invalid_argument]
    ├── LocalProtocolError                  the caller broke the protocol (wrong state,
    │                                       pipelining not offered, unusable connection)
    │                                                                        [protocol_error]
    ├── RemoteProtocolError                 the server broke the protocol    [protocol_error]
    │   ├── LineTooLong                     a status line longer than ``max_line``
    │   │                                                                     [line_too_long]
    │   └── ResponseTooLarge                a listing (CAPA/LIST/UIDL) over ``max_response``
    │                                                                [response_too_large]
    ├── MessageTooLarge                     RETR/TOP over the cap or its LIST size plus slack
    │                                                                  [message_too_large]
    └── CommandRejected                     the server answered ``-ERR``   [command_rejected]
        ├── AuthFailed                      ``-ERR`` to USER, PASS or AUTH     [auth_failed]
        │   ├── PlaintextLoginRefused       the login was refused because the connection is
        │   │                               not encrypted                    [tls_required]
        │   └── MailboxLocked               ``-ERR [IN-USE]``: another session holds the
        │                                   mailbox (temporary)            [mailbox_locked]
        └── UpdateFailed                    ``-ERR`` to QUIT: deletions may not have been
                                            applied                         [update_failed]

As in h11, a *local* protocol error means this side tried something the protocol (or the
server's advertised capabilities) forbids, and a *remote* one means the server sent
something no conforming server sends. After any error except :class:`CommandRejected`,
:class:`InvalidArgument` and a :class:`MessageTooLarge` with ``abandoned=False`` the
connection is unusable: it has been closed without QUIT, so nothing was deleted.
"""

from __future__ import annotations

import re

from service.codes import ErrorCode


class POP3Error(Exception):
    """Base of every POP3 error; ``code`` is stable, ``detail`` is for humans."""

    code: str = "protocol_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class POP3ConnectError(POP3Error, ConnectionError):
    """The connection could not be set up (refused, unreachable, ``-ERR`` greeting)."""

    code = ErrorCode.CONNECT_FAILED


class TLSHandshakeError(POP3ConnectError):
    """The TLS handshake failed for a reason other than the certificate.

    Most often the TLS mode does not fit the port (implicit TLS against a plain POP3 port):
    the same code as SMTP's.
    """

    code = ErrorCode.TLS_FAILED


class POP3TimeoutError(POP3Error, TimeoutError):
    """Connecting, the TLS handshake, a write or a wait for data took longer than allowed."""

    code = ErrorCode.TIMEOUT


class SessionDeadlineExceeded(POP3TimeoutError):
    """The whole session (every step together) outlived the client's ``session_timeout``."""


class TransferTooSlow(POP3TimeoutError):
    """While a reply was due, the server sent less than ``min_rate`` bytes per second
    over a whole ``rate_window``."""


class POP3ConnectionLost(POP3Error, ConnectionError):
    """The server closed or reset the connection while a reply was still due."""

    code = ErrorCode.CONNECTION_LOST


class TLSRequired(POP3Error):
    """TLS was required but the server does not offer STLS or refused it.

    Raised before any credential is written.
    """

    code = ErrorCode.TLS_REQUIRED


class TLSCertificateInvalid(POP3Error):
    """The server's certificate did not verify (untrusted, expired, wrong host)."""

    code = ErrorCode.TLS_CERTIFICATE_INVALID


class InvalidArgument(POP3Error, ValueError):
    """A command argument was refused before anything was written to the server."""

    code = ErrorCode.INVALID_ARGUMENT


class LocalProtocolError(POP3Error):
    """The caller asked for something the protocol or the connection's state forbids."""

    code = ErrorCode.PROTOCOL_ERROR


class RemoteProtocolError(POP3Error):
    """The server sent something a conforming POP3 server never sends."""

    code = ErrorCode.PROTOCOL_ERROR


class LineTooLong(RemoteProtocolError):
    """A status line grew past the configured ``max_line`` without ending."""

    code = ErrorCode.LINE_TOO_LONG

    def __init__(self, detail: str, *, limit: int) -> None:
        super().__init__(detail)
        self.limit = limit


class ResponseTooLarge(RemoteProtocolError):
    """A multi-line listing (CAPA, LIST, UIDL) grew past ``max_response`` bytes."""

    code = ErrorCode.RESPONSE_TOO_LARGE

    def __init__(self, detail: str, *, limit: int) -> None:
        super().__init__(detail)
        self.limit = limit


class MessageTooLarge(POP3Error):
    """A message (RETR or TOP) is larger than allowed.

    ``limit`` is the byte limit that applied: the caller's cap, or the size the server
    announced in LIST plus slack, whichever is lower. ``listed_size`` is the LIST size if
    known. ``abandoned`` tells what happened to the connection: ``False`` means the
    message was refused before RETR was sent (its LIST size already exceeds the cap) and
    the connection is still usable; ``True`` means the transfer was abandoned midway and
    the connection has been closed without QUIT, so nothing was deleted in this session.
    """

    code = ErrorCode.MESSAGE_TOO_LARGE

    def __init__(
        self,
        detail: str,
        *,
        number: int,
        limit: int,
        listed_size: int | None = None,
        abandoned: bool,
    ) -> None:
        super().__init__(detail)
        self.number = number
        self.limit = limit
        self.listed_size = listed_size
        self.abandoned = abandoned


class CommandRejected(POP3Error):
    """The server answered ``-ERR``; the connection stays usable.

    ``command`` is the verb (``"RETR"``), ``text`` the server's explanation with control
    characters replaced, ``response_code`` the RFC 2449/3206 code in brackets if any
    (``"IN-USE"``, ``"LOGIN-DELAY"``, ``"SYS/TEMP"``, ``"SYS/PERM"``, ``"AUTH"``).
    """

    code = ErrorCode.COMMAND_REJECTED

    #: Response codes that mean "try again later" rather than "this will never work".
    TEMPORARY_CODES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP"})

    def __init__(
        self, detail: str, *, command: str, text: str, response_code: str | None = None
    ) -> None:
        super().__init__(detail)
        self.command = command
        self.text = text
        self.response_code = response_code

    @property
    def temporary(self) -> bool:
        """Whether the server said the failure is temporary (RFC 2449, RFC 3206)."""
        return self.response_code in self.TEMPORARY_CODES


class AuthFailed(CommandRejected):
    """The server refused the credentials (or the mailbox is locked: see ``temporary``)."""

    code = ErrorCode.AUTH_FAILED


class AuthNotSupported(POP3Error):
    """The server offers no SASL mechanism for the credentials held (OAuth2); nothing
    was sent."""

    code = ErrorCode.AUTH_NOT_SUPPORTED


class PlaintextLoginRefused(AuthFailed):
    """The server refuses logins on an unencrypted connection (Dovecot:
    ``-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.``).

    The account needs ``security`` set to ``starttls`` or ``tls``; the server's text says so.
    """

    code = ErrorCode.TLS_REQUIRED


class MailboxLocked(AuthFailed):
    """``-ERR [IN-USE]``: another session holds the mailbox. Temporary: try again later."""

    code = ErrorCode.MAILBOX_LOCKED

    @property
    def temporary(self) -> bool:
        return True


class UpdateFailed(CommandRejected):
    """``-ERR`` to QUIT: the server could not apply this session's deletions."""

    code = ErrorCode.UPDATE_FAILED


# Texts of login refusals that mean "not without TLS": Dovecot's "Plaintext authentication
# disallowed on non-secure (SSL/TLS) connections", other servers' "TLS required",
# "use STLS first", "cleartext logins disabled"...
_NEEDS_TLS = re.compile(
    r"(plain ?text|clear ?text).{0,40}(disallowed|not allowed|denied|refused|disabled|forbidden)"
    r"|(ssl|tls|stls|starttls|encryption|encrypted|secure).{0,20}(required|needed|first|only)"
    r"|(requires?|must use|use|needs?) (ssl|tls|stls|starttls|encryption|a secure)",
    re.IGNORECASE,
)
_LOCKED = re.compile(
    r"(mailbox|maildrop|mail drop).{0,30}(lock|in use|busy)|\block(ed)?\b.{0,30}(mailbox|maildrop)"
    r"|\bin use\b",
    re.IGNORECASE,
)


def login_refusal(response_code: str | None, text: str, *, encrypted: bool) -> type[AuthFailed]:
    """The error class for ``-ERR`` to USER, PASS or AUTH, from the server's code and text.

    ``[IN-USE]`` (or a text saying the mailbox is locked) is :class:`MailboxLocked`; on an
    unencrypted connection, a refusal saying TLS is needed is :class:`PlaintextLoginRefused`.
    """
    if response_code == "IN-USE" or (response_code is None and _LOCKED.search(text)):
        return MailboxLocked
    if not encrypted and response_code in (None, "AUTH", "SYS/PERM") and _NEEDS_TLS.search(text):
        return PlaintextLoginRefused
    return AuthFailed

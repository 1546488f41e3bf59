"""Errors of the POP3 package, each with a stable machine-readable ``code``.

Hierarchy (``code`` in brackets)::

    POP3Error                               base of everything raised here    [pop3_error]
    ├── POP3ConnectError (ConnectionError)  TCP connect failed, -ERR greeting [connect_failed]
    │   └── TLSHandshakeError               TLS failed for a non-certificate reason
    ├── POP3TimeoutError (TimeoutError)     a network step outlived ``timeout``       [timeout]
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
        └── UpdateFailed                    ``-ERR`` to QUIT: deletions may not have been
                                            applied                         [update_failed]

As in h11, a *local* protocol error means this side tried something the protocol (or the
server's advertised capabilities) forbids, and a *remote* one means the server sent
something no conforming server sends. After any error except :class:`CommandRejected`,
:class:`InvalidArgument` and a :class:`MessageTooLarge` with ``abandoned=False`` the
connection is unusable: it has been closed without QUIT, so nothing was deleted.
"""

from __future__ import annotations


class POP3Error(Exception):
    """Base of every POP3 error; ``code`` is stable, ``detail`` is for humans."""

    code: str = "pop3_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class POP3ConnectError(POP3Error, ConnectionError):
    """The connection could not be set up (refused, unreachable, ``-ERR`` greeting)."""

    code = "connect_failed"


class TLSHandshakeError(POP3ConnectError):
    """The TLS handshake failed for a reason other than the certificate."""


class POP3TimeoutError(POP3Error, TimeoutError):
    """Connecting, the TLS handshake, a write or a wait for data took longer than allowed."""

    code = "timeout"


class POP3ConnectionLost(POP3Error, ConnectionError):
    """The server closed or reset the connection while a reply was still due."""

    code = "connection_lost"


class TLSRequired(POP3Error):
    """TLS was required but the server does not offer STLS or refused it.

    Raised before any credential is written.
    """

    code = "tls_required"


class TLSCertificateInvalid(POP3Error):
    """The server's certificate did not verify (untrusted, expired, wrong host)."""

    code = "tls_certificate_invalid"


class InvalidArgument(POP3Error, ValueError):
    """A command argument was refused before anything was written to the server."""

    code = "invalid_argument"


class LocalProtocolError(POP3Error):
    """The caller asked for something the protocol or the connection's state forbids."""

    code = "protocol_error"


class RemoteProtocolError(POP3Error):
    """The server sent something a conforming POP3 server never sends."""

    code = "protocol_error"


class LineTooLong(RemoteProtocolError):
    """A status line grew past the configured ``max_line`` without ending."""

    code = "line_too_long"

    def __init__(self, detail: str, *, limit: int) -> None:
        super().__init__(detail)
        self.limit = limit


class ResponseTooLarge(RemoteProtocolError):
    """A multi-line listing (CAPA, LIST, UIDL) grew past ``max_response`` bytes."""

    code = "response_too_large"

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

    code = "message_too_large"

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

    code = "command_rejected"

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

    code = "auth_failed"


class UpdateFailed(CommandRejected):
    """``-ERR`` to QUIT: the server could not apply this session's deletions."""

    code = "update_failed"

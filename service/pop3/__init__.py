"""POP3 retrieval: a sans-IO protocol core and an asyncio client.

- :mod:`service.pop3.connection`: :class:`POP3Connection`, bytes in, events out (no I/O);
- :mod:`service.pop3.client`: :class:`POP3Client`, the asyncio adapter the services use;
- :mod:`service.pop3.errors`: the error tree, each error with a stable ``code``.
"""

from .client import AuthMechanism, POP3Client
from .commands import Command, Verb
from .connection import POP3Connection, State
from .errors import (
    AuthFailed,
    CommandRejected,
    InvalidArgument,
    LineTooLong,
    LocalProtocolError,
    MailboxLocked,
    MessageTooLarge,
    PlaintextLoginRefused,
    POP3ConnectError,
    POP3ConnectionLost,
    POP3Error,
    POP3TimeoutError,
    RemoteProtocolError,
    ResponseTooLarge,
    SessionDeadlineExceeded,
    TLSCertificateInvalid,
    TLSHandshakeError,
    TLSRequired,
    TransferTooSlow,
    UpdateFailed,
)
from .replies import Capabilities, MailboxStatus

__all__ = [
    "AuthFailed",
    "AuthMechanism",
    "Capabilities",
    "Command",
    "CommandRejected",
    "InvalidArgument",
    "LineTooLong",
    "LocalProtocolError",
    "MailboxLocked",
    "MailboxStatus",
    "MessageTooLarge",
    "POP3Client",
    "POP3ConnectError",
    "POP3Connection",
    "POP3ConnectionLost",
    "POP3Error",
    "POP3TimeoutError",
    "PlaintextLoginRefused",
    "RemoteProtocolError",
    "ResponseTooLarge",
    "SessionDeadlineExceeded",
    "State",
    "TLSCertificateInvalid",
    "TLSHandshakeError",
    "TLSRequired",
    "TransferTooSlow",
    "UpdateFailed",
    "Verb",
]

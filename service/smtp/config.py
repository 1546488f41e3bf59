"""How to reach one SMTP server: address, security policy, credentials, timeouts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields

from service.domain.enums import Security

# RFC 5321 section 4.5.3.2: minimum time a client waits for each reply. They are generous
# on purpose: giving up on a slow server that then delivers means sending the message twice.
GREETING_TIMEOUT = 5 * 60.0  # 4.5.3.2.1 initial 220 message
MAIL_TIMEOUT = 5 * 60.0  # 4.5.3.2.2 MAIL command
RCPT_TIMEOUT = 5 * 60.0  # 4.5.3.2.3 RCPT command
DATA_INITIATION_TIMEOUT = 2 * 60.0  # 4.5.3.2.4 DATA command (the 354 reply)
DATA_BLOCK_TIMEOUT = 3 * 60.0  # 4.5.3.2.5 sending each block of the message
DATA_TERMINATION_TIMEOUT = 10 * 60.0  # 4.5.3.2.6 reply to the final "."
# Not fixed by RFC 5321; EHLO, STARTTLS, AUTH, RSET and NOOP get the MAIL figure.
COMMAND_TIMEOUT = 5 * 60.0
# Establishing the TCP connection (SYN to SYN-ACK); the RFC's figures start after it.
CONNECT_TIMEOUT = 30.0
# QUIT is a courtesy: the transaction is already complete, so do not wait long for it.
QUIT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class SMTPTimeouts:
    """Per-stage timeouts in seconds; defaults follow RFC 5321. Tests shrink them."""

    connect: float = CONNECT_TIMEOUT
    greeting: float = GREETING_TIMEOUT  # also bounds an implicit TLS handshake
    command: float = COMMAND_TIMEOUT  # EHLO, STARTTLS (and its handshake), AUTH, RSET, NOOP
    mail: float = MAIL_TIMEOUT
    rcpt: float = RCPT_TIMEOUT
    data_initiation: float = DATA_INITIATION_TIMEOUT
    data_block: float = DATA_BLOCK_TIMEOUT
    data_termination: float = DATA_TERMINATION_TIMEOUT
    quit: float = QUIT_TIMEOUT

    def __post_init__(self) -> None:
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise ValueError(f"timeout {item.name} must be positive")


DEFAULT_TIMEOUTS = SMTPTimeouts()


@dataclass(frozen=True, slots=True)
class SMTPServer:
    """One SMTP submission server and the policy for talking to it.

    ``security``:
      - ``tls``: implicit TLS from the first byte (port 465).
      - ``starttls``: plain connection upgraded with STARTTLS, which is *required*: a server
        that does not offer it fails with ``tls_required`` before any AUTH is sent.
      - ``none``: plain text throughout; a password is only sent if
        ``allow_insecure_auth`` is set, otherwise ``insecure_auth_refused``.

    Certificates are always verified against the system CAs plus ``ca_file``, and the
    name checked is ``host``, also when ``connect_address`` (an IP literal, already
    resolved and vetted by an SSRF guard) is the address actually dialled.
    ``local_hostname`` is the EHLO name (default: this machine's FQDN).
    """

    host: str
    port: int
    security: Security
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    allow_insecure_auth: bool = False
    ca_file: str | None = None
    connect_address: str | None = None
    local_hostname: str | None = None
    timeouts: SMTPTimeouts = DEFAULT_TIMEOUTS
    # ``password`` is an OAuth2 access token: AUTH with OAUTHBEARER or XOAUTH2 only.
    oauth2: bool = False

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() or not c.isprintable() for c in self.host):
            raise ValueError("host must be a non-empty name without whitespace or controls")
        if not 0 < self.port < 65536:
            raise ValueError("port must be between 1 and 65535")
        if not isinstance(self.security, Security):
            raise ValueError("security must be a Security member")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.local_hostname is not None and (
            not self.local_hostname
            or any(c.isspace() or not c.isprintable() for c in self.local_hostname)
        ):
            raise ValueError("local_hostname must be a name without whitespace or controls")
        if self.connect_address is not None:
            # Only a literal: resolving here would undo the SSRF guard's decision.
            ipaddress.ip_address(self.connect_address)

    @property
    def has_credentials(self) -> bool:
        """Whether the session authenticates."""
        return self.username is not None

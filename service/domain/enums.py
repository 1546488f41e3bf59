"""States and modes as Enums (never bare strings)."""

from __future__ import annotations

from enum import StrEnum


class Security(StrEnum):
    """How a POP3/SMTP connection is protected."""

    TLS = "tls"  # implicit TLS from the first byte (POP3 995, SMTP 465)
    STARTTLS = "starttls"  # plain connect, then STLS/STARTTLS, which is required
    NONE = "none"  # plain text

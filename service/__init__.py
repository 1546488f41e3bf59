"""Mailroom: mail accounts as a REST microservice (POP3 in, SMTP out)."""

__version__ = "0.1.0"

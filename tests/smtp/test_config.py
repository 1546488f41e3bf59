"""SMTPServer/SMTPTimeouts validation and the error hierarchy's contract."""

from __future__ import annotations

from typing import Any

import pytest

from service.codes import ErrorCode
from service.domain.enums import Security
from service.smtp import (
    DEFAULT_TIMEOUTS,
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPDeliveryError,
    SMTPErrorCode,
    SMTPReplyError,
    SMTPSecurityError,
    SMTPServer,
    SMTPStage,
    SMTPTimedOut,
    SMTPTimeouts,
)

E = SMTPErrorCode


def test_default_timeouts_follow_rfc_5321() -> None:
    assert DEFAULT_TIMEOUTS.greeting == 300
    assert DEFAULT_TIMEOUTS.mail == 300
    assert DEFAULT_TIMEOUTS.rcpt == 300
    assert DEFAULT_TIMEOUTS.data_initiation == 120
    assert DEFAULT_TIMEOUTS.data_block == 180
    assert DEFAULT_TIMEOUTS.data_termination == 600


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rcpt"):
        SMTPTimeouts(rcpt=0)


def test_the_password_never_appears_in_a_repr() -> None:
    server = SMTPServer("smtp.example.com", 587, Security.STARTTLS, "alice", "s3cret-value")
    assert "s3cret-value" not in repr(server)
    assert server.has_credentials


@pytest.mark.parametrize(
    "changes",
    [
        {"host": ""},
        {"host": "smtp.example.com\r\nX"},
        {"host": "smtp example.com"},
        {"port": 0},
        {"port": 65536},
        {"security": "starttls"},
        {"username": "alice"},
        {"password": "secret"},
        {"connect_address": "smtp.example.com"},  # a literal only: resolving is not ours
        {"local_hostname": "client example"},
        {"local_hostname": ""},
    ],
)
def test_invalid_server_settings_are_refused(changes: dict[str, Any]) -> None:
    settings: dict[str, Any] = {
        "host": "smtp.example.com",
        "port": 587,
        "security": Security.STARTTLS,
    }
    settings.update(changes)
    with pytest.raises(ValueError):
        SMTPServer(**settings)


def test_connect_address_accepts_ipv4_and_ipv6_literals() -> None:
    for literal in ("192.0.2.10", "2001:db8::25"):
        assert SMTPServer("smtp.example.com", 465, Security.TLS, connect_address=literal)


def test_error_hierarchy_and_verdicts() -> None:
    dropped = SMTPConnectionFailed(E.CONNECTION_LOST, "gone", stage=SMTPStage.RCPT)
    assert isinstance(dropped, ConnectionError) and isinstance(dropped, SMTPDeliveryError)
    assert dropped.transient and not dropped.account_level

    slow = SMTPTimedOut(E.TIMEOUT, "slow", stage=SMTPStage.MESSAGE)
    assert isinstance(slow, TimeoutError) and slow.transient

    assert SMTPReplyError(E.DEFERRED, "x", stage=SMTPStage.MAIL, smtp_code=451).transient
    assert not SMTPReplyError(E.REJECTED, "x", stage=SMTPStage.MAIL, smtp_code=550).transient
    assert SMTPReplyError(E.DEFERRED, "x", stage=SMTPStage.RCPT, smtp_code=421).transient

    bad_login = SMTPAuthError(E.AUTH_FAILED, "no", stage=SMTPStage.AUTH, smtp_code=535)
    assert bad_login.account_level and not bad_login.transient
    busy_login = SMTPAuthError(E.AUTH_FAILED, "later", stage=SMTPStage.AUTH, smtp_code=454)
    assert busy_login.account_level and busy_login.transient

    stripped = SMTPSecurityError(E.TLS_REQUIRED, "no STARTTLS", stage=SMTPStage.STARTTLS)
    assert stripped.account_level and not stripped.transient

    refused = SMTPAllRecipientsRefused(E.REJECTED, "all", stage=SMTPStage.RCPT, smtp_code=550)
    assert isinstance(refused, SMTPReplyError) and refused.recipients == ()
    # Texts for callers speak of the server and the step, not of the code.
    assert (
        str(refused)
        == "the SMTP server refused every recipient; its last answer to RCPT TO was 550"
    )
    assert str(busy_login) == "the SMTP server answered 454 to AUTH"
    assert str(bad_login) == "the SMTP server answered 535 to AUTH"
    refused_login = SMTPAuthError(
        E.AUTH_FAILED,
        "the SMTP server refused the credentials",
        stage=SMTPStage.AUTH,
        smtp_code=535,
        smtp_message="5.7.8 Authentication\n credentials invalid",
    )
    assert str(refused_login) == (
        "the SMTP server answered 535 5.7.8 Authentication credentials invalid to AUTH"
    )
    assert str(stripped) == "no STARTTLS"  # no reply: the detail, as written
    greeting = SMTPReplyError(
        E.REJECTED, "x", stage=SMTPStage.GREETING, smtp_code=554, smtp_message="go away"
    )
    assert str(greeting) == "the SMTP server greeted with 554 go away"
    # A refused EHLO (after HELO too) is about the account, not the message.
    ehlo = SMTPReplyError(E.REJECTED, "x", stage=SMTPStage.EHLO, smtp_code=550, account_level=True)
    assert ehlo.account_level and not ehlo.transient
    # Every code is a member of the one catalogue.
    assert all(isinstance(code, ErrorCode) for code in E)

"""RFC 3464 delivery status notifications: real Postfix output and other MTAs' formats.

``data/postfix.eml`` is what Postfix (the suite's bouncing instance, tests/servers/postfix.py)
delivered for a message to two addresses its pipe transport refused; the others are written
after the RFC's examples and what sendmail, Exim and Gmail send, and RFC 6533's global form.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.bounces import smtp_code
from service.mail.dsn import DeliveryReport, may_be_dsn, parse_dsn

DATA = Path(__file__).parent / "data"
SAMPLES = ("postfix", "sendmail", "exim", "gmail", "global")


def load(name: str) -> bytes:
    return (DATA / f"{name}.eml").read_bytes()


def report(name: str) -> DeliveryReport:
    parsed = parse_dsn(load(name))
    assert parsed is not None
    return parsed


def test_postfix_report_per_recipient() -> None:
    dsn = report("postfix")
    assert dsn.reporting_mta == "mx.postfix.mailroom.test"
    assert dsn.original_envelope_id is None
    assert dsn.original_message_id == "<20261129.abc@postfix.mailroom.test>"
    assert [(r.final_recipient, r.action, r.status) for r in dsn.recipients] == [
        ("nobody@bounce.mailroom.test", "failed", "5.1.1"),
        ("Other.One@bounce.mailroom.test", "failed", "5.1.1"),
    ]
    first = dsn.recipients[0]
    assert first.original_recipient == "nobody@bounce.mailroom.test"
    # A folded Diagnostic-Code comes back as one line, with its type.
    assert first.diagnostic_code == (
        "x-unix; 550 5.1.1 <nobody@bounce.mailroom.test>: Recipient address rejected:"
        " no such user here"
    )
    assert first.remote_mta is None
    assert dsn.failed == dsn.recipients
    assert dsn.candidate_message_ids() == ["<20261129.abc@postfix.mailroom.test>"]


def test_sendmail_report_with_envelope_id_and_a_delayed_recipient() -> None:
    dsn = report("sendmail")
    # xtext: "+2B" is "+".
    assert dsn.original_envelope_id == "out_01jdsn0000000000000000000+1"
    assert dsn.original_message_id == "<199407022110.RAA14114@CS.UTK.EDU>"
    failed, delayed = dsn.recipients
    assert (failed.action, failed.status, failed.diagnostic_code) == (
        "failed",
        "4.0.0",
        "smtp; 426 connection timed out",
    )
    # "4.4.1 (no answer from host)": the code without its comment.
    assert (delayed.action, delayed.status, delayed.remote_mta) == (
        "delayed",
        "4.4.1",
        "relay.cs.utk.edu",
    )
    assert delayed.original_recipient is None
    assert delayed.addresses() == ["Kevin.Moore@cs.utk.edu"]
    assert dsn.failed == (failed,)


def test_exim_report_with_the_returned_message() -> None:
    dsn = report("exim")
    assert dsn.original_message_id == "<order-1234.confirmation@example.com>"
    [ghost] = dsn.recipients
    assert ghost.final_recipient == "ghost@example.net"
    assert ghost.remote_mta == "mx2.example.net"
    assert ghost.status == "5.1.1"
    assert ghost.diagnostic_code is not None and "User unknown" in ghost.diagnostic_code


def test_gmail_report_without_returned_headers() -> None:
    """Quoted, capitalised report type; no headers part: Gmail's own field and
    In-Reply-To/References name the message."""
    dsn = report("gmail")
    assert dsn.original_message_id == "<order-77@example.com>"
    assert dsn.referenced_message_ids == ("<order-77@example.com>", "<older@example.com>")
    assert dsn.candidate_message_ids() == ["<order-77@example.com>", "<older@example.com>"]
    [nobody] = dsn.recipients
    assert nobody.remote_mta == "gmail-smtp-in.l.google.com"
    assert nobody.diagnostic_code is not None
    assert nobody.diagnostic_code.startswith("smtp; 550-5.1.1 The email account")
    assert nobody.diagnostic_code.endswith("- gsmtp")


def test_global_report_with_utf8_addresses() -> None:
    dsn = report("global")
    assert dsn.original_envelope_id == "out_utf8env"
    assert dsn.original_message_id == "<utf8-order@example.com>"
    [recipient] = dsn.recipients
    assert recipient.original_recipient == "用户@example.jp"
    assert recipient.final_recipient == "用户@example.jp"


def test_transfer_encoded_status_part() -> None:
    raw = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\n\n"
        b"--x\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
        b"UmVwb3J0aW5nLU1UQTogZG5zOyB4CgpGaW5hbC1SZWNpcGllbnQ6IHJmYzgyMjsgYUBiLmMKQWN0aW9uOiBm"
        b"YWlsZWQK\n--x--\n"
    )
    dsn = parse_dsn(raw)
    assert dsn is not None
    assert dsn.reporting_mta == "x"
    assert [(r.final_recipient, r.action) for r in dsn.recipients] == [("a@b.c", "failed")]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"Subject: hi\r\n\r\nplain mail about multipart/report and delivery-status\r\n",
        # A report of another type (a read receipt).
        b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\n\n"
        b"--b\nContent-Type: message/disposition-notification\n\nFinal-Recipient: rfc822; a@b.c"
        b"\n--b--\n",
        # The right type, but no status part, or one without a recipient.
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\n"
        b"Content-Type: text/plain\n\nsorry\n--b--\n",
        b"Content-Type: multipart/report; report-type=delivery-status\n\nnot multipart at all\n",
    ],
)
def test_not_a_dsn(raw: bytes) -> None:
    dsn = parse_dsn(raw)
    assert dsn is None or dsn.recipients == ()


def test_cheap_filter_keeps_every_sample_and_drops_plain_mail() -> None:
    for name in SAMPLES:
        assert may_be_dsn(load(name)), name
    assert not may_be_dsn(b"Subject: x\r\n\r\nthe body mentions multipart/report\r\n")
    assert not may_be_dsn(b"Subject: report\r\nContent-Type: text/plain\r\n\r\n/report\r\n")


def test_truncated_and_mutated_samples_never_raise() -> None:
    """Every prefix (in steps) and many byte flips of every sample: an answer, never an
    exception."""
    rng = random.Random(12)
    for name in SAMPLES:
        raw = load(name)
        for end in range(0, len(raw), 7):
            parse_dsn(raw[:end])
        for _ in range(300):
            mutated = bytearray(raw)
            for _ in range(rng.randint(1, 20)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            parse_dsn(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n",
                b"Content-Type: message/delivery-status\n",
                b"Content-Type: message/global-delivery-status\n",
                b"Content-Type: text/rfc822-headers\n",
                b"Content-Transfer-Encoding: base64\n",
                b"Content-Transfer-Encoding: quoted-printable\n",
                b"Final-Recipient: rfc822; a@b.c\n",
                b"Original-Recipient: utf-8; \\x{ZZ}@\n",
                b"Action: failed\n",
                b"Status: 5.1.1 (x\n",
                b"Original-Envelope-Id: +ZZ+4\n",
                b"Message-ID: <\n",
                b"References: <a@b> <\n",
                b"--b\n",
                b"--b--\n",
                b"\n",
                b" folded\n",
                b"\xff\xfe\x00\n",
            ]
        )
        | st.binary(max_size=40),
        max_size=40,
    )
)
def test_assembled_garbage_never_raises(parts: list[bytes]) -> None:
    dsn = parse_dsn(b"".join(parts))
    assert dsn is None or isinstance(dsn, DeliveryReport)


@pytest.mark.parametrize(
    ("diagnostic", "code"),
    [
        ("smtp; 550 5.1.1 <a@b.c>: unknown", 550),
        ("SMTP;452-4.2.2 mailbox full", 452),
        ("x-unix; 550 5.1.1 no such user", None),
        ("smtp; 5.1.1 no reply code", None),
        (None, None),
    ],
)
def test_smtp_code_of_a_diagnostic(diagnostic: str | None, code: int | None) -> None:
    assert smtp_code(diagnostic) == code

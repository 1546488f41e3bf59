"""Properties of the send-request rules (``service.services.sending.prepare``), no I/O."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.accounts import Account, IncomingServer, OutgoingServer, RetrievalPolicy
from service.domain.enums import Security
from service.domain.outbox import SendRequest
from service.errors import Invalid
from service.services.sending import SendLimits, prepare, request_hash
from service.smtp import prepare_data

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LIMITS = SendLimits(
    max_recipients=100,
    max_attachment_bytes=1 << 20,
    max_send_bytes=4 << 20,
    max_message_age_s=3600,
)
ACCOUNT = Account(
    id="acc_test",
    tenant="default",
    name="Alice",
    email="alice@example.com",
    display_name="Alice Example",
    incoming=IncomingServer(
        host="pop.example.com",
        port=995,
        security=Security.TLS,
        username="alice",
        password_encrypted="x",
    ),
    outgoing=OutgoingServer(host="smtp.example.com", port=587, security=Security.STARTTLS),
    retrieval=RetrievalPolicy(),
    created_at=NOW,
    updated_at=NOW,
)
# Every character that could end a header line somewhere along the way.
BREAKERS = st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028", "\u2029"]
)
# Bodies: any text the JSON layer can carry (no lone surrogates), NUL excluded (refused).
BODY = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=400
) | st.lists(st.sampled_from(["\r", "\n", ".", "\r\n", "x", "..", " "]), max_size=60).map("".join)


def request(**fields: object) -> SendRequest:
    values: dict[str, object] = {"to": ["bob@example.org"], "subject": "Hi", "text": "Hello"}
    values.update(fields)
    return msgspec.convert(values, SendRequest)


def refusal(req: SendRequest) -> Invalid:
    with pytest.raises(Invalid) as caught:
        prepare(ACCOUNT, req, limits=LIMITS, now=NOW)
    return caught.value


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.text(max_size=30), breaker=BREAKERS, after=st.text(max_size=30))
def test_a_line_break_anywhere_in_the_subject_is_header_injection(
    before: str, breaker: str, after: str
) -> None:
    assert refusal(request(subject=before + breaker + after)).code == "header_injection"


@settings(max_examples=200)
@given(value=st.text(max_size=20), breaker=BREAKERS, name=st.sampled_from(["X-Tag", "Keywords"]))
def test_a_line_break_in_an_extra_header_value_is_header_injection(
    value: str, breaker: str, name: str
) -> None:
    error = refusal(request(headers={name: value + breaker}))
    assert error.code == "header_injection"
    assert error.errors[0].field == f"headers.{name}"


@settings(max_examples=200)
@given(
    local=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    junk=st.sampled_from([*list(' \t\r\n<>,;:"()[]\\\x00\u2028'), " <x@y.z>", ",x@y.z"]),
    where=st.integers(min_value=0, max_value=2),
)
def test_anything_but_one_plain_address_is_refused(local: str, junk: str, where: int) -> None:
    address = f"{local}@example.org"
    spliced = [junk + address, address + junk, f"{local}{junk}@example.org"][where]
    error = refusal(request(to=[spliced]))
    assert error.code == "invalid_address"
    assert error.errors[0].field == "to[0]"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=BODY)
def test_any_body_becomes_one_crlf_message_that_stuffs_and_unstuffs_exactly(text: str) -> None:
    outgoing = prepare(ACCOUNT, request(text=text), limits=LIMITS, now=NOW)
    raw = outgoing.raw
    # CRLF only.
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    # The data written after DATA ends at its one and only lone-dot line...
    payload, size = prepare_data(raw)
    assert size == len(raw)
    assert payload.endswith(b"\r\n.\r\n")
    assert payload.find(b"\r\n.\r\n") == len(payload) - 5
    # ...and a server removing the stuffing gets the accepted bytes back.
    lines = payload[:-3].split(b"\r\n")
    assert b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) == raw
    # The body reads back as the text sent, line breaks normalized.
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body()
    assert body is not None
    content = body.get_content().replace("\r\n", "\n")
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert content in (expected, expected + "\n")


@settings(max_examples=100)
@given(
    headers=st.dictionaries(
        st.from_regex(r"X-[A-Za-z]{1,10}", fullmatch=True),
        st.text("abc ", max_size=5),
        max_size=5,
    ),
    seed=st.randoms(),
)
def test_the_request_hash_ignores_json_key_order(headers: dict[str, str], seed: object) -> None:
    names = list(headers)
    seed.shuffle(names)  # type: ignore[attr-defined]
    shuffled = {name: headers[name] for name in names}
    assert request_hash(request(headers=headers)) == request_hash(request(headers=shuffled))
    assert request_hash(request(headers=headers)) != request_hash(
        request(headers=headers, subject="Other")
    )


def test_protected_headers_are_refused_whatever_their_case() -> None:
    for name in (
        "bcc",
        "BCC",
        "Content-Type",
        "content-transfer-encoding",
        "Resent-To",
        "DKIM-Signature",
        "Message-Id",
        "Date",
        "From",
        "Return-Path",
    ):
        assert refusal(request(headers={name: "x"})).code == "protected_header", name


def test_bcc_is_in_the_envelope_only() -> None:
    outgoing = prepare(
        ACCOUNT,
        request(to=["bob@example.org"], bcc=["Hidden@Example.NET", "bob@example.org"]),
        limits=LIMITS,
        now=NOW,
    )
    assert [(r.address, r.kind) for r in outgoing.recipients] == [
        ("bob@example.org", "to"),
        ("Hidden@example.net", "bcc"),
    ]
    assert b"Hidden" not in outgoing.raw and b"Bcc" not in outgoing.raw

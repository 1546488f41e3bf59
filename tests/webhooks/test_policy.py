"""The pure parts of webhook delivery: signatures (checked against the ``standardwebhooks``
library), the retry policy, what an answer means, ``Retry-After``."""

from __future__ import annotations

from datetime import UTC, datetime

import standardwebhooks

from service.services.webhooks import (
    Answer,
    RetryPolicy,
    SendError,
    classify,
    new_secret,
    retry_after,
    signature_header,
)


def test_a_signature_verifies_with_the_standardwebhooks_library() -> None:
    secret, old = new_secret(), new_secret()
    assert secret.startswith("whsec_") and secret != old
    body = b'{"id":"evt_1","type":"webhook.test"}'
    stamp = int(datetime.now(UTC).timestamp())
    header = signature_header([secret, old], "evt_1", stamp, body)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(stamp), "webhook-signature": header}
    for key in (secret, old):
        assert standardwebhooks.Webhook(key).verify(body, headers) == {
            "id": "evt_1",
            "type": "webhook.test",
        }
    try:
        standardwebhooks.Webhook(new_secret()).verify(body, headers)
    except standardwebhooks.webhooks.WebhookVerificationError:
        pass
    else:
        raise AssertionError("a foreign secret verified")


def test_retry_delays_double_with_jitter_and_honour_retry_after() -> None:
    policy = RetryPolicy(base_s=5, max_s=3600, window_s=86400)
    for attempt, base in ((1, 5), (2, 10), (3, 20), (20, 3600)):
        for _ in range(50):
            assert base * 0.5 <= policy.delay(attempt, None) < base * 1.5
    assert policy.delay(1, 120) >= 120
    assert policy.delay(1, 10**6) <= 3600  # never longer than the cap


def test_what_an_answer_means() -> None:
    def answer(status: int) -> Answer:
        return Answer(status=status, body="", retry_after_s=None)

    assert classify(answer(200), None) == (True, False)
    assert classify(answer(204), None) == (True, False)
    for status in (429, 500, 502, 503, 408):
        assert classify(answer(status), None) == (False, True)
    for status in (301, 400, 401, 404, 410, 413):
        assert classify(answer(status), None) == (False, False)
    assert classify(None, SendError("timeout")) == (False, True)
    assert classify(None, SendError("guard", retryable=False)) == (False, False)


def test_retry_after_as_seconds_or_a_date() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert retry_after("30", now) == 30
    assert retry_after("Sun, 01 Mar 2026 12:01:00 GMT", now) == 60
    assert retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


async def test_the_guard_applies_to_the_address_dialled_at_every_attempt() -> None:
    """A name that resolved to a public address at registration and to loopback later
    (DNS rebinding) is refused at connect time, before any byte is sent."""
    from service.netguard import ConnectionGuard
    from service.services.webhooks import WebhookSender

    answers = [["93.184.216.34"], ["127.0.0.1"]]

    async def resolver(host: str, port: int) -> list[str]:
        return answers.pop(0)

    sender = WebhookSender(ConnectionGuard(resolver=resolver), timeout_s=5, ca_file=None)
    assert await sender.addresses("https://hooks.example.com/x") == ["93.184.216.34"]
    try:
        await sender.post("https://hooks.example.com/x", b"{}", {})
    except SendError as exc:
        assert not exc.retryable and "loopback" in str(exc)
    else:
        raise AssertionError("loopback was dialled")
    plain = WebhookSender(ConnectionGuard(), timeout_s=5, ca_file=None)
    try:
        await plain.post("http://93.184.216.34/x", b"{}", {})
    except SendError as exc:
        assert not exc.retryable and "https" in str(exc)
    else:
        raise AssertionError("plain http went out")

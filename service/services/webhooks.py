"""Webhook endpoints (CRUD, secrets, test) and their delivery.

Signing follows the Standard Webhooks specification: headers ``webhook-id`` (the event id,
the same on every retry), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 over "id.timestamp.body">``; after a rotation, one signature per
secret still in force, space separated). Secrets are ``whsec_`` + base64 of 32 random bytes,
stored encrypted like account passwords, returned only at creation and rotation.

Delivery is at-least-once: a delivery row is queued with the event (same transaction), a
replica claims it under a lease (per endpoint), posts it and writes the attempt back.
Timeouts, connection errors, 429 and 5xx are retried with exponential backoff and jitter
(``Retry-After`` honoured) while the event is younger than the retry window; any other
answer fails the delivery; 410 disables the endpoint, and so does failing for a whole
window (``webhook.disabled`` is recorded). Each endpoint has its own worker and at most
``concurrency`` requests in flight, so a slow endpoint never holds up another.

The outbound guard applies to the address actually dialled: the URL's host is resolved
and checked by :class:`ConnectionGuard`, the checked address is dialled (TLS still verifies
the certificate against the host name); plain ``http`` only to addresses inside
``MAILROOM_ALLOWED_NETWORKS``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from service import __version__
from service.codes import ErrorCode
from service.crypto import CredentialCipher
from service.domain.event_payloads import WebhookDisabled, WebhookTest, payload
from service.domain.events import EventType, NewEvent, new_event
from service.domain.ids import new_id
from service.domain.time import utcnow
from service.domain.webhooks import (
    AttemptOutcome,
    ClaimedDelivery,
    DeliveryResult,
    DisabledReason,
    Webhook,
    WebhookAttempt,
)
from service.errors import Conflict, FieldError, Invalid, NotFound
from service.logs import log_event
from service.netguard import ConnectionGuard, HostNotAllowed, NetGuardError
from service.repository.accounts import AccountRepository
from service.repository.errors import RepositoryError
from service.repository.events import subscribe_committed
from service.repository.notify import Notifier, Topic
from service.repository.pages import Page
from service.repository.webhooks import WebhookRepository
from service.tls import client_context

logger = logging.getLogger("mailroom.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
SECRET_FIELD = "webhook_secret"  # noqa: S105 - a field name (encryption context)
#: Characters of a response body kept with each attempt.
RESPONSE_EXCERPT = 512
#: The most of a response read (the rest is not waited for).
MAX_RESPONSE_READ = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
#: How long a kept connection may stay idle before it is not used again.
IDLE_S = 30.0
MAX_IDLE_PER_ORIGIN = 256  # endpoints sharing one origin share its connections
#: How often an idle endpoint worker looks for due retries and the dispatcher for new or
#: changed endpoints, when no wake-up came.
POLL_S = 2.0
#: A claim holds this much longer than its deliveries may take.
LEASE_MARGIN_S = 30.0
#: Deliveries claimed ahead per endpoint, in rounds of ``concurrency`` requests.
CLAIM_ROUNDS = 4
MAX_URL_CHARS = 2048
MAX_ACCOUNT_IDS = 100
RETRYABLE_STATUSES = frozenset({408, 429})
USER_AGENT = f"Mailroom-Webhooks/{__version__}"

_encoder = msgspec.json.Encoder()


# -- signing (Standard Webhooks) ------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<signature>`` of one message under ``secret`` (``whsec_...``)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(
    secrets_in_force: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> str:
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_in_force)


# -- the HTTP request ------------------------------------------------------------------------


class Answer(msgspec.Struct, frozen=True):
    status: int
    body: str
    retry_after_s: float | None


class SendError(Exception):
    """No HTTP answer: the connection, TLS, the guard or a timeout failed."""

    def __init__(self, detail: str, *, retryable: bool = True) -> None:
        super().__init__(detail)
        self.retryable = retryable


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


class _Connection:
    """An open connection to one checked address, reusable while the server keeps it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and time.monotonic() - self.idle_since < IDLE_S
        )

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class WebhookSender:
    """POSTs one signed request to an endpoint through the outbound guard.

    Connections are kept open between requests (HTTP/1.1 keep-alive, at most
    :data:`IDLE_S` idle), per URL origin: a new one is opened only to an address the guard
    has just checked.
    """

    def __init__(self, guard: ConnectionGuard, *, timeout_s: float, ca_file: str | None) -> None:
        self._guard = guard
        self._timeout_s = timeout_s
        self._ssl: ssl.SSLContext = client_context(ca_file)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    def plain_allowed(self, address: str) -> bool:
        """Whether plain http may go to ``address`` (inside MAILROOM_ALLOWED_NETWORKS)."""
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._guard.allowed_networks)

    async def addresses(self, url: str) -> list[str]:
        """The checked addresses to dial for ``url`` (plain http only where allowed)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = await self._guard.resolve(host, port)
        if parts.scheme == "http" and not all(self.plain_allowed(a) for a in found):
            raise SendError(
                f"{host} is not in MAILROOM_ALLOWED_NETWORKS: plain http is refused, use https",
                retryable=False,
            )
        return found

    async def close(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """The endpoint's answer; :class:`SendError` when there is none."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = (parts.scheme, host, port)
        try:
            async with asyncio.timeout(self._timeout_s):
                reused = self._take(key)
                if reused is not None:
                    try:
                        return await self._exchange(
                            key, reused, host, port, tls, target, body, headers
                        )
                    except _Stale:
                        pass  # the server closed it meanwhile: a new connection, once
                connection = await self._open(url, host, port, tls)
                try:
                    return await self._exchange(
                        key, connection, host, port, tls, target, body, headers
                    )
                except _Stale:
                    raise SendError("the connection closed before a response") from None
        except TimeoutError:
            raise SendError(f"no answer within {self._timeout_s:g} s") from None

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        pool = self._idle.get(key)
        while pool:
            connection = pool.pop()
            if connection.usable():
                return connection
            connection.writer.close()
        return None

    async def _open(self, url: str, host: str, port: int, tls: bool) -> _Connection:
        try:
            found = await self.addresses(url)
        except HostNotAllowed as exc:
            raise SendError(str(exc), retryable=False) from exc
        except NetGuardError as exc:
            raise SendError(str(exc), retryable=exc.transient) from exc
        last: Exception | None = None
        for address in found:
            try:
                reader, writer = await asyncio.open_connection(
                    address,
                    port,
                    ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                    limit=MAX_HEADER_BYTES,
                )
            except ssl.SSLError as exc:
                raise SendError(f"TLS with {host} failed: {exc.reason or exc}") from exc
            except OSError as exc:
                last = exc
                continue
            return _Connection(reader, writer)
        raise SendError(f"cannot connect to {host}:{port}: {last}")

    async def _exchange(
        self,
        key: tuple[str, str, int],
        connection: _Connection,
        host: str,
        port: int,
        tls: bool,
        target: str,
        body: bytes,
        headers: dict[str, str],
    ) -> Answer:
        keep = False
        try:
            answer, keep = await _request(connection, host, port, tls, target, body, headers)
            return answer
        finally:
            if keep:
                connection.idle_since = time.monotonic()
                pool = self._idle.setdefault(key, [])
                if len(pool) < MAX_IDLE_PER_ORIGIN:
                    pool.append(connection)
                else:
                    await connection.close()
            else:
                await connection.close()


class _Stale(Exception):
    """A connection closed before any byte of a response (a kept one the server dropped)."""


async def _request(
    connection: _Connection,
    host: str,
    port: int,
    tls: bool,
    target: str,
    body: bytes,
    headers: dict[str, str],
) -> tuple[Answer, bool]:
    """The answer, and whether the connection may carry another request."""
    reader, writer = connection.reader, connection.writer
    default_port = 443 if tls else 80
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    authority = name if port == default_port else f"{name}:{port}"
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {authority}",
        f"User-Agent: {USER_AGENT}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{field}: {value}" for field, value in headers.items()),
    ]
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.LimitOverrunError, ValueError):
        raise SendError("the response headers are too long") from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _Stale from None
        raise SendError("the connection closed in the middle of the response") from None
    except (ConnectionError, BrokenPipeError):
        raise _Stale from None
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"the connection failed: {exc}") from exc
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        version, code, *_reason = status_line.split(" ", 2)
        status = int(code)
    except ValueError:
        raise SendError(f"not an HTTP response: {status_line[:80]!r}") from None
    fields: dict[str, str] = {}
    for line in header_lines:
        field, _, value = line.partition(":")
        if field:
            fields[field.strip().lower()] = value.strip()
    length = fields.get("content-length")
    chunked = fields.get("transfer-encoding", "").lower() == "chunked"
    keep = (
        version == "HTTP/1.1"
        and fields.get("connection", "").lower() != "close"
        and length is not None
        and length.isdigit()
        and int(length) <= MAX_RESPONSE_READ
        and not chunked
    )
    data = b""
    try:
        if keep and length is not None:
            data = await reader.readexactly(int(length))
        elif chunked:
            # Only the first chunk is kept (enough for an excerpt); the connection closes.
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            data = await reader.read(min(size, MAX_RESPONSE_READ))
        else:
            want = MAX_RESPONSE_READ
            if length is not None and length.isdigit():
                want = min(int(length), MAX_RESPONSE_READ)
            while len(data) < want:
                chunk = await reader.read(want - len(data))
                if not chunk:
                    break
                data += chunk
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
        keep = False
    return (
        Answer(
            status=status,
            body=data[:RESPONSE_EXCERPT].decode("utf-8", "replace")[:RESPONSE_EXCERPT],
            retry_after_s=retry_after(fields.get("retry-after"), utcnow()),
        ),
        keep,
    )


# -- the retry policy --------------------------------------------------------------------------


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    base_s: float
    max_s: float
    window_s: float

    @property
    def failing_limit(self) -> timedelta:
        """How long an endpoint may fail without a success before it is disabled: the
        retry window, less the longest delay (the last retry of an event comes that much
        before its window ends), so an endpoint that failed all of an event's retries is
        disabled by them."""
        return timedelta(seconds=max(self.window_s - self.max_s, self.window_s / 2))

    def delay(self, attempt: int, asked_s: float | None) -> float:
        """Seconds before the attempt after attempt number ``attempt`` (1-based): doubled
        each time, jittered over [0.5, 1.5), at least what ``Retry-After`` asked for."""
        backoff: float = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        backoff *= 0.5 + random.random()
        if asked_s is not None:
            backoff = max(backoff, min(asked_s, self.max_s))
        return backoff


def classify(answer: Answer | None, error: SendError | None) -> tuple[bool, bool]:
    """(delivered, retryable) of one attempt."""
    if answer is None:
        return False, error.retryable if error is not None else True
    if 200 <= answer.status < 300:
        return True, False
    return False, answer.status in RETRYABLE_STATUSES or answer.status >= 500


# -- endpoints (the API's use cases) ---------------------------------------------------------


class WebhookService:
    """CRUD of a tenant's endpoints, secret rotation, the test event, attempts."""

    def __init__(
        self,
        repo: WebhookRepository,
        accounts: AccountRepository,
        cipher: CredentialCipher,
        sender: WebhookSender,
        *,
        secret_grace_s: float,
    ) -> None:
        self._repo = repo
        self._accounts = accounts
        self._cipher = cipher
        self._sender = sender
        self._grace_s = secret_grace_s
        # Called after an endpoint changed here (the dispatcher of this process re-reads).
        self.on_change: Callable[[], None] = lambda: None

    async def _check_url(self, url: str) -> str:
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unbalanced "[" (an IPv6 literal)
            raise Invalid(
                "url: not a valid URL", errors=[FieldError("url", "not a valid URL")]
            ) from None
        problems: list[FieldError] = []
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(FieldError("url", "must be an absolute http or https URL"))
        elif parts.username is not None or parts.password is not None:
            problems.append(FieldError("url", "must not carry credentials"))
        elif parts.fragment:
            problems.append(FieldError("url", "must not have a fragment"))
        if problems:
            raise Invalid(problems[0].message, errors=problems)
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            raise Invalid("url: bad port", errors=[FieldError("url", "bad port")]) from None
        try:
            found = await self._sender.addresses(url)
        except UnicodeError:
            raise Invalid(
                "url: the host is not a valid host name",
                errors=[FieldError("url", "the host is not a valid host name")],
            ) from None
        except HostNotAllowed as exc:
            raise Invalid(
                f"url: {exc}", code="host_not_allowed", errors=[FieldError("url", str(exc))]
            ) from exc
        except SendError as exc:
            raise Invalid(
                f"url: {exc}",
                code=ErrorCode.HTTPS_REQUIRED,
                errors=[FieldError("url", str(exc))],
            ) from exc
        except NetGuardError:
            # Does not resolve now (DNS may be down): every connection checks again; plain
            # http is only for hosts known to be inside the allowed networks.
            found = []
            if parts.scheme == "http":
                detail = f"{parts.hostname} does not resolve: plain http is refused, use https"
                raise Invalid(
                    f"url: {detail}",
                    code=ErrorCode.HTTPS_REQUIRED,
                    errors=[FieldError("url", detail)],
                ) from None
        del found
        return url

    async def _check_accounts(self, tenant: str, account_ids: list[str] | None) -> None:
        for account_id in account_ids or ():
            if await self._accounts.get(tenant, account_id) is None:
                raise Invalid(
                    f"account_ids: no account {account_id!r}",
                    errors=[FieldError("account_ids", f"no account {account_id!r}")],
                )

    def secrets_of(self, webhook: Webhook, now: datetime) -> list[str]:
        """The secrets that sign now: the current one, and the previous one in its grace."""
        found = [self._decrypt(webhook, webhook.secret_encrypted)]
        if (
            webhook.previous_secret_encrypted is not None
            and webhook.previous_secret_until is not None
            and webhook.previous_secret_until > now
        ):
            found.append(self._decrypt(webhook, webhook.previous_secret_encrypted))
        return found

    def _decrypt(self, webhook: Webhook, stored: str) -> str:
        return self._cipher.decrypt(stored, account_id=webhook.id, field=SECRET_FIELD)

    def _encrypt(self, webhook_id: str, secret: str) -> str:
        return self._cipher.encrypt(secret, account_id=webhook_id, field=SECRET_FIELD)

    async def create(
        self,
        tenant: str,
        *,
        url: str,
        events: list[str],
        account_ids: list[str] | None,
        enabled: bool,
        description: str | None,
    ) -> tuple[Webhook, str]:
        """The new endpoint and its secret (shown only now)."""
        await self._check_url(url)
        await self._check_accounts(tenant, account_ids)
        now = utcnow()
        webhook_id = new_id("whk")
        secret = new_secret()
        webhook = Webhook(
            id=webhook_id,
            tenant=tenant,
            url=url,
            description=description,
            events=events,
            account_ids=account_ids,
            enabled=enabled,
            secret_encrypted=self._encrypt(webhook_id, secret),
            previous_secret_encrypted=None,
            previous_secret_until=None,
            disabled_reason=None if enabled else DisabledReason.BY_CALLER.value,
            failing_since=None,
            created_at=now,
            updated_at=now,
        )
        await self._repo.add(webhook)
        self.on_change()
        log_event(logger, "webhook created", tenant=tenant, webhook_id=webhook_id)
        return webhook, secret

    async def get(self, tenant: str, webhook_id: str) -> Webhook:
        webhook = await self._repo.get(tenant, webhook_id)
        if webhook is None:
            raise NotFound(f"no webhook {webhook_id!r}")
        return webhook

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Webhook]:
        return await self._repo.page(tenant, after=after, limit=limit)

    async def update(self, tenant: str, webhook_id: str, changes: dict[str, Any]) -> Webhook:
        """Apply the fields given (``url``, ``events``, ``account_ids``, ``enabled``,
        ``description``); enabling clears the disabled reason and the failure clock."""
        webhook = await self.get(tenant, webhook_id)
        if "url" in changes:
            await self._check_url(changes["url"])
        if "account_ids" in changes:
            await self._check_accounts(tenant, changes["account_ids"])
        values = msgspec.structs.asdict(webhook) | changes
        if "enabled" in changes:
            if changes["enabled"] and not webhook.enabled:
                values["disabled_reason"] = None
                values["failing_since"] = None
            elif not changes["enabled"] and webhook.enabled:
                values["disabled_reason"] = DisabledReason.BY_CALLER.value
        values["updated_at"] = utcnow()
        updated = Webhook(**values)
        await self._repo.replace(updated)
        self.on_change()
        return updated

    async def delete(self, tenant: str, webhook_id: str) -> None:
        if not await self._repo.delete(tenant, webhook_id):
            raise NotFound(f"no webhook {webhook_id!r}")
        self.on_change()

    async def rotate(self, tenant: str, webhook_id: str) -> tuple[Webhook, str]:
        """A new secret; the current one keeps signing (alongside) for the grace period."""
        webhook = await self.get(tenant, webhook_id)
        now = utcnow()
        secret = new_secret()
        updated = msgspec.structs.replace(
            webhook,
            secret_encrypted=self._encrypt(webhook.id, secret),
            previous_secret_encrypted=webhook.secret_encrypted,
            previous_secret_until=now + timedelta(seconds=self._grace_s),
            updated_at=now,
        )
        await self._repo.replace(updated)
        self.on_change()
        log_event(logger, "webhook secret rotated", tenant=tenant, webhook_id=webhook_id)
        return updated, secret

    async def test(self, tenant: str, webhook_id: str) -> str:
        """Queue a ``webhook.test`` event for this endpoint only; its event id."""
        webhook = await self.get(tenant, webhook_id)
        if not webhook.enabled:
            raise Conflict(
                "the webhook is disabled; enable it first", code=ErrorCode.WEBHOOK_DISABLED
            )
        event = new_event(
            EventType.WEBHOOK_TEST,
            tenant=tenant,
            account_id=None,
            created_at=utcnow(),
            data=payload(WebhookTest(webhook_id=webhook.id, message="a test from Mailroom")),
        )
        await self._repo.queue_test(webhook.id, event)
        return event.id

    async def attempts(
        self, tenant: str, webhook_id: str, *, after: str | None, limit: int
    ) -> Page[WebhookAttempt]:
        await self.get(tenant, webhook_id)
        return await self._repo.attempts(webhook_id, after=after, limit=limit)


# -- delivery ----------------------------------------------------------------------------------


class EndpointWorker:
    """Delivers one endpoint's queue with at most ``concurrency`` requests in flight."""

    def __init__(self, dispatcher: WebhookDispatcher, webhook: Webhook) -> None:
        self.webhook = webhook
        self._d = dispatcher
        self.wake = asyncio.Event()
        self._inflight: set[asyncio.Task[DeliveryResult]] = set()
        self._done: list[DeliveryResult] = []
        # Deliveries in flight or not yet written back (never claimed twice meanwhile).
        self._held: set[str] = set()
        self._recording: asyncio.Task[None] | None = None
        self._queue: collections.deque[ClaimedDelivery] = collections.deque()
        self._next_due: float | None = None  # monotonic time of the earliest known retry
        self.delivered_at: datetime | None = None  # the last delivery this worker made
        self._task = asyncio.create_task(self._loop(), name=f"webhook {webhook.id}")

    @property
    def ended(self) -> bool:
        return self._task.done()

    async def stop(self) -> None:
        """Stop; attempts under way are abandoned (sent again later: at least once), the
        finished ones are written back first."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._recording is not None:
            await asyncio.gather(self._recording, return_exceptions=True)
        if self._done:
            with contextlib.suppress(Exception):
                await self._d.record(self, self._done)

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                self._start_recording()
                if not self.webhook.enabled:
                    return
                # Claimed ahead, in batches (one query serves several requests), refilled
                # when fewer than one round of requests is left.
                if len(self._queue) < self._d.concurrency:
                    now = utcnow()
                    claimed = await self._d.repo.claim(
                        self.webhook.id,
                        self._d.owner,
                        now,
                        now + timedelta(seconds=self._d.lease_s),
                        self._d.claim_batch - len(self._queue),
                        exclude=self._held,
                    )
                    for delivery in claimed:
                        self._held.add(delivery.id)
                        self._queue.append(delivery)
                while self._queue and len(self._inflight) < self._d.concurrency:
                    delivery = self._queue.popleft()
                    task = asyncio.create_task(self._d.attempt(self.webhook, delivery))
                    self._inflight.add(task)
                    task.add_done_callback(self._finished)
            except RepositoryError as exc:
                logger.warning("webhook %s: store error: %s; will retry", self.webhook.id, exc)
            except Exception:
                logger.exception("webhook %s: delivery loop failed; will retry", self.webhook.id)
            timeout = POLL_S
            if self._next_due is not None:
                timeout = max(0.0, min(timeout, self._next_due - time.monotonic()))
                if timeout == 0.0:
                    self._next_due = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()

    def _finished(self, task: asyncio.Task[DeliveryResult]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._done.append(task.result())
        self.wake.set()

    def _start_recording(self) -> None:
        """Write finished attempts back in the background (one write at a time), so a
        busy writer never holds up the next claims: a delivery stays held (never claimed
        again here) until its attempt is written."""
        if self._done and (self._recording is None or self._recording.done()):
            self._recording = asyncio.create_task(self._record())
            self._recording.add_done_callback(lambda _task: self.wake.set())

    async def _record(self) -> None:
        if not self._done:
            return
        results, self._done = self._done, []
        try:
            await self._d.record(self, results)
        except Exception as exc:
            self._done = results + self._done
            logger.warning("webhook %s: cannot record attempts: %s", self.webhook.id, exc)
            await asyncio.sleep(1.0)  # then tried again (the wake-up at its end)
            return
        except BaseException:
            self._done = results + self._done
            raise
        self._held.difference_update(r.delivery_id for r in results)
        for r in results:
            if r.next_attempt_at is not None:
                due = time.monotonic() + max(0.0, (r.next_attempt_at - utcnow()).total_seconds())
                self._next_due = due if self._next_due is None else min(self._next_due, due)


class WebhookDispatcher:
    """Runs one :class:`EndpointWorker` per enabled endpoint; woken by committed events
    (``Topic.EVENTS``) and polling every :data:`POLL_S` for changed endpoints."""

    def __init__(
        self,
        repo: WebhookRepository,
        service: WebhookService,
        sender: WebhookSender,
        notifier: Notifier,
        *,
        owner: str,
        exclusive: bool,
        policy: RetryPolicy,
        concurrency: int,
        timeout_s: float,
    ) -> None:
        self.repo = repo
        self.owner = owner
        self.concurrency = concurrency
        # An endpoint's deliveries are claimed up to this many at a time; the last of them
        # waits at most (claim_batch / concurrency) requests, each bounded by the timeout.
        self.claim_batch = concurrency * CLAIM_ROUNDS
        self.lease_s = timeout_s * (CLAIM_ROUNDS + 1) + LEASE_MARGIN_S
        self._service = service
        self._sender = sender
        self._policy = policy
        self._exclusive = exclusive
        self._workers: dict[str, EndpointWorker] = {}
        self._woken: set[str] = set()
        self._sync_due = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # SQLite: woken only for events that queued deliveries (an event no endpoint takes
        # costs the dispatcher nothing); other processes' events arrive as Topic.EVENTS.
        self._unsubscribe = subscribe_committed(self._on_events, deliveries_only=True)
        notifier.subscribe(Topic.EVENTS, self._on_events)
        service.on_change = self.request_sync

    def _on_events(self, tenant: str) -> None:
        self._woken.add(tenant)
        self._wake.set()
        for worker in self._workers.values():
            if worker.webhook.tenant == tenant:
                worker.wake.set()

    async def start(self) -> None:
        """Give back claims left by a previous run (SQLite: all are this process's), then
        deliver."""
        if self._exclusive:
            await self.repo.release("*")
        self._task = asyncio.create_task(self._loop(), name="webhook dispatcher")

    async def stop(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            await worker.stop()
        await self._sender.close()
        with contextlib.suppress(RepositoryError):
            await self.repo.release(self.owner)

    def request_sync(self) -> None:
        """Read the endpoints again now (one was created or changed in this process)."""
        self._sync_due = True
        self._wake.set()

    async def _loop(self) -> None:
        last_sync = -POLL_S
        while True:
            self._wake.clear()
            woken, self._woken = self._woken, set()
            known = {worker.webhook.tenant for worker in self._workers.values()}
            # Endpoints are read again every POLL_S (other processes change them), at once
            # when asked, or when a tenant without a known endpoint has events.
            due = self._sync_due or time.monotonic() - last_sync >= POLL_S or woken - known
            try:
                if due:
                    self._sync_due = False
                    last_sync = time.monotonic()
                    await self._sync()
            except RepositoryError as exc:
                logger.warning("webhooks: cannot read the endpoints: %s; will retry", exc)
            except Exception:
                logger.exception("webhooks: the dispatcher failed; will retry")
            for worker in self._workers.values():
                if worker.webhook.tenant in woken:
                    worker.wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    async def _sync(self) -> None:
        enabled = {w.id: w for w in await self.repo.enabled()}
        for webhook_id in list(self._workers):
            if webhook_id not in enabled:
                await self._workers.pop(webhook_id).stop()
        for webhook_id, webhook in enabled.items():
            worker = self._workers.get(webhook_id)
            if worker is None or worker.ended:
                # New, or its worker ended (the endpoint was disabled, then enabled again).
                self._workers[webhook_id] = EndpointWorker(self, webhook)
            else:
                worker.webhook = webhook
                worker.wake.set()

    async def attempt(self, webhook: Webhook, delivery: ClaimedDelivery) -> DeliveryResult:
        """POST one delivery; what happened (never raises)."""
        at = utcnow()
        number = delivery.attempt_count + 1
        started = time.monotonic()
        answer: Answer | None = None
        error: SendError | None = None
        if not delivery.body:
            error = SendError("the event is no longer stored", retryable=False)
        else:
            body = _encoder.encode(delivery.body)
            timestamp = int(time.time())
            try:
                signature = signature_header(
                    self._service.secrets_of(webhook, at), delivery.event_id, timestamp, body
                )
                answer = await self._sender.post(
                    webhook.url,
                    body,
                    {
                        "webhook-id": delivery.event_id,
                        "webhook-timestamp": str(timestamp),
                        "webhook-signature": signature,
                    },
                )
            except SendError as exc:
                error = exc
            except Exception as exc:  # a secret that cannot be read, a bug: logged, retried
                logger.exception("webhook %s: attempt failed unexpectedly", webhook.id)
                error = SendError(f"internal error: {type(exc).__name__}")
        duration_ms = int((time.monotonic() - started) * 1000)
        delivered, retryable = classify(answer, error)
        next_at: datetime | None = None
        if delivered:
            outcome = AttemptOutcome.DELIVERED
        elif retryable:
            delay = self._policy.delay(number, answer.retry_after_s if answer else None)
            next_at = utcnow() + timedelta(seconds=delay)
            deadline = delivery.created_at + timedelta(seconds=self._policy.window_s)
            outcome = AttemptOutcome.RETRYING if next_at <= deadline else AttemptOutcome.FAILED
            if outcome is AttemptOutcome.FAILED:
                next_at = None
        else:
            outcome = AttemptOutcome.FAILED
        log_event(
            logger,
            "webhook attempt",
            logging.INFO if delivered else logging.WARNING,
            webhook_id=webhook.id,
            event_id=delivery.event_id,
            attempt=number,
            outcome=outcome.value,
            status=answer.status if answer else None,
            duration_ms=duration_ms,
            error=str(error) if error else None,
        )
        return DeliveryResult(
            delivery_id=delivery.id,
            webhook_id=webhook.id,
            event_id=delivery.event_id,
            event_type=delivery.event_type,
            attempt=number,
            at=at,
            outcome=outcome,
            duration_ms=duration_ms,
            response_status=answer.status if answer else None,
            response_body=answer.body if answer else None,
            error=str(error) if error else None,
            next_attempt_at=next_at,
            exhausted_since=delivery.created_at
            if retryable and not delivered and not next_at
            else None,
        )

    async def record(self, worker: EndpointWorker, results: list[DeliveryResult]) -> None:
        """Write attempts back; keep the endpoint's failure clock; disable it on a 410 or
        after failing for the whole retry window (with ``webhook.disabled``)."""
        webhook = worker.webhook
        now = utcnow()
        failing: dict[str, datetime | None] = {}
        disable: dict[str, str] = {}
        events: list[NewEvent] = []
        failing_since = webhook.failing_since
        if any(r.outcome is AttemptOutcome.DELIVERED for r in results):
            failing[webhook.id] = None
            failing_since = None
            worker.delivered_at = now
        else:
            failing[webhook.id] = now
            failing_since = failing_since or min(r.at for r in results)
        # An event that failed every retry of its window, with nothing delivered since it
        # was created (as far as this worker saw): the endpoint failed that whole window,
        # however its attempts fell against the failing limit.
        exhausted = any(
            r.exhausted_since is not None
            and (worker.delivered_at is None or worker.delivered_at < r.exhausted_since)
            for r in results
        )
        reason: DisabledReason | None = None
        if any(r.response_status == 410 for r in results):
            reason = DisabledReason.GONE
        elif failing_since is not None and (
            exhausted or now - failing_since >= self._policy.failing_limit
        ):
            reason = DisabledReason.FAILING
        if reason is not None and webhook.enabled:
            disable[webhook.id] = reason.value
            events.append(
                new_event(
                    EventType.WEBHOOK_DISABLED,
                    tenant=webhook.tenant,
                    account_id=None,
                    created_at=now,
                    data=payload(
                        WebhookDisabled(webhook_id=webhook.id, url=webhook.url, reason=reason)
                    ),
                )
            )
        await self.repo.record(results, failing=failing, disable=disable, events=events, at=now)
        worker.webhook = msgspec.structs.replace(
            webhook,
            failing_since=failing_since,
            enabled=webhook.enabled and reason is None,
            disabled_reason=reason.value if reason else webhook.disabled_reason,
        )
        if reason is not None:
            log_event(
                logger,
                "webhook disabled",
                logging.WARNING,
                tenant=webhook.tenant,
                webhook_id=webhook.id,
                reason=reason.value,
            )

"""Prometheus metrics: what the service exposes at ``/metrics`` and how it is recorded.

A :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so
several apps in one process (tests) each count their own requests. Every metric of the
service is named ``mailroom_...`` so it cannot collide with another job's; the standard
``process_*`` and ``python_*`` series of the Prometheus client keep their usual names, which
dashboards and alerts everywhere expect. No ``_created`` series is exposed (they double the
series count and Prometheus does not need them).

==============================================  =========  ======================================
``mailroom_build_info``                         gauge      ``version``, ``python_version``
                                                           (always 1)
``mailroom_http_requests_total``                counter    ``method``, ``route``, ``status``
``mailroom_http_request_duration_seconds``      histogram  ``method``, ``route``
``mailroom_retrievals_total``                   counter    ``outcome`` (``succeeded`` /
                                                           ``failed``)
``mailroom_retrieval_duration_seconds``         histogram  ``outcome``: one POP3 retrieval, from
                                                           its start to its end
``mailroom_messages_downloaded_total``          counter
``mailroom_bytes_downloaded_total``             counter
``mailroom_delivery_attempts_total``            counter    ``outcome`` (``sent`` / ``deferred`` /
                                                           ``failed``)
``mailroom_delivery_latency_seconds``           histogram  accepted (202) -> sent
``mailroom_outbox_messages``                    gauge      ``status``: the outbox's depth by
                                                           status, counted at each scrape
``mailroom_outbox_oldest_unsent_age_seconds``   gauge      age of the oldest message accepted
                                                           and not yet sent nor failed (0: none)
``process_*``                                   various    CPU, memory, open files, start time
``python_info``, ``python_gc_*``                various    interpreter version, collections
==============================================  =========  ======================================

Label cardinality is bounded: ``route`` is the matched route *template*
(``/v1/accounts/{account_id}``), never the raw path, and ``unmatched`` when no route matched
(404/405); ``method`` is a standard HTTP method or ``OTHER``. Outcome and status values are
the small fixed sets of the service's enums; the known ones start at zero, so a rate over
them exists before the first event.

:class:`MetricsMiddleware` (pure ASGI) records the HTTP metrics; :func:`render` produces a
``/metrics`` response body.
"""

from __future__ import annotations

import hashlib
import hmac
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from service import __version__
from service.domain.enums import OutgoingStatus, RetrievalStatus
from service.errors import Unauthorized

NAMESPACE = "mailroom"
UNMATCHED_ROUTE = "unmatched"
OTHER_METHOD = "OTHER"
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# Status reported when the application fails without starting a response (the server
# answers 500 in that case).
NO_RESPONSE_STATUS = 500

# Seconds. Requests: from a cached GET (~1 ms) to a large upload or a slow database.
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds of one POP3 retrieval: an empty mailbox on loopback (~10 ms) up to a large mailbox
# over a slow link, bounded by the retrieval timeout (30 minutes by default).
RETRIEVAL_DURATION_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
# Seconds from acceptance to the server's 250: instant, or after retries that back off
# up to hours (the retry schedule) and give up after days (max_message_age).
DELIVERY_LATENCY_BUCKETS = (
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    432000.0,
)

RETRIEVAL_OUTCOMES = (RetrievalStatus.SUCCEEDED, RetrievalStatus.FAILED)
DELIVERY_OUTCOMES = (OutgoingStatus.SENT, OutgoingStatus.DEFERRED, OutgoingStatus.FAILED)
OUTBOX_STATUSES = tuple(OutgoingStatus)
# Statuses of a message accepted and not yet finished (sent, failed or cancelled).
UNSENT_STATUSES = (OutgoingStatus.QUEUED, OutgoingStatus.DEFERRED, OutgoingStatus.SENDING)

OUTBOX_METRIC = f"{NAMESPACE}_outbox_messages"
OUTBOX_HELP = "Messages in the outbox by status (as of the last count)"
OLDEST_UNSENT_METRIC = f"{NAMESPACE}_outbox_oldest_unsent_age_seconds"
OLDEST_UNSENT_HELP = (
    "Age of the oldest message accepted but not yet sent nor failed (queued, deferred or"
    " sending); 0 when there is none"
)
# Sample suffixes of the creation-time series that counters and histograms carry.
_CREATED_SUFFIXES = ("_created", "_gcreated")


class _OutboxCollector:
    """``mailroom_outbox_messages`` and the oldest unsent message's age, from the last
    snapshot they were given.

    A collector (not a ``Gauge``) because the counts come from the database: the owner sets
    a whole snapshot, and a scrape reads it without touching the database or the event loop.
    The snapshot is replaced by one reference assignment, so a scrape in another thread sees
    either the old or the new one, never a mix. The age is computed when scraped, from the
    oldest acceptance time, so it keeps growing between two snapshots.
    """

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._counts: Mapping[str, int] = MappingProxyType(dict.fromkeys(OUTBOX_STATUSES, 0))
        self._oldest_unsent: datetime | None = None

    def set(self, counts: Mapping[str, int]) -> None:
        snapshot = dict.fromkeys(map(str, OUTBOX_STATUSES), 0)
        for status, count in counts.items():
            if count < 0:
                raise ValueError(f"outbox count for {status!r} is negative: {count}")
            snapshot[str(status)] = int(count)
        self._counts = MappingProxyType(snapshot)

    def set_oldest_unsent(self, accepted_at: datetime | None) -> None:
        if accepted_at is not None and accepted_at.tzinfo is None:
            raise ValueError("the acceptance time must be timezone-aware (UTC)")
        self._oldest_unsent = accepted_at

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(OUTBOX_METRIC, OUTBOX_HELP, labels=["status"]),
            GaugeMetricFamily(OLDEST_UNSENT_METRIC, OLDEST_UNSENT_HELP),
        ]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(OUTBOX_METRIC, OUTBOX_HELP, labels=["status"])
        for status, count in sorted(self._counts.items()):
            family.add_metric([str(status)], count)
        oldest = self._oldest_unsent
        age = 0.0 if oldest is None else max((self._clock() - oldest).total_seconds(), 0.0)
        return [family, GaugeMetricFamily(OLDEST_UNSENT_METRIC, OLDEST_UNSENT_HELP, value=age)]


class _BuildInfoCollector:
    """``mailroom_build_info``: always 1, the version of the service and of Python as labels."""

    NAME = f"{NAMESPACE}_build_info"
    HELP = "Mailroom's version and the Python running it (the value is always 1)"

    def __init__(self, version: str) -> None:
        self._labels = {"version": version, "python_version": platform.python_version()}

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), 1)
        return [family]


class _WithoutCreated:
    """A read-only view of a registry without the ``_created`` series.

    The client library adds them to every counter and histogram; turning them off for the
    whole process is a global switch, so they are left out at exposition instead.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            samples = [s for s in family.samples if not s.name.endswith(_CREATED_SUFFIXES)]
            if len(samples) != len(family.samples):
                trimmed = Metric(family.name, family.documentation, family.type, family.unit)
                trimmed.samples = samples
                family = trimmed
            yield family


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Metrics:
    """Every metric of one application, in a registry of its own (``self.registry``).

    ``clock`` gives the current UTC time for the oldest-message age (tests pass their own).
    """

    def __init__(
        self, *, version: str = __version__, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ns = NAMESPACE
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            namespace=ns,
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency, from the request to the last byte of the response",
            ["method", "route"],
            buckets=HTTP_LATENCY_BUCKETS,
            namespace=ns,
            registry=registry,
        )
        self.retrievals = Counter(
            "retrievals",
            "POP3 retrievals finished, by outcome",
            ["outcome"],
            namespace=ns,
            registry=registry,
        )
        self.retrieval_duration = Histogram(
            "retrieval_duration_seconds",
            "Duration of a finished POP3 retrieval, from its start to its end, by outcome",
            ["outcome"],
            buckets=RETRIEVAL_DURATION_BUCKETS,
            namespace=ns,
            registry=registry,
        )
        self.messages_downloaded = Counter(
            "messages_downloaded",
            "Messages downloaded over POP3 and stored",
            namespace=ns,
            registry=registry,
        )
        self.bytes_downloaded = Counter(
            "bytes_downloaded",
            "Bytes of messages downloaded over POP3",
            namespace=ns,
            registry=registry,
        )
        self.delivery_attempts = Counter(
            "delivery_attempts",
            "SMTP delivery attempts by outcome (sent, deferred for a retry, failed for good)",
            ["outcome"],
            namespace=ns,
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "delivery_latency_seconds",
            "Time from accepting a message (202) to the SMTP server accepting it",
            buckets=DELIVERY_LATENCY_BUCKETS,
            namespace=ns,
            registry=registry,
        )
        self._outbox = _OutboxCollector(clock)
        registry.register(self._outbox)
        registry.register(_BuildInfoCollector(version))
        # The standard process_* and python_* series, in this registry rather than the
        # global one.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.exposed = _WithoutCreated(registry)
        for retrieval_outcome in RETRIEVAL_OUTCOMES:
            self.retrievals.labels(outcome=str(retrieval_outcome))
            self.retrieval_duration.labels(outcome=str(retrieval_outcome))
        for delivery_outcome in DELIVERY_OUTCOMES:
            self.delivery_attempts.labels(outcome=str(delivery_outcome))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (labels as the middleware derives them)."""
        self.http_requests.labels(method=method, route=route, status=str(status)).inc()
        self.http_request_duration.labels(method=method, route=route).observe(seconds)

    def record_retrieval(
        self, outcome: str, *, messages: int = 0, size: int = 0, seconds: float | None = None
    ) -> None:
        """A retrieval finished (``RetrievalStatus.SUCCEEDED``/``FAILED``).

        ``messages``/``size`` are what it downloaded and stored; a failed retrieval may have
        stored some messages before failing. Alternatively count downloads one by one with
        :meth:`record_download` and pass zeros here. ``seconds`` is how long it ran (None:
        unknown, e.g. it never started, and no duration is observed).
        """
        self.retrievals.labels(outcome=str(outcome)).inc()
        if seconds is not None:
            self.retrieval_duration.labels(outcome=str(outcome)).observe(max(seconds, 0.0))
        self.record_download(messages=messages, size=size)

    def record_download(self, *, messages: int = 1, size: int = 0) -> None:
        """``messages`` messages totalling ``size`` bytes were downloaded and stored."""
        if messages:
            self.messages_downloaded.inc(messages)
        if size:
            self.bytes_downloaded.inc(size)

    def record_delivery_attempt(self, outcome: str) -> None:
        """One SMTP attempt ended: ``OutgoingStatus.SENT``, ``DEFERRED`` or ``FAILED``."""
        self.delivery_attempts.labels(outcome=str(outcome)).inc()

    def observe_delivery_latency(self, seconds: float) -> None:
        """A message was sent ``seconds`` after it was accepted (call once, when sent)."""
        self.delivery_latency.observe(max(seconds, 0.0))

    def set_outbox_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the ``mailroom_outbox_messages`` snapshot; statuses not given count as zero.

        Cheap and synchronous: call it with counts read from the repository, periodically
        (a worker) or just before :func:`render` in the ``/metrics`` handler.
        """
        self._outbox.set(counts)

    def set_oldest_unsent(self, accepted_at: datetime | None) -> None:
        """When the oldest message not yet sent nor failed was accepted (None: there is none).

        The exposed age is computed at each scrape from this time.
        """
        self._outbox.set_oldest_unsent(accepted_at)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """A middleware factory: ``Litestar(middleware=[metrics.middleware])`` or
        ``wrap_router(app, metrics.middleware)`` (which also counts 404/405 as unmatched)."""
        return MetricsMiddleware(app, self)


def route_label(scope: Scope) -> str:
    """The matched route template (``/v1/accounts/{account_id}``) or ``unmatched``."""
    template = scope.get("path_template")
    if isinstance(template, str) and template:
        return template
    return UNMATCHED_ROUTE


def method_label(method: str) -> str:
    """The request method if it is a standard one, else ``OTHER`` (bounded cardinality)."""
    upper = method.upper()
    return upper if upper in KNOWN_METHODS else OTHER_METHOD


class MetricsMiddleware:
    """Pure ASGI middleware that records ``http_requests_total`` and the latency histogram.

    The route label is read from the scope after the application has run, so the same
    class works inside Litestar's per-route middleware stack and wrapped around the router
    (where routing failures show up as ``unmatched``). Only ``http`` scopes are measured.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await observe_request(self.app, scope, receive, send, self.metrics.observe_request)


RequestObserver = Callable[[str, str, int, float], None]  # method, route, status, seconds


async def observe_request(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, observer: RequestObserver
) -> None:
    """Run ``app`` for one request; an HTTP request is then reported to ``observer`` with
    its method and route labels, status (500 if no response started) and duration."""
    if scope["type"] != ScopeType.HTTP:
        await app(scope, receive, send)
        return
    status = NO_RESPONSE_STATUS
    started = time.perf_counter()

    async def send_observing(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await app(scope, receive, send_observing)
    finally:
        observer(
            method_label(str(scope.get("method", ""))),
            route_label(scope),
            status,
            time.perf_counter() - started,
        )


def check_metrics_token(token: str, authorization: Sequence[str]) -> None:
    """Raise ``Unauthorized`` unless ``authorization`` (the request's ``Authorization``
    headers) is exactly one ``Bearer <token>``; compared in constant time."""
    header = authorization[0] if len(authorization) == 1 else ""
    scheme, _, presented = header.partition(" ")
    expected = hashlib.sha256(token.encode("utf-8")).digest()
    given = hashlib.sha256(presented.strip().encode("utf-8", "surrogatepass")).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
        raise Unauthorized("send `Authorization: Bearer <metrics token>` (MAILROOM_METRICS_TOKEN)")


def render(metrics: Metrics, accept: str | None = None) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` response.

    Prometheus text format by default; pass the request's ``Accept`` header to answer
    OpenMetrics to a scraper that asks for it.
    """
    exposed = metrics.exposed
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(exposed), content_type
    return generate_latest(exposed), CONTENT_TYPE_LATEST

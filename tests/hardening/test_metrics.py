"""Prometheus metrics: HTTP metrics by route template through a real Litestar app, the
domain counters, the outbox gauge and the exposition format (parsed, not grepped)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import pytest
from litestar import Controller, Litestar, Request, Response, Router, get, post
from litestar.params import PathParameter
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.middleware import wrap_router
from service.domain.enums import OutgoingStatus, RetrievalStatus
from service.metrics import UNMATCHED_ROUTE, Metrics, render

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(metrics: Metrics) -> Samples:
    body, content_type = render(metrics)
    assert content_type.startswith("text/plain")
    return parse(body.decode())


class AccountController(Controller):
    path = "/accounts"

    @get("/{account_id:str}")
    async def get_account(self, account_id: Annotated[str, PathParameter()]) -> dict[str, str]:
        return {"id": account_id}


@get("/items/{item_id:int}")
async def get_item(item_id: Annotated[int, PathParameter()]) -> dict[str, int]:
    return {"id": item_id}


@post("/items")
async def create_item() -> Response[dict[str, str]]:
    return Response({"status": "created"}, status_code=201)


@get("/boom")
async def boom() -> None:
    raise RuntimeError("handler failed")


def build_app(metrics: Metrics, *, around_router: bool) -> Litestar:
    @get("/metrics", media_type="text/plain")
    async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
        body, content_type = render(metrics, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    handlers: list[Any] = [
        get_item,
        create_item,
        boom,
        metrics_endpoint,
        Router(path="/v1", route_handlers=[AccountController]),
    ]
    if around_router:
        return wrap_router(Litestar(route_handlers=handlers), metrics.middleware)
    return Litestar(route_handlers=handlers, middleware=[metrics.middleware])


@pytest.fixture(params=[True, False], ids=["around-router", "litestar-middleware"])
async def app_client(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Metrics, AsyncTestClient[Litestar], bool]]:
    metrics = Metrics()
    around = bool(request.param)
    async with AsyncTestClient(app=build_app(metrics, around_router=around)) as client:
        yield metrics, client, around


async def test_requests_are_counted_by_route_template(
    app_client: tuple[Metrics, AsyncTestClient[Litestar], bool],
) -> None:
    metrics, client, _ = app_client
    for item in (1, 2, 3):
        assert (await client.get(f"/items/{item}")).status_code == 200
    assert (await client.post("/items")).status_code == 201
    assert (await client.get("/v1/accounts/acc_123")).status_code == 200

    samples = scrape(metrics)
    requests = "mailroom_http_requests_total"
    assert value(samples, requests, method="GET", route="/items/{item_id}", status="200") == 3
    assert value(samples, requests, method="POST", route="/items", status="201") == 1
    assert (
        value(samples, requests, method="GET", route="/v1/accounts/{account_id}", status="200") == 1
    )
    # Raw paths never become label values.
    routes = {dict(labels).get("route") for (_, labels) in samples}
    assert not any(route and ("acc_123" in route or "/items/1" in route) for route in routes)

    duration = "mailroom_http_request_duration_seconds"
    assert value(samples, f"{duration}_count", method="GET", route="/items/{item_id}") == 3
    assert (
        value(samples, f"{duration}_bucket", method="GET", route="/items/{item_id}", le="+Inf") == 3
    )
    total = value(samples, f"{duration}_sum", method="GET", route="/items/{item_id}")
    assert total is not None and total >= 0


async def test_a_failing_handler_counts_as_500(
    app_client: tuple[Metrics, AsyncTestClient[Litestar], bool],
) -> None:
    metrics, client, _ = app_client
    assert (await client.get("/boom")).status_code == 500
    samples = scrape(metrics)
    assert (
        value(samples, "mailroom_http_requests_total", method="GET", route="/boom", status="500")
        == 1
    )


async def test_unmatched_requests(
    app_client: tuple[Metrics, AsyncTestClient[Litestar], bool],
) -> None:
    metrics, client, around_router = app_client
    assert (await client.get("/no/such/path/42")).status_code == 404
    assert (await client.get("/items/not-a-number")).status_code == 404  # :int does not match
    assert (await client.delete("/items/1")).status_code == 405
    assert (await client.request("BREW", "/items/1")).status_code in (404, 405)
    samples = scrape(metrics)
    unmatched = {
        (dict(labels)["method"], dict(labels)["status"]): count
        for (name, labels), count in samples.items()
        if name == "mailroom_http_requests_total" and dict(labels)["route"] == UNMATCHED_ROUTE
    }
    if around_router:
        # Routing failures are seen, under one bounded label, method included.
        assert unmatched[("GET", "404")] == 2
        assert unmatched[("DELETE", "405")] == 1
        assert sum(v for (method, _), v in unmatched.items() if method == "OTHER") == 1
    else:
        # Litestar runs app middleware only after routing: these never reach it.
        assert unmatched == {}


async def test_metrics_endpoint_serves_the_text_format(
    app_client: tuple[Metrics, AsyncTestClient[Litestar], bool],
) -> None:
    _, client, _ = app_client
    await client.get("/items/7")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse(response.text)
    assert (
        value(
            samples,
            "mailroom_http_requests_total",
            method="GET",
            route="/items/{item_id}",
            status="200",
        )
        == 1
    )
    openmetrics = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


def test_domain_metrics() -> None:
    metrics = Metrics()
    samples = scrape(metrics)
    # Known outcomes exist from the start, at zero.
    for outcome in ("succeeded", "failed"):
        assert value(samples, "mailroom_retrievals_total", outcome=outcome) == 0
    for outcome in ("sent", "deferred", "failed"):
        assert value(samples, "mailroom_delivery_attempts_total", outcome=outcome) == 0
    assert value(samples, "mailroom_messages_downloaded_total") == 0
    assert value(samples, "mailroom_bytes_downloaded_total") == 0

    metrics.record_retrieval(RetrievalStatus.SUCCEEDED, messages=3, size=30_000)
    metrics.record_retrieval(RetrievalStatus.FAILED, messages=1, size=512)
    metrics.record_retrieval(RetrievalStatus.SUCCEEDED)
    metrics.record_download(size=100)
    metrics.record_delivery_attempt(OutgoingStatus.DEFERRED)
    metrics.record_delivery_attempt(OutgoingStatus.SENT)
    metrics.observe_delivery_latency(0.7)
    metrics.observe_delivery_latency(3600.0)

    samples = scrape(metrics)
    assert value(samples, "mailroom_retrievals_total", outcome="succeeded") == 2
    assert value(samples, "mailroom_retrievals_total", outcome="failed") == 1
    assert value(samples, "mailroom_messages_downloaded_total") == 5
    assert value(samples, "mailroom_bytes_downloaded_total") == 30_612
    assert value(samples, "mailroom_delivery_attempts_total", outcome="deferred") == 1
    assert value(samples, "mailroom_delivery_attempts_total", outcome="sent") == 1
    assert value(samples, "mailroom_delivery_attempts_total", outcome="failed") == 0
    assert value(samples, "mailroom_delivery_latency_seconds_count") == 2
    assert value(samples, "mailroom_delivery_latency_seconds_sum") == pytest.approx(3600.7)
    assert value(samples, "mailroom_delivery_latency_seconds_bucket", le="1.0") == 1
    assert value(samples, "mailroom_delivery_latency_seconds_bucket", le="3600.0") == 2


def test_outbox_gauge_is_the_last_snapshot() -> None:
    metrics = Metrics()
    samples = scrape(metrics)
    for status in OutgoingStatus:
        assert value(samples, "mailroom_outbox_messages", status=status.value) == 0

    metrics.set_outbox_counts({OutgoingStatus.QUEUED: 4, "deferred": 2, OutgoingStatus.SENT: 9})
    samples = scrape(metrics)
    assert value(samples, "mailroom_outbox_messages", status="queued") == 4
    assert value(samples, "mailroom_outbox_messages", status="deferred") == 2
    assert value(samples, "mailroom_outbox_messages", status="sent") == 9
    assert value(samples, "mailroom_outbox_messages", status="failed") == 0

    # A status missing from the next snapshot drops back to zero.
    metrics.set_outbox_counts({"sent": 10})
    samples = scrape(metrics)
    assert value(samples, "mailroom_outbox_messages", status="queued") == 0
    assert value(samples, "mailroom_outbox_messages", status="sent") == 10

    with pytest.raises(ValueError, match="negative"):
        metrics.set_outbox_counts({"queued": -1})
    assert value(scrape(metrics), "mailroom_outbox_messages", status="sent") == 10


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.record_delivery_attempt("sent")
    assert value(scrape(first), "mailroom_delivery_attempts_total", outcome="sent") == 1
    assert value(scrape(second), "mailroom_delivery_attempts_total", outcome="sent") == 0


@pytest.mark.parametrize(
    ("method", "label"), [("get", "GET"), ("PATCH", "PATCH"), ("BREW", "OTHER"), ("", "OTHER")]
)
def test_method_label_is_bounded(method: str, label: str) -> None:
    from service.metrics import method_label

    assert method_label(method) == label


async def test_middleware_passes_other_scopes_through() -> None:
    from service.metrics import MetricsMiddleware

    seen: list[str] = []

    async def app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        seen.append(scope["type"])

    metrics = Metrics()
    await MetricsMiddleware(app, metrics)({"type": "websocket"}, None, None)  # type: ignore[arg-type]
    assert seen == ["websocket"]
    assert not [k for k in scrape(metrics) if k[0] == "mailroom_http_requests_total"]


def test_every_service_metric_is_prefixed_and_no_created_series() -> None:
    metrics = Metrics()
    metrics.record_retrieval(RetrievalStatus.SUCCEEDED, seconds=1.0)
    metrics.record_delivery_attempt(OutgoingStatus.SENT)
    metrics.observe_delivery_latency(1.0)
    metrics.observe_request("GET", "/health", 200, 0.001)
    for accept in (None, "application/openmetrics-text; version=1.0.0"):
        body, _ = render(metrics, accept)
        families = list(text_string_to_metric_families(body.decode()))
        names = {family.name for family in families}
        # The client library's standard process and interpreter series keep their names.
        own = {name for name in names if not name.startswith(("process_", "python_"))}
        assert own and all(name.startswith("mailroom_") for name in own), own
        assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= {
            name.removesuffix("_total") for name in names
        }
        assert "python_gc_collections" in {name.removesuffix("_total") for name in names}
        samples = [s.name for family in families for s in family.samples]
        assert not [name for name in samples if name.endswith("_created")]
        assert b"_created" not in body


def test_build_info() -> None:
    import platform

    samples = scrape(Metrics(version="1.2.3"))
    build = {labels: v for (name, labels), v in samples.items() if name == "mailroom_build_info"}
    assert build == {
        frozenset({("version", "1.2.3"), ("python_version", platform.python_version())}): 1
    }
    from service import __version__

    assert (
        value(
            scrape(Metrics()),
            "mailroom_build_info",
            version=__version__,
            python_version=platform.python_version(),
        )
        == 1
    )


def test_retrieval_duration_histogram() -> None:
    metrics = Metrics()
    samples = scrape(metrics)
    for outcome in ("succeeded", "failed"):
        assert value(samples, "mailroom_retrieval_duration_seconds_count", outcome=outcome) == 0
    metrics.record_retrieval(RetrievalStatus.SUCCEEDED, messages=2, size=10, seconds=0.2)
    metrics.record_retrieval(RetrievalStatus.SUCCEEDED, seconds=42.0)
    metrics.record_retrieval(RetrievalStatus.FAILED, seconds=3.0)
    metrics.record_retrieval(RetrievalStatus.FAILED)  # never started: counted, not timed
    samples = scrape(metrics)
    name = "mailroom_retrieval_duration_seconds"
    assert value(samples, f"{name}_count", outcome="succeeded") == 2
    assert value(samples, f"{name}_sum", outcome="succeeded") == pytest.approx(42.2)
    assert value(samples, f"{name}_bucket", outcome="succeeded", le="0.25") == 1
    assert value(samples, f"{name}_bucket", outcome="succeeded", le="60.0") == 2
    assert value(samples, f"{name}_count", outcome="failed") == 1
    assert value(samples, "mailroom_retrievals_total", outcome="failed") == 2


def test_oldest_unsent_age_is_computed_at_each_scrape() -> None:
    from datetime import UTC, datetime, timedelta

    now = [datetime(2030, 1, 1, 12, 0, tzinfo=UTC)]
    metrics = Metrics(clock=lambda: now[0])
    name = "mailroom_outbox_oldest_unsent_age_seconds"
    assert value(scrape(metrics), name) == 0  # nothing waiting
    metrics.set_oldest_unsent(now[0] - timedelta(seconds=90))
    assert value(scrape(metrics), name) == 90
    now[0] += timedelta(seconds=30)  # no new snapshot: the age still grows
    assert value(scrape(metrics), name) == 120
    metrics.set_oldest_unsent(now[0] + timedelta(seconds=5))  # clock skew: never negative
    assert value(scrape(metrics), name) == 0
    metrics.set_oldest_unsent(None)
    assert value(scrape(metrics), name) == 0
    with pytest.raises(ValueError, match="timezone"):
        metrics.set_oldest_unsent(datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        (["Bearer metrics-token-1"], True),
        (["bearer   metrics-token-1 "], True),
        ([], False),
        (["Bearer wrong"], False),
        (["Basic metrics-token-1"], False),
        (["metrics-token-1"], False),
        (["Bearer metrics-token-1", "Bearer metrics-token-1"], False),
    ],
)
def test_metrics_token_check(headers: list[str], accepted: bool) -> None:
    from service.errors import Unauthorized
    from service.metrics import check_metrics_token

    if accepted:
        check_metrics_token("metrics-token-1", headers)
    else:
        with pytest.raises(Unauthorized):
            check_metrics_token("metrics-token-1", headers)


async def test_metrics_endpoint_of_the_app(tmp_path: Any) -> None:
    """The real app on its store (both stores on the PostgreSQL pass): the bearer token
    setting, the outbox gauges read from the store, HEAD counted as HEAD."""
    from datetime import datetime

    from service.app import create_app
    from service.config import parse_networks
    from tests.api.conftest import API_KEY, account_body, make_settings
    from tests.process import free_port

    closed_port = free_port()  # nothing listens: every delivery attempt is deferred
    settings = make_settings(
        tmp_path,
        metrics_token="scrape-token-0123",
        allowed_networks=parse_networks("127.0.0.0/8"),
    )
    auth = {"Authorization": "Bearer scrape-token-0123"}
    async with AsyncTestClient(app=create_app(settings)) as client:
        refused = await client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "unauthorized"
        api_key = {"Authorization": f"Bearer {API_KEY}"}
        assert (await client.get("/metrics", headers=api_key)).status_code == 401

        first = await client.get("/metrics", headers=auth)
        assert first.status_code == 200
        # One charset, though both prometheus-client and Litestar would add one.
        assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = parse(first.text)
        assert value(samples, "mailroom_outbox_oldest_unsent_age_seconds") == 0

        body = account_body()
        body["outgoing"] = {"host": "127.0.0.1", "port": closed_port, "security": "none"}
        created = await client.post("/v1/accounts", json=body, headers=api_key)
        assert created.status_code == 201, created.text
        account_id = created.json()["id"]
        sent = await client.post(
            f"/v1/accounts/{account_id}/outbox",
            json={"to": ["bob@example.com"], "subject": "s", "text": "t"},
            headers=api_key,
        )
        assert sent.status_code == 202, sent.text
        accepted_at = datetime.fromisoformat(sent.json()["created_at"])

        assert (await client.head("/health")).status_code == 200
        before = datetime.now(accepted_at.tzinfo)
        scraped = await client.get("/metrics", headers=auth)
        after = datetime.now(accepted_at.tzinfo)
        samples = parse(scraped.text)
        unsent = sum(
            value(samples, "mailroom_outbox_messages", status=s) or 0
            for s in ("queued", "sending", "deferred")
        )
        assert unsent == 1
        age = value(samples, "mailroom_outbox_oldest_unsent_age_seconds")
        assert age is not None
        # The message's age, as of some moment during the scrape (1 ms: stored precision).
        assert (before - accepted_at).total_seconds() - 0.001 <= age
        assert age <= (after - accepted_at).total_seconds() + 0.001
        head = ("mailroom_http_requests_total", "HEAD", "/health", "200")
        assert value(samples, head[0], method=head[1], route=head[2], status=head[3]) == 1


def test_every_metric_is_documented_in_the_readme() -> None:
    from tests.process import ROOT

    readme = (ROOT / "README.md").read_text()
    body, _ = render(Metrics())
    families = list(text_string_to_metric_families(body.decode()))
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in families
        if family.name.startswith("mailroom_")
    }
    assert len(names) >= 11
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert not missing, f"metrics missing from the README: {missing}"
    assert "`process_*`" in readme and "`python_info`" in readme

"""Request ids: taken when safe, made otherwise, echoed, put in error bodies and log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.testing import AsyncTestClient

from service.api.middleware import (
    MAX_REQUEST_ID_LENGTH,
    RequestIdMiddleware,
    is_safe_request_id,
    request_id_from_headers,
    wrap_router,
)
from service.api.problems import http_exception_handler, internal_error_handler
from service.config import Settings
from service.context import RequestIdFilter, current_request_id, request_id_var
from service.logs import JsonFormatter, TextFormatter, configure_logging

GENERATED = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger("mailroom.test.request_id")


@get("/echo")
async def echo(request: Request[Any, Any, Any]) -> dict[str, str | None]:
    log.info("handling echo")
    return {"state": request.state.get("request_id"), "context": current_request_id()}


@get("/own-header")
async def own_header() -> Response[str]:
    return Response("x", headers={"X-Request-ID": "set-by-handler"})


@get("/fail")
async def fail() -> None:
    raise RuntimeError("boom")


def build_app(*, around_router: bool) -> Litestar:
    handlers = [echo, own_header, fail]
    exception_handlers: Any = {
        HTTPException: http_exception_handler,
        Exception: internal_error_handler,
    }
    if around_router:
        app = Litestar(route_handlers=handlers, exception_handlers=exception_handlers)
        return wrap_router(app, RequestIdMiddleware)
    return Litestar(
        route_handlers=handlers,
        exception_handlers=exception_handlers,
        middleware=[RequestIdMiddleware],
    )


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@pytest.fixture(params=[True, False], ids=["around-router", "litestar-middleware"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=build_app(around_router=bool(request.param))) as test_client:
        yield test_client


async def test_a_safe_id_is_echoed(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/echo", headers={"X-Request-ID": "Abc-123_x.y"})
    assert response.headers["x-request-id"] == "Abc-123_x.y"
    assert response.json() == {"state": "Abc-123_x.y", "context": "Abc-123_x.y"}


async def test_an_id_is_made_when_none_is_given(client: AsyncTestClient[Litestar]) -> None:
    first = await client.get("/echo")
    second = await client.get("/echo")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(GENERATED.fullmatch(i) for i in ids)
    assert ids[0] != ids[1]
    assert first.json()["state"] == ids[0]


@pytest.mark.parametrize(
    "unsafe",
    [
        b"",
        b"a" * (MAX_REQUEST_ID_LENGTH + 1),
        b"has space",
        b"semi;colon",
        b"<script>",
        b"a/b",
        b"caf\xc3\xa9",
        b"tab\there",
        b'quote"d',
        b"%0d%0aSet-Cookie",
    ],
)
async def test_unsafe_ids_are_replaced(client: AsyncTestClient[Litestar], unsafe: bytes) -> None:
    response = await client.get("/echo", headers=[(b"X-Request-ID", unsafe)])
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    assert response.json()["state"] == request_id


async def test_the_longest_safe_id_is_kept(client: AsyncTestClient[Litestar]) -> None:
    longest = "z" * MAX_REQUEST_ID_LENGTH
    response = await client.get("/echo", headers={"X-Request-ID": longest})
    assert response.headers["x-request-id"] == longest


async def test_the_response_carries_exactly_one_id(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/own-header", headers={"X-Request-ID": "mine"})
    assert response.headers.get_list("x-request-id") == ["mine"]


async def test_error_bodies_carry_the_id(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/fail", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    assert response.json()["request_id"] == "req-500"


async def test_routing_failures_carry_the_id_around_the_router() -> None:
    async with AsyncTestClient(app=build_app(around_router=True)) as client:
        for response in (
            await client.get("/nowhere", headers={"X-Request-ID": "req-404"}),
            await client.post("/echo", headers={"X-Request-ID": "req-405"}),
        ):
            expected = f"req-{response.status_code}"
            assert response.status_code in (404, 405)
            assert response.headers["x-request-id"] == expected
            assert response.json()["request_id"] == expected


async def test_log_lines_during_a_request_carry_its_id(
    client: AsyncTestClient[Litestar], captured: Capture
) -> None:
    await client.get("/echo", headers={"X-Request-ID": "log-me"})
    await client.get("/fail", headers={"X-Request-ID": "log-failure"})
    mine = [r for r in captured.records if r.name == log.name]
    assert [r.request_id for r in mine] == ["log-me"]  # type: ignore[attr-defined]
    errors = [r for r in captured.records if r.name == "mailroom.api"]
    assert errors
    assert {r.request_id for r in errors} == {"log-failure"}  # type: ignore[attr-defined]
    assert current_request_id() is None


async def test_configure_logging_tags_json_and_text_lines(
    client: AsyncTestClient[Litestar], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging(Settings(database=str(tmp_path / "db"), log_format="json"))
        await client.get("/echo", headers={"X-Request-ID": "json-line"})
        log.info("outside any request")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        inside = [e for e in lines if e["message"] == "handling echo"]
        assert [e["request_id"] for e in inside] == ["json-line"]
        outside = [e for e in lines if e["message"] == "outside any request"]
        assert outside and "request_id" not in outside[0]

        configure_logging(Settings(database=str(tmp_path / "db"), log_format="text"))
        await client.get("/echo", headers={"X-Request-ID": "text-line"})
        log.info("outside again")
        text = capsys.readouterr().err
        assert re.search(
            r" INFO mailroom\.test\.request_id \[text-line\] handling echo$", text, re.M
        )
        assert re.search(r" INFO mailroom\.test\.request_id outside again$", text, re.M)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_formatters_without_the_filter() -> None:
    """Records that never met the filter (no ``request_id`` attribute) still format."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", None, None)
    assert "request_id" not in json.loads(JsonFormatter().format(record))
    assert TextFormatter().format(record).endswith(" INFO x plain")


def test_an_explicit_request_id_is_kept() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("mailroom.test.explicit")
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id_var.set("from-context")
    try:
        logger.warning("a", extra={"request_id": "explicit"})
        logger.warning("b")
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
        logger.propagate = True
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert ids == ["explicit", "from-context"]


async def test_concurrent_requests_keep_their_own_ids() -> None:
    """Each request's context is its own, however their awaits interleave."""
    seen: list[tuple[str, str | None]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(3):
            seen.append((scope["state"]["request_id"], current_request_id()))
            await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RequestIdMiddleware(app)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    def scope(request_id: str) -> dict[str, Any]:
        return {"type": "http", "headers": [(b"x-request-id", request_id.encode())]}

    await asyncio.gather(*(middleware(scope(f"r{i}"), None, send) for i in range(5)))  # type: ignore[arg-type]
    assert len(seen) == 15
    assert all(state == context for state, context in seen)
    assert {state for state, _ in seen} == {f"r{i}" for i in range(5)}
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert sorted(dict(m["headers"])[b"x-request-id"] for m in starts) == [
        f"r{i}".encode() for i in range(5)
    ]
    assert current_request_id() is None


async def test_websocket_accept_carries_the_id_and_lifespan_passes() -> None:
    sent: list[dict[str, Any]] = []
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept", "subprotocol": None})

    async def send(message: Any) -> None:
        sent.append(message)

    middleware = RequestIdMiddleware(app)
    await middleware({"type": "websocket", "headers": []}, None, send)  # type: ignore[arg-type]
    await middleware({"type": "lifespan"}, None, send)  # type: ignore[arg-type]
    request_id = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert GENERATED.fullmatch(request_id)
    assert scopes[0]["state"]["request_id"] == request_id
    assert "state" not in scopes[1]


@given(st.text(max_size=80))
def test_is_safe_request_id_matches_the_rule(value: str) -> None:
    expected = 0 < len(value) <= MAX_REQUEST_ID_LENGTH and all(
        c.isascii() and (c.isalnum() or c in "._-") for c in value
    )
    assert is_safe_request_id(value) is expected


@given(st.binary(max_size=80))
def test_any_header_bytes_give_a_safe_id(raw: bytes) -> None:
    request_id = request_id_from_headers([(b"X-Request-Id", raw)])
    assert is_safe_request_id(request_id)
    if request_id != raw.decode("latin-1"):
        assert GENERATED.fullmatch(request_id)

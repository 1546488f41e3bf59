"""Open probes: liveness and readiness.

``/health`` answers 200 while the process serves HTTP, whatever the store's state, so an
orchestrator does not restart a service that only waits for disk space. ``/ready`` answers
503 with a ``code`` while the service cannot take writes: ``storage_full`` while the disk
is full (only then does the probe try a real small write, so ordinary probes stay cheap
reads), ``storage_unavailable`` while the database cannot be reached (the probe is a real
round trip to it), ``unavailable`` while the store is not open or not migrated.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIType

from service import __version__
from service.api.problems import OPEN_ROUTE_ERRORS, problem_spec
from service.api.schemas import Health, Readiness
from service.codes import ErrorCode
from service.repository.errors import RepositoryError, StoreUnavailableError
from service.repository.store import Store

OPENMETRICS = "application/openmetrics-text"
METRICS_DESCRIPTION = (
    "Prometheus text exposition format, or OpenMetrics when `Accept` asks for"
    " `application/openmetrics-text`. Open unless `MAILROOM_METRICS_TOKEN` is set; then it"
    " needs `Authorization: Bearer <that token>` (not an API key)."
)
METRICS_ERRORS = {
    401: problem_spec(
        "`MAILROOM_METRICS_TOKEN` is set and the request does not bear it (`unauthorized`)",
        ErrorCode.UNAUTHORIZED,
    ),
    **OPEN_ROUTE_ERRORS,
}


@dataclass
class MetricsOperation(Operation):
    """Documents the 200 response as Prometheus text or OpenMetrics."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            text = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
            ok.content = {"text/plain": text, OPENMETRICS: text}


class HealthController(Controller):
    tags = ["Health"]

    @get(
        "/health",
        operation_id="GetHealth",
        summary="Liveness: the process is up",
        description="200 while the process serves HTTP, whatever the store's state (see"
        " `/ready`), so an orchestrator does not restart a service that only waits for disk"
        " space. Open: no API key.",
        responses=OPEN_ROUTE_ERRORS,
    )
    async def health(self) -> Health:
        return Health(status="ok", version=__version__)

    @get(
        "/ready",
        operation_id="GetReadiness",
        summary="Readiness: the database answers, its migrations are applied, writes fit",
        description="503 with `code` while not ready: `storage_full` (the disk is full;"
        " each probe tries a small write and answers 200 once it succeeds),"
        " `storage_unavailable` (the database cannot be reached) or"
        " `unavailable` (the store cannot be opened yet). Open: no API key.",
        responses={
            **OPEN_ROUTE_ERRORS,
            503: ResponseSpec(
                data_container=Readiness,
                description="Not ready; `code` says why",
                generate_examples=False,
            ),
        },
    )
    async def ready(self, state: State) -> Response[Readiness]:
        db: Store = state.store
        if db.storage_full:
            try:
                await db.probe_write()
            except RepositoryError:
                pass  # still full (or failing): reported below
        unreachable = False
        try:
            version = await db.schema_version()  # a round trip to the database
        except StoreUnavailableError:
            version, unreachable = -1, True
        except RepositoryError:
            version = -1
        code: ErrorCode | None = None
        if db.storage_full:
            code = ErrorCode.STORAGE_FULL
        elif unreachable:
            code = ErrorCode.STORAGE_UNAVAILABLE
        elif version != db.latest_version:
            code = ErrorCode.UNAVAILABLE
        body = Readiness(
            status="not_ready" if code else "ready",
            schema_version=version,
            expected_schema_version=db.latest_version,
            code=code,
        )
        return Response(body, status_code=503 if code else 200)

"""Open probes: liveness and readiness."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State

from service import __version__
from service.api.schemas import Health, Readiness
from service.repository.database import Database
from service.repository.errors import RepositoryError


class HealthController(Controller):
    tags = ["Health"]

    @get("/health", operation_id="GetHealth", summary="Liveness: the process is up")
    async def health(self) -> Health:
        return Health(status="ok", version=__version__)

    @get(
        "/ready",
        operation_id="GetReadiness",
        summary="Readiness: the database answers and its migrations are applied",
        responses={},
    )
    async def ready(self, state: State) -> Response[Readiness]:
        db: Database = state.db
        try:
            version = await db.schema_version()
        except RepositoryError:
            version = -1
        ok = version == db.latest_version
        body = Readiness(
            status="ready" if ok else "not_ready",
            schema_version=version,
            expected_schema_version=db.latest_version,
        )
        return Response(body, status_code=200 if ok else 503)

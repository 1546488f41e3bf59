"""The Litestar application: lifespan, dependency injection, routes, OpenAPI, errors.

``create_app(settings)`` has no side effects: the database, keys and background workers
are opened in the lifespan, so tests build apps on temporary databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Litestar, Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, License, SecurityScheme, Server

from service import __version__
from service.api.accounts import AccountController
from service.api.auth import KeyRing, hash_key, require_api_key
from service.api.autoconfig import SetupController
from service.api.events import EventController
from service.api.head import HeadMiddleware
from service.api.health import (
    METRICS_DESCRIPTION,
    METRICS_ERRORS,
    HealthController,
    MetricsOperation,
)
from service.api.middleware import (
    AccessLogMiddleware,
    RequestIdMiddleware,
    check_json_request,
    wrap_router,
)
from service.api.outbox import OutboxController
from service.api.problems import (
    http_exception_handler,
    internal_error_handler,
    repository_error_handler,
    service_error_handler,
)
from service.api.requests import AllowHeaderMiddleware, RequestSchemaPlugin, StrictJSONRequest
from service.api.retrievals import MessageController, RetrievalController
from service.api.spec import MailroomOpenAPIConfig, ResponseSchemaPlugin
from service.api.webhooks import WebhookController
from service.config import DEFAULT_TENANT, Role, Settings
from service.crypto import CredentialCipher, load_or_create_keys
from service.docs import OfflineSwaggerRenderPlugin
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval
from service.errors import ServiceError
from service.metrics import Metrics, check_metrics_token, render
from service.netguard import ConnectionGuard
from service.repository.api_keys import ApiKeyRepository
from service.repository.errors import RepositoryError, StorageFullError, StoreUnavailableError
from service.repository.stats import StatsRepository
from service.repository.store import create_store
from service.roles import QueuingRetrievalService, queued_claimer
from service.services.accounts import AccountService
from service.services.autoconfig import Autoconfigurator
from service.services.bounces import BounceService
from service.services.connect import MailConnector
from service.services.delivery import DeliveryPolicy, DeliveryWorker, LocalSession
from service.services.delivery_process import DeliveryProcess
from service.services.events import EventFeed, EventPruner
from service.services.leases import lease_length
from service.services.messages import MessageService
from service.services.oauth import OAuthTokens
from service.services.presets import PresetCatalog
from service.services.retrieval import RetrievalObserver, RetrievalService
from service.services.scheduler import Scheduler
from service.services.sending import SendingService, SendLimits
from service.services.verify import AccountVerifier
from service.services.webhooks import (
    RetryPolicy,
    WebhookDispatcher,
    WebhookSender,
    WebhookService,
)

logger = logging.getLogger("mailroom")

OPENAPI_PATH = "/docs"
# The project ships no open-source license: the document says so.
LICENSE_NAME = "Proprietary"
LICENSE_ID = "LicenseRef-Proprietary"  # SPDX's form for a license it does not list
DEFAULTS = Settings()  # the listen address of a service started with no settings
GENERATED_KEY_PREFIX = "mr_"
# Startup steps that found the disk full are tried again in the background, this often
# (doubling up to the maximum), so the service starts and /ready reports `storage_full`.
STARTUP_RETRY_S = 1.0
STARTUP_RETRY_MAX_S = 30.0

StartupStep = tuple[str, Callable[[], Awaitable[object]]]


def openapi_config() -> OpenAPIConfig:
    """The OpenAPI document's settings; ``MailroomOpenAPIConfig`` finishes the document."""
    return MailroomOpenAPIConfig(
        title="Mailroom",
        version=__version__,
        description=(
            "Mail accounts as a service: POP3 retrieval into a local store, SMTP delivery"
            " from a durable outbox. Errors are RFC 9457 `application/problem+json` with a"
            " stable `code`."
        ),
        path=OPENAPI_PATH,
        render_plugins=[
            JsonRenderPlugin(path="/openapi.json"),
            # Swagger UI with its assets served from here: the docs work offline.
            OfflineSwaggerRenderPlugin(docs_path=OPENAPI_PATH),
        ],
        components=Components(
            security_schemes={
                "BearerAuth": SecurityScheme(
                    type="http", scheme="bearer", description="An API key of this service"
                )
            }
        ),
        servers=[
            Server(
                url=f"http://{DEFAULTS.host}:{DEFAULTS.port}",
                description="A Mailroom started with the default settings; point a client"
                " at your deployment's URL instead",
            )
        ],
        license=License(name=LICENSE_NAME, identifier=LICENSE_ID),
        use_handler_docstrings=False,
        create_examples=False,
    )


async def _key_ring(settings: Settings, repo: ApiKeyRepository) -> KeyRing:
    """Configured keys, else the stored generated ones; on first start, generate one."""
    if settings.api_keys:
        return KeyRing([(k.tenant, hash_key(k.key)) for k in settings.api_keys])
    stored = await repo.all()
    if not stored:
        key = GENERATED_KEY_PREFIX + secrets.token_urlsafe(32)
        await repo.add(DEFAULT_TENANT, hash_key(key))
        stored = await repo.all()
        # Printed once, never logged: only its hash is stored.
        print(
            f"Mailroom generated an API key (shown only this once): {key}",
            file=sys.stdout,
            flush=True,
        )
    return KeyRing(stored)


def create_app(settings: Settings) -> Litestar:
    """Build the application for ``settings`` (nothing is opened until startup)."""
    metrics = Metrics()  # one registry per app, so apps in one process do not clash

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = create_store(settings)
        app.state.store = store
        # The store's own database object, for tests that look inside the store.
        app.state.db = getattr(store, "db", None)
        app.state.key_ring = None  # 503 until loaded (configured keys: at once)
        if settings.api_keys:
            app.state.key_ring = await _key_ring(settings, store.api_keys)

        async def load_stored_keys() -> None:
            app.state.key_ring = await _key_ring(settings, store.api_keys)

        # The store may be full or unreachable: what needs it waits in the background.
        pending = await _run_startup_steps([("open the database", store.open)])
        try:
            cipher = CredentialCipher(load_or_create_keys(settings))
            presets = PresetCatalog(settings.presets_file)
            app.state.presets = presets
            app.state.autoconfig = Autoconfigurator(
                settings.allowed_networks,
                presets,
                timeout_s=settings.autoconfig_timeout_s,
                ispdb_url=settings.ispdb_url,
                dns_servers=settings.dns_servers,
                ca_file=settings.ca_file,
                ehlo=settings.ehlo_name,
            )
            account_repo = store.accounts
            connector_guard = ConnectionGuard(settings.allowed_networks)
            connector = MailConnector(
                connector_guard,
                ca_file=settings.ca_file,
                pop3_timeout_s=settings.pop3_timeout_s,
                connect_timeout_s=settings.connect_timeout_s,
                ehlo_name=settings.ehlo_name,
            )
            accounts = AccountService(
                account_repo,
                cipher,
                max_message_bytes=settings.max_message_bytes,
                host_check=connector.check_account,
                notifier=store.notifier,
                presets=presets,
                oauth=OAuthTokens(
                    account_repo,
                    cipher,
                    connector_guard,
                    ca_file=settings.ca_file,
                    margin_s=settings.oauth_refresh_margin_s,
                ),
            )
            # This process's id on the work it holds (claims and retrievals under a lease).
            owner = new_id("rep")
            # A SQLite file has one process: at start, all work left in flight is its own.
            exclusive = store.kind == "sqlite"
            retrievals = store.retrievals
            messages = store.messages
            # An API-only process stores retrieval triggers for the workers (service.roles).
            retrieval_service = (
                QueuingRetrievalService if settings.role is Role.API else RetrievalService
            )
            retrieval = retrieval_service(
                accounts=accounts,
                account_repo=account_repo,
                retrievals=retrievals,
                messages=messages,
                connector=connector,
                max_message_bytes=settings.max_message_bytes,
                max_concurrent=settings.max_concurrent_retrievals,
                max_per_tenant=settings.retrievals_per_tenant,
                session_timeout_s=settings.retrieval_timeout_s,
                min_transfer_rate=settings.min_transfer_rate,
                on_finished=_retrieval_metrics(metrics),
                owner=owner,
                exclusive=exclusive,
                lease_s=settings.lease_s,
                notifier=store.notifier,
            )
            scheduler = Scheduler(
                account_repo,
                retrieval,
                tick_s=settings.scheduler_interval_s,
                lease_s=lease_length(settings.lease_s),
                spread_s=settings.poll_spread_s,
                notifier=store.notifier,
            )
            outbox = store.outbox
            # SMTP in a child process, so accepting and delivering use two cores; this
            # process still makes every store write (one SQLite writer).
            delivery_process = (
                DeliveryProcess()
                if settings.delivers_in_child and settings.role.runs_work
                else None
            )
            app.state.delivery_process = delivery_process
            delivery = DeliveryWorker(
                outbox,
                accounts,
                account_repo,
                connector,
                policy=DeliveryPolicy(
                    retry_delays_s=settings.retry_delays_s,
                    retry_jitter=settings.retry_jitter,
                    concurrency=settings.smtp_concurrency,
                    max_sessions_per_tenant=settings.smtp_sessions_tenant_share,
                    attempt_timeout_s=settings.smtp_attempt_timeout_s,
                ),
                owner=owner,
                exclusive=exclusive,
                lease_s=settings.lease_s,
                notifier=store.notifier,
                metrics=metrics,
                sessions=LocalSession if delivery_process is None else delivery_process.session,
            )
            app.state.accounts = accounts
            app.state.verifier = AccountVerifier(
                accounts, connector, timeout_s=settings.verify_timeout_s
            )
            app.state.stats = store.stats
            app.state.retrievals = retrieval
            app.state.messages = MessageService(accounts, messages, store.bounces)
            # Stored DSNs tied to the outgoing messages they report (after each batch).
            bounces = BounceService(store.bounces)
            app.state.outbox = SendingService(
                accounts,
                outbox,
                limits=SendLimits(
                    max_recipients=settings.max_recipients,
                    max_attachment_bytes=settings.max_attachment_bytes,
                    max_send_bytes=settings.max_send_bytes,
                    max_message_age_s=settings.max_message_age_s,
                    send_at_horizon_s=settings.send_at_horizon_s,
                ),
                notifier=store.notifier,
                messages=app.state.messages,
            )
            app.state.delivery = delivery
            runs_work = settings.role.runs_work
            # Events: the pull feed, retention, webhook endpoints and their delivery.
            webhook_sender = WebhookSender(
                connector_guard, timeout_s=settings.webhook_timeout_s, ca_file=settings.ca_file
            )
            webhooks = WebhookService(
                store.webhooks,
                account_repo,
                cipher,
                webhook_sender,
                secret_grace_s=settings.webhook_secret_grace_s,
            )
            app.state.webhooks = webhooks
            app.state.feed = EventFeed(store.events, store.notifier)
            pruner = EventPruner(store.events, retention_days=settings.event_retention_days)
            webhook_dispatcher = (
                WebhookDispatcher(
                    store.webhooks,
                    webhooks,
                    webhook_sender,
                    store.notifier,
                    owner=owner,
                    exclusive=exclusive,
                    policy=RetryPolicy(
                        base_s=settings.webhook_retry_base_s,
                        max_s=settings.webhook_retry_max_s,
                        window_s=settings.webhook_retry_window_s,
                    ),
                    concurrency=settings.webhook_concurrency,
                    timeout_s=settings.webhook_timeout_s,
                )
                if runs_work
                else None
            )
            # A worker takes over the retrievals API-only processes queued (PostgreSQL).
            claimer = (
                queued_claimer(
                    retrievals,
                    account_repo=account_repo,
                    service=retrieval,
                    notifier=store.notifier,
                    owner=owner,
                    lease_s=settings.lease_s,
                )
                if runs_work
                else None
            )
            load_keys = not settings.api_keys and settings.role.serves_api
            steps: list[StartupStep] = [
                *([("load the API keys", load_stored_keys)] if load_keys else []),
                *(
                    [
                        ("close interrupted retrievals", retrieval.start),
                        # The delivery dispatcher starts only once its recovery succeeded.
                        ("requeue interrupted deliveries", delivery.start),
                        ("link stored bounces", bounces.start),
                        *(
                            [("start webhook delivery", webhook_dispatcher.start)]
                            if webhook_dispatcher is not None
                            else []
                        ),
                    ]
                    if runs_work
                    else []
                ),
            ]
            pending = pending + steps if pending else await _run_startup_steps(steps)
            recovery = asyncio.create_task(_retry_startup_steps(pending), name="startup recovery")
            # After every subscription above; wake-ups are hints, polling is the fallback.
            await store.notifier.start()
            if runs_work:
                retrieval.after_batch = bounces.after_batch
                scheduler.start()
                if claimer is not None:
                    claimer.start()
                pruner.start()
            try:
                yield
            finally:
                recovery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recovery
                if runs_work:
                    if claimer is not None:
                        await claimer.stop()
                    await scheduler.stop()
                    # In-flight sends get their grace period; unfinished messages are
                    # queued again before the database closes.
                    try:
                        await delivery.stop()
                    finally:
                        if delivery_process is not None:
                            await delivery_process.stop()
                    await retrieval.stop()
                    await bounces.stop()
                    await pruner.stop()
                    if webhook_dispatcher is not None:
                        await webhook_dispatcher.stop()
                app.state.feed.close()
                await store.notifier.stop()
        finally:
            await store.close()

    def provide_tenant(request: Request[Any, Any, Any]) -> str:
        tenant: str = request.state.tenant
        return tenant

    @get(
        "/metrics",
        operation_id="GetMetrics",
        summary="Prometheus metrics (text exposition format)",
        description=METRICS_DESCRIPTION,
        media_type="text/plain",
        tags=["Health"],
        responses=METRICS_ERRORS,
        operation_class=MetricsOperation,
    )
    async def get_metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        if settings.metrics_token is not None:
            check_metrics_token(settings.metrics_token, request.headers.getall("authorization", []))
        stats: StatsRepository = request.app.state.stats
        metrics.set_outbox_counts(await stats.outbox_by_status())
        metrics.set_oldest_unsent(await stats.oldest_unsent_at())
        body, content_type = render(metrics, request.headers.get("accept"))
        # Litestar adds the charset to a text/* media type itself: not twice.
        if content_type.startswith("text/"):
            content_type = content_type.partition("; charset=")[0]
        return Response(body, media_type=content_type)

    v1 = Router(
        path="/v1",
        guards=[require_api_key],
        before_request=check_json_request,
        security=[{"BearerAuth": []}],
        route_handlers=[
            AccountController,
            SetupController,
            RetrievalController,
            MessageController,
            OutboxController,
            WebhookController,
            EventController,
        ],
        dependencies={
            "tenant": Provide(provide_tenant, sync_to_thread=False),
            **{
                name: _from_state(name)
                for name in (
                    "accounts",
                    "retrievals",
                    "messages",
                    "outbox",
                    "verifier",
                    "webhooks",
                    "feed",
                )
            },
        },
    )
    app = Litestar(
        # A worker serves only /health, /ready and /metrics.
        route_handlers=[HealthController, get_metrics, *([v1] if settings.role.serves_api else [])],
        lifespan=[lifespan],
        openapi_config=openapi_config(),
        exception_handlers={
            ServiceError: service_error_handler,
            RepositoryError: repository_error_handler,
            HTTPException: http_exception_handler,
            Exception: internal_error_handler,
        },
        request_max_body_size=settings.max_request_bytes,
        # Bodies decode strictly, and their schemas say all the decoder enforces.
        request_class=StrictJSONRequest,
        # Struct schemas that say what the server accepts (requests) and sends (responses).
        plugins=[RequestSchemaPlugin(), ResponseSchemaPlugin()],
        state=State({"settings": settings}),
        debug=False,
        logging_config=None,
    )
    # Outside the router, so 404s and 405s get a request id and are counted too. HEAD is
    # routed as GET innermost, so logs and metrics still say HEAD.
    return wrap_router(
        app,
        RequestIdMiddleware,
        AccessLogMiddleware,
        metrics.middleware,
        HeadMiddleware,
        AllowHeaderMiddleware,
    )


async def _run_startup_steps(steps: list[StartupStep]) -> list[StartupStep]:
    """Run ``steps`` in order until one finds the disk full or the database unreachable;
    return it and those after it.

    Any other failure propagates (the start fails, as it should for a broken setup).
    """
    for index, (what, step) in enumerate(steps):
        try:
            await step()
        except StorageFullError as exc:
            logger.warning("startup: cannot %s, the disk is full (%s); will retry", what, exc)
            return steps[index:]
        except StoreUnavailableError as exc:
            logger.warning("startup: cannot %s, no database (%s); will retry", what, exc)
            return steps[index:]
    return []


async def _retry_startup_steps(steps: list[StartupStep]) -> None:
    """Retry the startup steps left over, with backoff, until all have succeeded."""
    delay = STARTUP_RETRY_S
    while steps:
        await asyncio.sleep(delay)
        delay = min(delay * 2, STARTUP_RETRY_MAX_S)
        try:
            steps = await _run_startup_steps(steps)
        except RepositoryError as exc:
            logger.error("startup: %s failed: %s; will retry", steps[0][0], exc)
        except Exception:
            logger.exception("startup: %s failed; will retry", steps[0][0])
        if not steps:
            logger.info("startup: recovery finished, the service is fully started")


def _from_state(name: str) -> Provide:
    """A dependency that hands out the service the lifespan stored as ``app.state.<name>``."""

    def provide(state: State) -> Any:
        return getattr(state, name)

    return Provide(provide, sync_to_thread=False)


def _retrieval_metrics(metrics: Metrics) -> RetrievalObserver:
    async def record(done: Retrieval) -> None:
        seconds = None
        if done.started_at is not None and done.finished_at is not None:
            seconds = (done.finished_at - done.started_at).total_seconds()
        metrics.record_retrieval(
            done.status,
            messages=done.messages_downloaded,
            size=done.bytes_downloaded,
            seconds=seconds,
        )

    return record

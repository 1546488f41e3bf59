"""``python -m service``: read the settings and serve with uvicorn (uvloop + httptools).

``python -m service migrate-store --from sqlite:///... --to postgresql://...`` copies a
SQLite store into an empty PostgreSQL store instead (``service.migrate``).

uvicorn with uvloop and the httptools parser: the fastest pure-wheel ASGI server stack
here, with proper lifespan support and graceful shutdown on SIGTERM (in-flight requests
finish, then the lifespan stops the workers).
"""

from __future__ import annotations

import sys

import uvicorn

from service.app import create_app
from service.config import ConfigError, Settings
from service.logs import configure_logging

GRACEFUL_SHUTDOWN_S = 30


def main() -> int:
    if sys.argv[1:2] == ["migrate-store"]:
        # Imported only for this command: it loads the PostgreSQL driver.
        from service.migrate import main as migrate_store

        return migrate_store(sys.argv[2:])
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"mailroom: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

"""Per-request context that code deep below the API can read without being handed it.

``request_id_var`` holds the id of the HTTP request being served (set by
``service.api.middleware.RequestIdMiddleware``, ``None`` outside a request).
``RequestIdFilter`` copies it onto every log record as ``record.request_id``, which both
formatters of ``service.logs`` print. Tasks started with ``asyncio.create_task`` during a
request inherit it (they copy the context), so work a request kicks off is traceable too.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("mailroom_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from ``request_id_var`` (``None`` outside a request).

    Install it on handlers, not loggers: a handler filter sees every record that reaches
    the handler, including those propagated from child loggers. A ``request_id`` passed
    explicitly (``extra={"request_id": ...}``) is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True

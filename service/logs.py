"""Logging setup: plain text or one JSON object per line (``MAILROOM_LOG_FORMAT=json``).

Every line logged while a request is served carries its request id (``request_id`` in
JSON, ``[id]`` after the logger name in text): ``configure_logging`` installs
``service.context.RequestIdFilter`` on the handler, which reads the id that
``service.api.middleware.RequestIdMiddleware`` put in a context variable.

Business events (a request served, a retrieval finished, a message sent...) are logged with
:func:`log_event`: one INFO line whose fields JSON mode carries as keys of the object and
text mode appends as ``key=value``. Fields never hold a secret.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from service.config import Settings
from service.context import RequestIdFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s %(message)s%(field_text)s"
FIELDS_ATTR = "fields"  # the ``extra`` key that carries an event's fields
# Keys a field may not take in JSON mode (they are the line's own).
_RESERVED = frozenset({"time", "level", "logger", "message", "request_id", "exception"})

FieldValue = str | int | float | bool | None


def log_event(
    logger: logging.Logger,
    message: str,
    level: int = logging.INFO,
    /,
    **fields: FieldValue,
) -> None:
    """Log one business event: ``message`` for people, ``fields`` for machines.

    ``level`` is positional-only, so a field of any name (even ``level``) can be passed,
    also from a ``**dict``.
    """
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={FIELDS_ATTR: fields})


def _fields(record: logging.LogRecord) -> dict[str, FieldValue]:
    value = getattr(record, FIELDS_ATTR, None)
    return value if isinstance(value, dict) else {}


def _text_value(value: FieldValue) -> str:
    text = "" if value is None else str(value)
    # Quoted when it has spaces or quotes, so a line stays one ``key=value`` list.
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for key, value in _fields(record).items():
            entry[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``: the request id in brackets after the logger name, when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        fields = _fields(record)
        record.field_text = "".join(f" {k}={_text_value(v)}" for k, v in fields.items())
        return super().format(record)


def configure_logging(settings: Settings) -> None:
    """Send every log record to stderr in the configured format, tagged with its request id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)

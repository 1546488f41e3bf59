"""Cursor pagination: ``?limit=`` (default 50, max 500) and an opaque ``?cursor=``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from litestar.params import QueryParameter

from service.api.schemas import ListResponse
from service.domain.ids import CURSOR_PATTERN, InvalidCursor, decode_cursor, encode_cursor
from service.errors import FieldError, Invalid
from service.repository.pages import Page

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

T = TypeVar("T")
P = TypeVar("P", bound=ListResponse[Any])

Limit = Annotated[
    int,
    QueryParameter(
        ge=1,
        le=MAX_PAGE_SIZE,
        description=f"Page size (default {DEFAULT_PAGE_SIZE}, max {MAX_PAGE_SIZE})",
    ),
]
Cursor = Annotated[
    str | None,
    QueryParameter(
        pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page (opaque: pass it back unchanged)",
    ),
]


def after_of(cursor: str | None) -> str | None:
    """The sort key a cursor continues after; 422 for a cursor we did not issue."""
    if cursor is None:
        return None
    try:
        return decode_cursor(cursor)
    except InvalidCursor as exc:
        raise Invalid(str(exc), errors=[FieldError("cursor", str(exc))]) from exc


def list_response(kind: type[P], page: Page[T], convert: Callable[[T], Any]) -> P:
    """``page`` as the list Struct ``kind`` (e.g. ``AccountList``), items converted."""
    return kind(
        items=[convert(item) for item in page.items],
        next_cursor=None if page.next_after is None else encode_cursor(page.next_after),
    )

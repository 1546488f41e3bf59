"""Raw message downloads: ``message/rfc822`` by default, octet-stream on request.

Raw messages are served as ``message/rfc822`` (what they are). The OpenAPI document also
lists ``application/octet-stream`` for them, which a client gets by asking for it in
``Accept``: code generators that know no ``message/*`` type then still produce a typed
bytes download instead of dropping the operation.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Response
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from service.mail.parse import safe_content_disposition

RFC822 = "message/rfc822"
OCTET_STREAM = "application/octet-stream"
# Served bytes are the sender's: never let a browser run or sniff them on our origin.
UNTRUSTED_CONTENT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
}


ANY_MEDIA_TYPE = "*/*"


def _binary(media_type: str | None = OCTET_STREAM) -> OpenAPIMediaType:
    """Bytes: ``format: binary`` for generators that read OpenAPI 3.0, ``contentMediaType``
    for those that read 3.1 (never parsed as JSON)."""
    return OpenAPIMediaType(
        schema=Schema(
            type=OpenAPIType.STRING,
            format=OpenAPIFormat.BINARY,
            content_media_type=media_type,
        )
    )


@dataclass
class RawMessageOperation(Operation):
    """Documents the 200 response as ``message/rfc822`` or ``application/octet-stream``."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {RFC822: _binary(RFC822), OCTET_STREAM: _binary()}


@dataclass
class AttachmentOperation(Operation):
    """Documents the 200 response as bytes of any media type (the attachment's own), or
    ``application/octet-stream`` on request."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {OCTET_STREAM: _binary(), ANY_MEDIA_TYPE: _binary(None)}


def wants_octets(accept: str | None, media_type: str) -> bool:
    """Whether ``Accept`` names ``application/octet-stream`` but not ``media_type``, the
    type the bytes are served as otherwise."""
    if accept is None:
        return False
    named = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return OCTET_STREAM in named and media_type.lower() not in named


def raw_message_response(data: bytes, filename: str, accept: str | None) -> Response[bytes]:
    """The message bytes, as ``message/rfc822`` unless only octet-stream is acceptable."""
    return Response(
        data,
        media_type=OCTET_STREAM if wants_octets(accept, RFC822) else RFC822,
        headers={
            "Content-Disposition": safe_content_disposition(filename),
            **UNTRUSTED_CONTENT_HEADERS,
        },
    )

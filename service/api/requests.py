"""The request side of the contract: what the OpenAPI document accepts, the server accepts.

Three pieces, each closing a gap between Litestar's defaults and the document:

- :class:`StrictJSONRequest` decodes a JSON body strictly into the handler's ``data`` type.
  Litestar decodes bodies to plain values and converts them with ``strict=False`` (the mode
  query strings need), which turns ``"port": "110"`` into 110 and ``"true"`` into a boolean.
  Here the body is decoded with ``strict=True``; the only coercion kept is the one JSON
  Schema itself makes: a number with no fractional part (``25.0``) is an integer.
- :class:`RequestSchemaPlugin` documents request Structs (``forbid_unknown_fields=True``)
  with ``additionalProperties: false``, and carries the bounds msgspec enforces on list items
  and dict keys and values, which Litestar's own schema leaves out; a Struct's
  ``at_least_one_of`` (groups of fields of which one must be given: a non-empty list, a
  string that is not null) becomes one ``not`` (the body is none of "every field of a
  group is absent, empty or null").
- :class:`AllowHeaderMiddleware` answers ``OPTIONS`` with every method the path has.
  Litestar builds the ``OPTIONS`` handler with the first handlers registered on a path and
  does not update it when more are merged in (``Allow: DELETE, OPTIONS`` on a path that also
  has GET and PATCH); the route table itself is right, so the header is taken from there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.enums import ScopeType
from litestar.exceptions import SerializationException, ValidationException
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Empty, Message, Receive, Scope, Send
from litestar.typing import FieldDefinition

from service.errors import FieldError, Invalid

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

ALLOW_HEADER = b"allow"

_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _body_type(request: Request[Any, Any, Any]) -> type[msgspec.Struct] | None:
    """The Struct the handler's ``data`` parameter asks for, if it is one."""
    parameter = request.route_handler.parsed_fn_signature.parameters.get("data")
    if parameter is None:
        return None
    target = parameter.annotation
    if isinstance(target, type) and issubclass(target, msgspec.Struct):
        return target
    return None


def _integral_floats_as_ints(value: Any) -> tuple[Any, bool]:
    """``value`` with every float that has no fractional part made an int; whether any was."""
    if isinstance(value, float) and value.is_integer():
        return int(value), True
    if isinstance(value, list):
        changed = False
        items = []
        for item in value:
            new, was = _integral_floats_as_ints(item)
            items.append(new)
            changed = changed or was
        return items, changed
    if isinstance(value, dict):
        changed = False
        fields = {}
        for key, item in value.items():
            new, was = _integral_floats_as_ints(item)
            fields[key] = new
            changed = changed or was
        return fields, changed
    return value, False


def decode_strict(body: bytes, target: type[msgspec.Struct]) -> Any:
    """Decode ``body`` into ``target`` with no type coercion (JSON Schema's rules).

    Raises ``msgspec.ValidationError`` for a value of the wrong type or out of bounds and
    ``msgspec.DecodeError`` for a body that is not JSON.
    """
    decoder = _decoders.get(target)
    if decoder is None:
        decoder = _decoders[target] = msgspec.json.Decoder(target, strict=True)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        # Rare: only a body with a number such as `25.0` where an integer is expected can
        # pass on the second try. Decoding untyped also reports JSON that is malformed
        # after the point where the typed decoder stopped.
        plain, changed = _integral_floats_as_ints(msgspec.json.decode(body))
        if not changed:
            raise
        return msgspec.convert(plain, target, strict=True)


class StrictJSONRequest(Request[Any, Any, Any]):
    """A request whose JSON body is decoded strictly into the handler's ``data`` Struct.

    Litestar then converts the already typed value again, which passes a Struct of the
    right type through unchanged.
    """

    async def json(self) -> Any:
        target = _body_type(self)
        if target is None:
            return await super().json()
        cached = self._connection_state.json
        if cached is not Empty and isinstance(cached, target):
            return cached
        body = await self.body()
        try:
            value = decode_strict(body or b"null", target)
        except msgspec.ValidationError as exc:
            # The same shape as Litestar's own body errors (service.api.problems reads it).
            raise ValidationException(
                detail=f"Validation failed for {self.method} {self.url.path}",
                extra=[{"message": str(exc), "key": "data", "source": "body"}],
            ) from exc
        except msgspec.DecodeError as exc:
            # Litestar answers this 400, as for a body its own decoder cannot read.
            raise SerializationException(str(exc)) from exc
        self._json = self._connection_state.json = value
        return value


def _string_bounds(schema: Schema, info: msgspec.inspect.StrType) -> None:
    if info.min_length is not None:
        schema.min_length = info.min_length
    if info.max_length is not None:
        schema.max_length = info.max_length
    if info.pattern is not None:
        schema.pattern = info.pattern


def _unwrap(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The type under ``Annotated[..., Meta(...)]`` (its bounds stay on the type)."""
    while isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    return info


def _bounds_of(info: msgspec.inspect.Type) -> Schema | None:
    """A schema with only the bounds of a list item or dict key/value, or None."""
    info = _unwrap(info)
    if isinstance(info, msgspec.inspect.StrType):
        schema = Schema()
        _string_bounds(schema, info)
        return schema if schema.to_schema() else None
    return None


def _merge(target: Schema | Any, bounds: Schema | None) -> None:
    if bounds is None or not isinstance(target, Schema):
        return
    for name, value in vars(bounds).items():
        if value is not None and getattr(target, name, None) is None:
            setattr(target, name, value)


def _add_container_bounds(schema: Schema | Any, info: msgspec.inspect.Type) -> None:
    """Copy to ``schema`` the bounds msgspec enforces inside lists and dicts."""
    if not isinstance(schema, Schema):
        return
    info = _unwrap(info)
    if isinstance(info, msgspec.inspect.UnionType):
        variants = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(variants) == 1:
            for inner in schema.one_of or schema.any_of or [schema]:
                _add_container_bounds(inner, variants[0])
        return
    if isinstance(info, msgspec.inspect.ListType):
        _merge(schema.items, _bounds_of(info.item_type))
    elif isinstance(info, msgspec.inspect.DictType):
        if info.max_length is not None:
            schema.max_properties = info.max_length
        if info.min_length is not None:
            schema.min_properties = info.min_length
        key_bounds = _bounds_of(info.key_type)
        if key_bounds is not None:
            schema.property_names = key_bounds
        _merge(schema.additional_properties, _bounds_of(info.value_type))


def _not_given(info: msgspec.inspect.Type) -> Schema:
    """The schema a field's value has when it counts as not given: an empty list, or null.

    Used under ``properties``, so an absent field counts as not given too.
    """
    if isinstance(info, msgspec.inspect.ListType):
        return Schema(max_items=0)
    if isinstance(info, msgspec.inspect.UnionType):
        variants = [_unwrap(t) for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(variants) == 1 and isinstance(variants[0], msgspec.inspect.StrType):
            return Schema(type=OpenAPIType.NULL)
    raise TypeError(f"`at_least_one_of` supports lists and optional strings, not {info}")


def _default_in_words(prop: Schema | Any) -> None:
    """Say a request field's default in its description instead of as ``default``.

    Generators read ``default`` as "always present" and make the field required in the
    request type (openapi-typescript does by default), though a caller may leave it out.
    """
    if not isinstance(prop, Schema) or prop.default is None:
        return
    words = f"Default: `{msgspec.json.encode(prop.default).decode()}`."
    prop.description = f"{prop.description} {words}" if prop.description else words
    prop.default = None


class RequestSchemaPlugin(StructSchemaPlugin):
    """The OpenAPI schema of a request Struct states everything its decoder enforces."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if not super().is_plugin_supported_field(field_definition):
            return False
        config = getattr(field_definition.type_, "__struct_config__", None)
        return bool(config is not None and config.forbid_unknown_fields)

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        for prop in (schema.properties or {}).values():
            _default_in_words(prop)
        struct = field_definition.type_
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            _add_container_bounds((schema.properties or {}).get(field.encode_name), field.type)
        groups: tuple[tuple[str, ...], ...] = getattr(struct, "at_least_one_of", ())
        types = {field.encode_name: _unwrap(field.type) for field in info.fields}
        # "None of the group is given", for each group; the body must match none of them.
        # A single ``not`` rather than ``anyOf`` alternatives: generators turn alternatives
        # into one class per branch (``SendRequestType0``...), and ignore a ``not``.
        empty = [
            Schema(properties={name: _not_given(types[name]) for name in group}) for group in groups
        ]
        if len(empty) == 1:
            schema.schema_not = empty[0]
        elif empty:
            schema.schema_not = Schema(any_of=empty)
        return schema


class AllowHeaderMiddleware:
    """Pure ASGI layer: ``Allow`` on a 204 answer to ``OPTIONS`` lists the route's methods."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._methods: dict[str, bytes] | None = None

    def _allow_by_template(self, litestar_app: Litestar) -> dict[str, bytes]:
        if self._methods is None:
            self._methods = {
                route.path_format: ", ".join(sorted(route.methods)).encode("ascii")
                for route in litestar_app.routes
                if isinstance(route, HTTPRoute)
            }
        return self._methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope.get("method") != "OPTIONS":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 204:
                template = scope.get("path_template")
                allow = self._allow_by_template(scope["litestar_app"]).get(str(template))
                if allow is not None:
                    message["headers"] = [
                        *(
                            (name, value)
                            for name, value in message.get("headers", ())
                            if name.lower() != ALLOW_HEADER
                        ),
                        (ALLOW_HEADER, allow),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_allow)


# RFC 3339 `date-time` with its offset, as JSON Schema's `format: date-time` means it.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$(?!\n)"
)


def parse_timestamp(value: str | None, field: str) -> datetime | None:
    """A timestamp query parameter as an aware UTC datetime; 422 for a date that is not one.

    Litestar's own conversion of query strings is lax (``0.5`` would be a Unix time), so
    these parameters are strings with the RFC 3339 pattern, parsed here.
    """
    if value is None:
        return None
    try:
        return msgspec.convert(value, datetime, strict=True).astimezone(UTC)
    except (msgspec.ValidationError, OverflowError) as exc:
        message = f"not an RFC 3339 date-time: {exc}"
        raise Invalid(message, errors=[FieldError(field, message)]) from exc

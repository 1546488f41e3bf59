"""Provider presets: server settings of the big mail providers, from a data file.

``service/data/presets.json`` holds, per preset name, the POP3 and SMTP hosts, ports and
security of a provider as its public documentation gives them, the address domains it
serves, and its OAuth2 endpoints where it has them (authorization and token URLs, scopes:
what a later OAuth2 sign-in needs). ``MAILROOM_PRESETS_FILE`` adds presets of the same
shape (an organisation's own servers) or replaces bundled ones of the same name.

``"preset": "gmail"`` in an account body fills what the caller did not give (host, port,
security of each server); what the caller gives wins.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TypeVar

import msgspec

from service.codes import ErrorCode
from service.domain.enums import Security
from service.domain.inputs import AccountInput, check_host
from service.errors import FieldError, Invalid

BUNDLED = "presets.json"
# A preset name: lower-case letters, digits and underscores.
PRESET_NAME_PATTERN = r"^[a-z0-9_]{1,40}$"

S = TypeVar("S", bound=msgspec.Struct)


class PresetServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One server of a preset."""

    host: str
    port: int
    security: Security


class PresetOAuth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The provider's OAuth2 endpoints (authorization code flow with a refresh token)."""

    authorization_url: str
    token_url: str
    scopes: list[str]


class Preset(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A provider's settings; ``name`` is what ``"preset"`` names in an account body."""

    name: str = ""
    title: str
    domains: list[str]
    incoming: PresetServer
    outgoing: PresetServer
    oauth2: PresetOAuth | None = None
    documentation: str | None = None


class PresetList(msgspec.Struct, frozen=True):
    """Every preset, by name."""

    items: list[Preset]


class PresetError(ValueError):
    """A presets file that cannot be used (the message names the file and the preset)."""


def _load(data: bytes, origin: str) -> dict[str, Preset]:
    try:
        raw = msgspec.json.decode(data, type=dict[str, Preset])
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PresetError(f"{origin}: {exc}") from exc
    presets: dict[str, Preset] = {}
    for name, preset in raw.items():
        if not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
            raise PresetError(f"{origin}: preset name {name!r}: use a-z, 0-9 and _")
        for role, server in (("incoming", preset.incoming), ("outgoing", preset.outgoing)):
            try:
                check_host(server.host)
            except ValueError as exc:
                raise PresetError(f"{origin}: preset {name!r} {role}: {exc}") from None
            if not 0 < server.port < 65536:
                raise PresetError(f"{origin}: preset {name!r} {role}: bad port {server.port}")
        presets[name] = msgspec.structs.replace(preset, name=name)
    return presets


class PresetCatalog:
    """The bundled presets, plus (and overridden by) those of an extra file."""

    def __init__(self, extra_file: str | None = None) -> None:
        bundled = resources.files("service").joinpath("data", BUNDLED).read_bytes()
        self._presets = _load(bundled, BUNDLED)
        if extra_file is not None:
            try:
                extra = Path(extra_file).read_bytes()
            except OSError as exc:
                raise PresetError(f"{extra_file}: {exc.strerror or exc}") from exc
            self._presets.update(_load(extra, extra_file))

    def all(self) -> list[Preset]:
        """Every preset, sorted by name."""
        return [self._presets[name] for name in sorted(self._presets)]

    def get(self, name: str) -> Preset:
        """The preset called ``name``; 422 ``unknown_preset`` when there is none."""
        preset = self._presets.get(name)
        if preset is None:
            raise Invalid(
                f"no preset {name!r}; GET /v1/presets lists them",
                code=ErrorCode.UNKNOWN_PRESET,
                errors=[FieldError("preset", "unknown preset")],
            )
        return preset

    def for_domain(self, domain: str) -> Preset | None:
        """The preset serving addresses at ``domain``, if one lists it."""
        domain = domain.lower().rstrip(".")
        for preset in self.all():
            if domain in preset.domains:
                return preset
        return None

    def fill(self, data: AccountInput) -> AccountInput:
        """``data`` with the preset's settings where the caller gave none.

        Without a preset, both hosts must be given (422 ``validation_error``). Security
        left out is the preset's (else ``tls``); a port left out is the preset's when the
        security is the preset's too (else the default port of the security chosen).
        """
        preset = None if data.preset is None else self.get(data.preset)
        incoming, outgoing = data.incoming, data.outgoing
        if preset is not None:
            incoming = _fill_server(incoming, preset.incoming)
            outgoing = _fill_server(outgoing, preset.outgoing)
        missing = [
            FieldError(f"{role}.host", "required without a `preset`")
            for role, server in (("incoming", incoming), ("outgoing", outgoing))
            if server.host is None
        ]
        if missing:
            raise Invalid(
                "give the servers' hosts, or a `preset` (GET /v1/presets lists them)",
                errors=missing,
            )
        return msgspec.structs.replace(data, incoming=incoming, outgoing=outgoing)


def _fill_server(given: S, preset: PresetServer) -> S:
    host = getattr(given, "host")  # noqa: B009 - shared by the two server inputs
    security = getattr(given, "security")  # noqa: B009
    port = getattr(given, "port")  # noqa: B009
    changes: dict[str, object] = {}
    if host is None:
        changes["host"] = preset.host
    if security is None:
        changes["security"] = preset.security
    if port is None and (security is None or security is preset.security):
        changes["port"] = preset.port
    return msgspec.structs.replace(given, **changes)

"""Settings: a frozen Struct built from ``MAILROOM_*`` environment variables.

Every limit the service enforces lives here (or as a named constant next to the code that
uses it), never as a literal in the middle of the code. ``Settings.from_env`` validates every
value and raises ``ConfigError`` with a message naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

import msgspec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX = "MAILROOM_"
DEFAULT_TENANT = "default"
SECRET_KEY_BYTES = 32  # AES-256-GCM
# The window over which ``min_transfer_rate`` is measured: a session that moves fewer than
# rate x window bytes in any such window while a reply is due is abandoned (``timeout``).
MIN_RATE_WINDOW_S = 60.0
# ``MAILROOM_DATABASE``: a path or ``sqlite:///path`` is SQLite, these schemes PostgreSQL.
SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
StoreKind = Literal["sqlite", "postgres"]


class ConfigError(ValueError):
    """A ``MAILROOM_*`` variable has a bad value; the message names it."""


class Role(StrEnum):
    """What one process does (``MAILROOM_ROLE``)."""

    #: The HTTP API and the background work (delivery, retrievals, scheduler): one command.
    ALL = "all"
    #: Only the HTTP API: sends and retrieval triggers are stored for workers to run.
    API = "api"
    #: Only the background work; HTTP serves /health, /ready and /metrics.
    WORKER = "worker"

    @property
    def serves_api(self) -> bool:
        """Whether this process serves the ``/v1`` API."""
        return self is not Role.WORKER

    @property
    def runs_work(self) -> bool:
        """Whether this process delivers, retrieves and runs the scheduler."""
        return self is not Role.API


class ApiKey(msgspec.Struct, frozen=True):
    """A configured bearer key and the tenant it acts for."""

    tenant: str
    key: str


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything configurable. Defaults give a working single-machine service."""

    database: str = "./data/mailroom.db"
    role: Role = Role.ALL
    db_pool_size: int = 10  # PostgreSQL: connections per process
    # Seconds a store operation may wait for a connection or a statement before it gives up
    # (503 ``storage_unavailable``), so an unreachable database never hangs a request.
    db_timeout_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[ApiKey, ...] = ()
    # First key encrypts; all keys decrypt (so a key can be rotated). None: key file.
    secret_keys: tuple[bytes, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    ca_file: str | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # When set, GET /metrics needs `Authorization: Bearer <this>`; None: /metrics is open.
    metrics_token: str | None = None

    # HTTP limits
    max_request_bytes: int = 35 * 1024 * 1024  # base64 attachments of a 25 MB message
    page_size_default: int = 50
    page_size_max: int = 500

    # Mail limits
    max_message_bytes: int = 50 * 1024 * 1024  # POP3 download cap unless the account sets less
    max_send_bytes: int = 25 * 1024 * 1024  # a composed outgoing message
    max_attachment_bytes: int = 20 * 1024 * 1024  # one decoded attachment
    max_recipients: int = 100  # to + cc + bcc of one outgoing message

    # Concurrency. A tenant's share: None is half the global limit (at least 1) when keys
    # of several tenants are configured, the whole limit when there is only one tenant.
    max_concurrent_retrievals: int = 8
    max_retrievals_per_tenant: int | None = None
    smtp_concurrency: int = 20  # delivery sessions at once
    # SMTP sessions in a child process (``service.services.delivery_process``) while this
    # one keeps every store write: ``auto`` does so when one process serves the API and
    # delivers (role ``all``), ``on`` always, ``off`` never.
    delivery_process: Literal["auto", "on", "off"] = "auto"
    smtp_sessions_per_tenant: int | None = None
    scheduler_interval_s: float = 15.0  # longest scheduler sleep without a wake-up
    poll_spread_s: float = 300.0  # a new account's first poll: within this (or its interval)

    # Network timeouts (seconds)
    pop3_timeout_s: float = 60.0  # one read or write
    connect_timeout_s: float = 30.0
    retrieval_timeout_s: float = 1800.0  # one whole POP3 session
    smtp_attempt_timeout_s: float = 600.0  # one whole delivery attempt (one message)
    verify_timeout_s: float = 30.0  # "test these settings", both servers
    # How long a claim on work (an outgoing message being sent, a running retrieval) holds
    # unless its process renews it (every third of it): how soon another replica takes
    # over the work of one that died. None: ``service.services.leases.LEASE_S`` (60 s).
    lease_s: float | None = None
    # A transfer slower than this many bytes per second over MIN_RATE_WINDOW_S is abandoned.
    min_transfer_rate: int = 256

    # The name Mailroom gives in EHLO; None: this host's FQDN when it has a dot, else the
    # account's email domain.
    ehlo_name: str | None = None

    # Account setup: GET /v1/autoconfig answers within this many seconds, whatever its
    # sources do; the ISPDB it asks (by domain and by the MX's base domain); the DNS
    # servers it asks for MX, SRV and addresses (host, port; empty: the system's).
    autoconfig_timeout_s: float = 10.0
    ispdb_url: str | None = "https://autoconfig.thunderbird.net/v1.1/"
    dns_servers: tuple[tuple[str, int], ...] = ()
    # More provider presets (the bundled file's shape); a name there replaces the bundled one.
    presets_file: str | None = None
    # OAuth2: an access token with less than this many seconds left is refreshed first.
    oauth_refresh_margin_s: float = 300.0

    # Events and webhooks
    event_retention_days: int = 7  # events older than this are pruned (the feed forgets)
    webhook_timeout_s: float = 10.0  # one webhook request, connect to last byte
    webhook_retry_base_s: float = 5.0  # first retry delay, doubled each time (with jitter)
    webhook_retry_max_s: float = 3600.0  # the longest delay between two attempts
    webhook_retry_window_s: float = 24 * 3600.0  # retried this long; failing as long: disabled
    webhook_concurrency: int = 8  # requests in flight per endpoint
    webhook_secret_grace_s: float = 24 * 3600.0  # a rotated-out secret keeps signing this long

    @property
    def retrievals_per_tenant(self) -> int:
        """How many of the retrieval slots one tenant may hold at once."""
        return self._share(self.max_retrievals_per_tenant, self.max_concurrent_retrievals)

    @property
    def smtp_sessions_tenant_share(self) -> int:
        """How many of the delivery sessions one tenant's accounts may hold at once."""
        return self._share(self.smtp_sessions_per_tenant, self.smtp_concurrency)

    @property
    def delivers_in_child(self) -> bool:
        """Whether SMTP sessions run in the delivery child process."""
        if self.delivery_process == "auto":
            return self.role is Role.ALL
        return self.delivery_process == "on"

    def _share(self, configured: int | None, total: int) -> int:
        if configured is None:
            several = len({key.tenant for key in self.api_keys}) > 1
            configured = total // 2 if several else total
        return max(1, min(configured, total))

    # Delivery retry schedule: delays between attempts, then give up
    retry_delays_s: tuple[float, ...] = (5, 30, 120, 300, 900, 1800, 3600, 7200, 14400, 28800)
    retry_jitter: float = 0.2  # +-20 % so retries to one server do not synchronize
    max_message_age_s: float = 5 * 24 * 3600
    send_at_horizon_s: float = 30 * 24 * 3600  # how far ahead `send_at` may be

    @property
    def store_kind(self) -> StoreKind:
        """Which store ``database`` names: ``sqlite`` (a path) or ``postgres`` (a URL)."""
        return database_kind(self.database)

    @property
    def database_path(self) -> Path:
        """The SQLite file (``sqlite:///`` stripped); only for the SQLite store."""
        if self.store_kind != "sqlite":
            raise ConfigError("MAILROOM_DATABASE: a PostgreSQL database has no file path")
        return Path(self.database.removeprefix(SQLITE_PREFIX))

    @property
    def key_file(self) -> Path:
        """Where the generated credential key lives: beside the database."""
        return self.database_path.with_name("mailroom.key")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the ``MAILROOM_*`` variables."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value.strip() if value is not None and value.strip() != "" else None

        kwargs: dict[str, object] = {}
        if (value := get("DATABASE")) is not None:
            database_kind(value)  # an unknown scheme fails here, at start
            kwargs["database"] = value
        if (value := get("ROLE")) is not None:
            try:
                kwargs["role"] = Role(value.lower())
            except ValueError:
                raise ConfigError("MAILROOM_ROLE: must be 'all', 'api' or 'worker'") from None
        if (value := get("DELIVERY_PROCESS")) is not None:
            if value.lower() not in ("auto", "on", "off"):
                raise ConfigError("MAILROOM_DELIVERY_PROCESS: must be 'auto', 'on' or 'off'")
            kwargs["delivery_process"] = value.lower()
        if (value := get("HOST")) is not None:
            kwargs["host"] = value
        if (value := get("PORT")) is not None:
            kwargs["port"] = _int("MAILROOM_PORT", value, 1, 65535)
        if (value := get("API_KEYS")) is not None:
            kwargs["api_keys"] = parse_api_keys(value)
        if (value := get("SECRET_KEY")) is not None:
            kwargs["secret_keys"] = tuple(
                decode_secret_key(part, "MAILROOM_SECRET_KEY")
                for part in value.split(",")
                if part.strip()
            )
        if (value := get("ALLOWED_NETWORKS")) is not None:
            kwargs["allowed_networks"] = parse_networks(value)
        if (value := get("CA_FILE")) is not None:
            if not Path(value).is_file():
                raise ConfigError(f"MAILROOM_CA_FILE: {value!r} is not a readable file")
            kwargs["ca_file"] = value
        if (value := get("LOG_FORMAT")) is not None:
            if value not in ("text", "json"):
                raise ConfigError("MAILROOM_LOG_FORMAT: must be 'text' or 'json'")
            kwargs["log_format"] = value
        if (value := get("METRICS_TOKEN")) is not None:
            kwargs["metrics_token"] = value
        if (value := get("LOG_LEVEL")) is not None:
            if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ConfigError("MAILROOM_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
            kwargs["log_level"] = value.upper()
        int_settings = {
            "MAX_REQUEST_BYTES": ("max_request_bytes", 1024, 1 << 31),
            "MAX_MESSAGE_BYTES": ("max_message_bytes", 1024, 1 << 31),
            "MAX_SEND_BYTES": ("max_send_bytes", 1024, 1 << 31),
            "MAX_ATTACHMENT_BYTES": ("max_attachment_bytes", 1, 1 << 31),
            "MAX_RECIPIENTS": ("max_recipients", 1, 10_000),
            "MAX_CONCURRENT_RETRIEVALS": ("max_concurrent_retrievals", 1, 1000),
            "SMTP_CONCURRENCY": ("smtp_concurrency", 1, 1000),
            "MAX_RETRIEVALS_PER_TENANT": ("max_retrievals_per_tenant", 1, 1000),
            "SMTP_SESSIONS_PER_TENANT": ("smtp_sessions_per_tenant", 1, 1000),
            "MIN_TRANSFER_RATE": ("min_transfer_rate", 0, 1 << 30),
            "EVENT_RETENTION_DAYS": ("event_retention_days", 1, 3650),
            "WEBHOOK_CONCURRENCY": ("webhook_concurrency", 1, 100),
        }
        for name, (field, low, high) in int_settings.items():
            if (value := get(name)) is not None:
                kwargs[field] = _int(ENV_PREFIX + name, value, low, high)
        if (value := get("RETRY_DELAYS")) is not None:
            kwargs["retry_delays_s"] = _delays(value)
        if (value := get("SCHEDULER_INTERVAL")) is not None:
            kwargs["scheduler_interval_s"] = _float("MAILROOM_SCHEDULER_INTERVAL", value, 0.05)
        if (value := get("POLL_SPREAD")) is not None:
            kwargs["poll_spread_s"] = _float("MAILROOM_POLL_SPREAD", value, 0.0)
        if (value := get("MAX_MESSAGE_AGE")) is not None:
            kwargs["max_message_age_s"] = _float("MAILROOM_MAX_MESSAGE_AGE", value, 1.0)
        if (value := get("SEND_AT_HORIZON")) is not None:
            kwargs["send_at_horizon_s"] = _float("MAILROOM_SEND_AT_HORIZON", value, 1.0)
        float_settings = {
            "RETRIEVAL_TIMEOUT": "retrieval_timeout_s",
            "SMTP_ATTEMPT_TIMEOUT": "smtp_attempt_timeout_s",
            "VERIFY_TIMEOUT": "verify_timeout_s",
            "LEASE_SECONDS": "lease_s",
            "WEBHOOK_TIMEOUT": "webhook_timeout_s",
            "WEBHOOK_RETRY_BASE": "webhook_retry_base_s",
            "WEBHOOK_RETRY_MAX": "webhook_retry_max_s",
            "WEBHOOK_RETRY_WINDOW": "webhook_retry_window_s",
            "WEBHOOK_SECRET_GRACE": "webhook_secret_grace_s",
        }
        for name, field in float_settings.items():
            if (value := get(name)) is not None:
                kwargs[field] = _float(ENV_PREFIX + name, value, 0.1)
        if (value := get("EHLO_NAME")) is not None:
            kwargs["ehlo_name"] = parse_ehlo_name(value)
        if (value := get("OAUTH_REFRESH_MARGIN")) is not None:
            kwargs["oauth_refresh_margin_s"] = _float("MAILROOM_OAUTH_REFRESH_MARGIN", value, 0.0)
        if (value := get("AUTOCONFIG_TIMEOUT")) is not None:
            kwargs["autoconfig_timeout_s"] = _float("MAILROOM_AUTOCONFIG_TIMEOUT", value, 0.1)
        if (value := get("ISPDB_URL")) is not None:
            kwargs["ispdb_url"] = parse_ispdb_url(value)
        if (value := get("DNS_SERVERS")) is not None:
            kwargs["dns_servers"] = parse_dns_servers(value)
        if (value := get("PRESETS_FILE")) is not None:
            if not Path(value).is_file():
                raise ConfigError(f"MAILROOM_PRESETS_FILE: {value!r} is not a readable file")
            kwargs["presets_file"] = value
        if (value := get("DB_POOL_SIZE")) is not None:
            kwargs["db_pool_size"] = _int("MAILROOM_DB_POOL_SIZE", value, 1, 1000)
        if (value := get("DB_TIMEOUT")) is not None:
            kwargs["db_timeout_s"] = _float("MAILROOM_DB_TIMEOUT", value, 0.1)
        settings = cls(**kwargs)  # type: ignore[arg-type]
        if settings.store_kind == "postgres" and not settings.secret_keys:
            # Replicas must share the credential key, and a key file beside a remote
            # database would be a different key on every machine.
            raise ConfigError(
                "MAILROOM_SECRET_KEY: required with a PostgreSQL database (every replica"
                " needs the same key)"
            )
        if settings.store_kind == "sqlite" and settings.role is not Role.ALL:
            # One SQLite file has one writer: an api and a worker process would be two.
            raise ConfigError(
                f"MAILROOM_ROLE: {settings.role.value!r} needs a PostgreSQL database; with"
                " SQLite one process does everything (MAILROOM_ROLE=all)"
            )
        return settings


def database_kind(value: str) -> StoreKind:
    """The store a ``MAILROOM_DATABASE`` value names; ``ConfigError`` for another scheme."""
    match = _SCHEME.match(value)
    if match is None:
        return "sqlite"
    scheme = match.group("scheme").lower()
    if scheme in POSTGRES_SCHEMES:
        return "postgres"
    if value.startswith(SQLITE_PREFIX) and len(value) > len(SQLITE_PREFIX):
        return "sqlite"
    raise ConfigError(
        f"MAILROOM_DATABASE: unsupported scheme {scheme!r}; give a file path,"
        " sqlite:///path or postgresql://user@host:port/database"
    )


def parse_ispdb_url(value: str) -> str | None:
    """An https (or http) base URL, ``/`` appended; ``off`` asks no ISPDB."""
    if value.lower() == "off":
        return None
    if not re.match(r"^https?://[^/\s]+", value) or any(c.isspace() for c in value):
        raise ConfigError(
            f"MAILROOM_ISPDB_URL: {value!r} is not an http(s) URL (or 'off' for no ISPDB)"
        )
    return value if value.endswith("/") else value + "/"


DNS_PORT = 53


def parse_dns_servers(value: str) -> tuple[tuple[str, int], ...]:
    """``ip[:port]`` items separated by commas (IPv6 as ``[addr]:port``)."""
    servers: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, port = item, DNS_PORT
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                port = _int("MAILROOM_DNS_SERVERS", rest.removeprefix(":"), 1, 65535)
        elif item.count(":") == 1:
            host, _, text = item.partition(":")
            port = _int("MAILROOM_DNS_SERVERS", text, 1, 65535)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"MAILROOM_DNS_SERVERS: {item!r} is not an IP address with an optional port"
            ) from None
        servers.append((host, port))
    return tuple(servers)


_EHLO_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def parse_ehlo_name(value: str) -> str:
    """A fully qualified domain name or an address literal (``[192.0.2.1]``)."""
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        try:
            ipaddress.ip_address(inner.removeprefix("IPv6:"))
        except ValueError:
            raise ConfigError(f"MAILROOM_EHLO_NAME: {value!r} is not an address literal") from None
        return value
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_EHLO_LABEL.fullmatch(x) for x in labels):
        raise ConfigError(
            f"MAILROOM_EHLO_NAME: {value!r} is not a fully qualified domain name"
            " (like mail.example.com) or an address literal (like [192.0.2.1])"
        )
    return value.rstrip(".")


def _int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ConfigError(f"{name}: {number} is outside {low}..{high}")
    return number


def _float(name: str, value: str, low: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not number >= low:
        raise ConfigError(f"{name}: {number} is below {low}")
    return number


def _delays(value: str) -> tuple[float, ...]:
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise ConfigError("MAILROOM_RETRY_DELAYS: give at least one delay in seconds")
    return tuple(_float("MAILROOM_RETRY_DELAYS", part, 0.0) for part in parts)


def parse_api_keys(value: str) -> tuple[ApiKey, ...]:
    """``key`` or ``tenant:key`` entries, comma-separated."""
    keys: list[ApiKey] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            tenant, key = DEFAULT_TENANT, entry
        if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                "MAILROOM_API_KEYS: a tenant name is letters, digits, '-' and '_' only"
            )
        if len(key) < 16 or not key.isprintable() or " " in key:
            raise ConfigError(
                "MAILROOM_API_KEYS: each key must be at least 16 printable characters"
                " without spaces"
            )
        keys.append(ApiKey(tenant=tenant, key=key))
    if not keys:
        raise ConfigError("MAILROOM_API_KEYS: no key given")
    return tuple(keys)


def decode_secret_key(value: str, source: str) -> bytes:
    """A 32-byte key as base64 (standard or URL-safe alphabet)."""
    text = value.strip()
    try:
        key = base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "==")
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: not valid base64") from None
    if len(key) != SECRET_KEY_BYTES:
        raise ConfigError(
            f"{source}: must decode to {SECRET_KEY_BYTES} bytes (got {len(key)});"
            " make one with: python -c 'import os,base64;"
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"
        )
    return key


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"MAILROOM_ALLOWED_NETWORKS: {entry!r} is not a CIDR") from None
    return tuple(networks)

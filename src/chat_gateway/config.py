"""Configuration, read from the environment (12-factor); CLI flags override.

Every setting has a default that works on a fresh machine with no servers:
SQLite for messages, the in-process broker for fan-out.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from chat_gateway.core import namespaces
from chat_gateway.core.namespaces import Namespaces
from chat_gateway.core.public_keys import load_public_key


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity`` per ``period`` seconds."""

    capacity: int
    period: float

    @classmethod
    def parse(cls, text: str, name: str = "RATE_LIMIT") -> Rate:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*", text)
        if not m or int(m.group(1)) < 1:
            raise ConfigError(
                f"{name}={text!r} is not CAPACITY/PERIOD, e.g. '20/60s', '5/1m' or '100/s'"
            )
        amount = float(m.group(2) or 1)
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(3) or "s"]
        period = amount * unit
        if period <= 0:
            raise ConfigError(f"{name}={text!r} has a period of zero")
        return cls(int(m.group(1)), period)

    def __str__(self) -> str:
        return f"{self.capacity}/{self.period:g}s"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between webhook attempts: exponential from ``first`` up to ``longest``
    seconds, each drawn with full jitter (uniform between 0 and that bound)."""

    first: float
    longest: float

    @classmethod
    def parse(cls, text: str, name: str = "WEBHOOK_BACKOFF") -> Backoff:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*", text)
        if not m or float(m.group(1)) <= 0 or float(m.group(2)) < float(m.group(1)):
            raise ConfigError(
                f"{name}={text!r} is not MIN,MAX seconds with 0 < MIN <= MAX, e.g. '5,3600'"
            )
        return cls(float(m.group(1)), float(m.group(2)))

    def __str__(self) -> str:
        return f"{self.first:g},{self.longest:g}"


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class Settings:
    # env var name is the upper-cased field name unless given in metadata
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "sqlite:///./chat-gateway.db"
    redis_url: str = "memory://"
    # auth: on when any of AUTH_SECRET, AUTH_JWKS_URL, AUTH_PUBLIC_KEY, AUTH_HOOK_URL is set
    auth_secret: str | None = None  # HS256 secret(s), separated by spaces (rotation)
    auth_jwks_url: str | None = None
    auth_public_key: str | None = None  # one PEM public key
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_leeway: float = 5.0
    auth_jwks_refresh: float = 300.0  # seconds between periodic fetches of the JWKS
    auth_jwks_min_interval: float = 5.0  # fewest seconds between two fetches
    auth_jwks_timeout: float = 5.0
    # an http:// AUTH_JWKS_URL (keys anyone on the path could replace) only with this
    auth_jwks_allow_http: bool = False
    # the application's sessions: a request with no bearer token but a cookie is
    # identified by POSTing {cookie, address, path} here (chat_gateway.access.sessions)
    auth_hook_url: str | None = None
    auth_hook_secret: str | None = None  # whsec_ secret(s) signing it; unset: WEBHOOK_SECRET
    auth_hook_cache: float = 60.0  # seconds an answer is kept (never past the session's exp)
    auth_hook_timeout: float = 2.0
    auth_hook_cache_size: int = 10000  # cookies whose answers are kept, least recent dropped
    api_keys: tuple[str, ...] = ()
    # the key GET /metrics needs (Authorization: Bearer); an API key also does.
    # Unset: /metrics needs an API key with auth on, and nothing in open mode
    metrics_key: str | None = None
    rate_limit: Rate = field(default_factory=lambda: Rate(20, 60.0))
    publish_rate_limit: Rate = field(default_factory=lambda: Rate(600, 60.0))
    connect_rate_limit: Rate = field(default_factory=lambda: Rate(60, 60.0))
    # WebSocket subscribe frames per identity (subscribe/unsubscribe churn)
    subscribe_rate_limit: Rate = field(default_factory=lambda: Rate(600, 60.0))
    search_rate_limit: Rate = field(default_factory=lambda: Rate(60, 60.0))
    # read positions marked per identity (HTTP and WS read frames share it)
    read_rate_limit: Rate = field(default_factory=lambda: Rate(120, 60.0))
    # reactions added or removed per identity (HTTP and WS react/unreact share it)
    reaction_rate_limit: Rate = field(default_factory=lambda: Rate(60, 60.0))
    # tokens an instance leases from a shared bucket beyond the decisions waiting
    # (chat_gateway.access.ratelimit; 0: none), and the seconds it may hold them
    rate_limit_lease: int = 16
    rate_limit_lease_hold: float = 0.5
    # room kinds by namespace (chat_gateway.core.namespaces): the TOML file's path
    namespaces_file: Namespaces = field(default_factory=Namespaces)
    trusted_proxies: tuple[str, ...] = ()
    key_prefix: str = "chat:"
    # database pool
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_connect_timeout: float = 5.0
    db_command_timeout: float = 10.0
    db_idle_timeout: float = 300.0
    # limits
    max_body_bytes: int = 64 * 1024
    ws_max_size: int = 64 * 1024
    queue_max_messages: int = 1000
    queue_max_bytes: int = 4 * 1024 * 1024
    history_cache_ttl: int = 3600
    # delivery
    gap_wait: float = 0.25
    position_interval: float = 3.0
    sse_ping: float = 15.0
    # seconds any HTTP response (an SSE stream above all) may find its peer taking
    # nothing before the connection is aborted
    sse_send_timeout: float = 10.0
    # HTTP request bounds: the head must arrive within HTTP_HEADER_TIMEOUT seconds of
    # the connection (or of the previous response) and be at most HTTP_MAX_HEADER_BYTES
    # long; the body must arrive within HTTP_BODY_TIMEOUT seconds of the head
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_max_header_bytes: int = 16 * 1024
    ws_ping_interval: float = 20.0
    # The longest a live frame is held to share a write: on an instance writing more
    # than chat_gateway.delivery.output.HOLD_RATE frames a second, a socket written less than this
    # many seconds ago holds its next live frames up to that long (0: never held;
    # a quiet instance writes every frame at the end of the loop turn). Replies
    # (acks, errors, pongs) never wait.
    ws_write_delay: float = 0.02
    ws_ping_timeout: float = 20.0
    broker_probe_interval: float = 5.0
    redis_timeout: float = 1.0
    # connections: 0 means no limit
    max_connections: int = 10000
    max_connections_per_identity: int = 100
    # rooms one WebSocket may hold at once (each costs a broker channel and a store read)
    max_subscriptions_per_connection: int = 1000
    # presence: a crashed instance's members vanish within PRESENCE_TTL seconds
    presence_ttl: float = 30.0
    # a user's leave is announced only once they stayed away this long (at most
    # PRESENCE_TTL / 3): a quick unsubscribe/subscribe or reconnect announces nothing
    presence_debounce: float = 2.0
    # a user (room) is offline (vacated) once their last connection has been gone
    # this long, on every instance: a reconnect within it sends neither webhook
    presence_offline_after: float = 10.0
    # retention: messages older than RETENTION_DAYS are deleted (unset: kept forever)
    retention_days: float | None = None
    retention_interval: float = 3600.0
    retention_batch: int = 1000
    # state rooms: a deleted key's tombstone is kept this many seconds (a resume
    # from before an older purged one gets a whole snapshot); a value's JSON size cap
    state_tombstone_ttl: float = 86400.0
    state_max_value_bytes: int = 16 * 1024
    # webhooks (docs/webhooks.md): unset WEBHOOK_URLS means off, at no cost
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    webhook_backoff: Backoff = field(default_factory=lambda: Backoff(5.0, 3600.0))
    webhook_timeout: float = 10.0  # seconds per attempt
    webhook_max_attempts: int = 20  # then the event is a dead letter
    webhook_max_age: float = 3 * 86400.0  # seconds after commit; a failure past it is final
    webhook_breaker_failures: int = 5  # consecutive failures that open the breaker
    webhook_breaker_cooldown: float = 30.0  # seconds open before one probe
    webhook_concurrency: int = 16  # attempts in flight per instance
    webhook_poll_interval: float = 0.5  # seconds between claims when nothing wakes it
    webhook_keep_delivered: float = 3 * 86400.0  # seconds delivered events stay replayable
    # the publish hook (chat_gateway.delivery.publish_hook): asked before a user's post
    # or edit is stored; unset: off. Signed with WEBHOOK_SECRET.
    publish_hook_url: str | None = None
    publish_hook_timeout: float = 2.0  # seconds for the whole call
    publish_hook_failure: str = "closed"  # closed: refuse (503); open: store as given
    # search: the Postgres text search configuration messages are indexed and
    # searched with (SQLite's FTS5 splits words the same way whatever it says),
    # and the seconds one search may run before it is cancelled
    search_language: str = "simple"
    search_timeout: float = 2.0
    # operations
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    log_format: str = "json"
    static_dir: str | None = None
    # unexpected errors reported to Sentry (chat_gateway.ops.reports); unset: none
    sentry_dsn: str | None = None
    # test-only fault hook: commit and acknowledge posts but never publish them,
    # as an instance killed right after its commit would
    fault_skip_publish: bool = False
    # test-only fault hook: commit and acknowledge posts but neither raise the
    # cache's seq nor publish, as an instance cut from Redis (not Postgres) would
    fault_cut_from_redis: bool = False
    # test-only fault hook: a post to this room fails with an unexpected error
    # (quoting the post's text, which error reports must not carry)
    fault_fail_room: str | None = None
    # test-only fault hook: the outbox write of each user.offline / room.vacated
    # waits this many seconds after the transition was decided, as a stalled
    # instance's would (another instance's next transition is written first)
    fault_offline_write_delay: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()

    def validated(self) -> Settings:
        if not (self.database_url.startswith(("postgres://", "postgresql://", "sqlite://"))):
            raise ConfigError(
                f"DATABASE_URL={self.database_url!r}: use postgresql://… or sqlite:///PATH"
            )
        if not self.redis_url.startswith(
            (
                "memory://",
                "redis://",
                "rediss://",
                "unix://",
                "redis+cluster://",
                "rediss+cluster://",
                "redis+sentinel://",
                "rediss+sentinel://",
            )
        ):
            raise ConfigError(
                f"REDIS_URL={self.redis_url!r}: use redis://…, rediss://…, "
                "redis+cluster://host:port,…, "
                "redis+sentinel://host:port,…/SERVICE or memory://"
            )
        if "+cluster://" in self.redis_url:
            from chat_gateway.redisio.urls import parse_cluster_url

            try:
                parse_cluster_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if "+sentinel://" in self.redis_url:
            from chat_gateway.redisio.urls import parse_sentinel_url

            try:
                parse_sentinel_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigError(f"PORT={self.port} is out of range")
        if self.db_pool_min < 0 or self.db_pool_max < max(1, self.db_pool_min):
            raise ConfigError("DB_POOL_MAX must be at least 1 and at least DB_POOL_MIN")
        for name in (
            "rate_limit",
            "publish_rate_limit",
            "connect_rate_limit",
            "subscribe_rate_limit",
            "search_rate_limit",
            "read_rate_limit",
            "reaction_rate_limit",
        ):
            rate = getattr(self, name)
            # The bucket's arithmetic is in integers inside a double's exact range.
            if rate.capacity * (rate.period * 1e6 + 2e6) >= 2**53:
                raise ConfigError(f"{name.upper()}={rate}: capacity x period is too large")
        if self.rate_limit_lease < 0:
            raise ConfigError("RATE_LIMIT_LEASE must be >= 0 (0: no tokens leased ahead)")
        if not 0.01 <= self.rate_limit_lease_hold <= 60:
            raise ConfigError("RATE_LIMIT_LEASE_HOLD must be between 0.01 and 60 seconds")
        for name in self.trusted_proxies:
            try:
                ipaddress.ip_network(name, strict=False)
            except ValueError:
                raise ConfigError(f"TRUSTED_PROXIES: {name!r} is not an address or CIDR") from None
        self._validate_auth()
        if self.max_connections < 0 or self.max_connections_per_identity < 0:
            raise ConfigError("MAX_CONNECTIONS and MAX_CONNECTIONS_PER_IDENTITY must be >= 0")
        for name in ("sse_send_timeout", "http_header_timeout", "http_body_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be a positive number of seconds")
        if self.presence_offline_after < 0:
            raise ConfigError("PRESENCE_OFFLINE_AFTER must be >= 0")
        if self.presence_debounce < 0:
            raise ConfigError("PRESENCE_DEBOUNCE must be >= 0 (0: leaves go out at once)")
        if self.state_tombstone_ttl <= 0:
            raise ConfigError("STATE_TOMBSTONE_TTL must be a positive number of seconds")
        if not 1 <= self.state_max_value_bytes <= 65536:
            raise ConfigError("STATE_MAX_VALUE_BYTES must be 1..65536")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ConfigError("RETENTION_DAYS must be positive (unset it to keep messages)")
        self._validate_webhooks()
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.search_language):
            raise ConfigError(
                f"SEARCH_LANGUAGE={self.search_language!r}: use the name of a Postgres text "
                "search configuration, e.g. simple or english"
            )
        if self.search_timeout <= 0:
            raise ConfigError("SEARCH_TIMEOUT must be a positive number of seconds")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL={self.log_level!r}: use debug, info, warning or error")
        for name in (
            "queue_max_messages",
            "queue_max_bytes",
            "ws_max_size",
            "max_body_bytes",
            "presence_ttl",
            "retention_interval",
            "retention_batch",
            "shutdown_timeout",
            "max_subscriptions_per_connection",
            "http_max_header_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be positive")
        return self

    def _validate_auth(self) -> None:
        if self.auth_jwks_url is not None:
            from urllib.parse import urlsplit

            url = urlsplit(self.auth_jwks_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(
                    f"AUTH_JWKS_URL={self.auth_jwks_url!r}: use the https:// "
                    "address of the identity provider's JWKS"
                )
            if url.scheme == "http" and not self.auth_jwks_allow_http:
                raise ConfigError(
                    f"AUTH_JWKS_URL={self.auth_jwks_url!r} is plain http: anyone on the "
                    "path could hand the gateway keys of their own. Use https://, or set "
                    "AUTH_JWKS_ALLOW_HTTP=true for a provider on loopback or a trusted network"
                )
        if self.auth_public_key is not None:
            try:
                load_public_key(self.auth_public_key)
            except ValueError as exc:
                raise ConfigError(f"AUTH_PUBLIC_KEY: {exc}") from None
        if self.auth_leeway < 0:
            raise ConfigError("AUTH_LEEWAY must be zero or positive")
        if not 0 < self.auth_jwks_min_interval <= self.auth_jwks_refresh:
            raise ConfigError(
                "AUTH_JWKS_MIN_INTERVAL must be positive and at most AUTH_JWKS_REFRESH"
            )
        if self.auth_jwks_timeout <= 0:
            raise ConfigError("AUTH_JWKS_TIMEOUT must be positive")
        if self.auth_hook_url is not None:
            self._validate_auth_hook(self.auth_hook_url)

    def _validate_auth_hook(self, hook_url: str) -> None:
        from urllib.parse import urlsplit

        from chat_gateway.webhooks.signing import parse_secrets

        url = urlsplit(hook_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"AUTH_HOOK_URL={hook_url!r}: use the http(s):// address of the "
                "application's session check"
            )
        secret = self.auth_hook_secret or self.webhook_secret
        if not secret:
            raise ConfigError(
                "AUTH_HOOK_URL needs AUTH_HOOK_SECRET (or WEBHOOK_SECRET) to sign its "
                "requests (whsec_<base64>)"
            )
        try:
            parse_secrets(secret)
        except ValueError as exc:
            raise ConfigError(f"AUTH_HOOK_SECRET: {exc}") from None
        if self.auth_hook_cache < 0:
            raise ConfigError("AUTH_HOOK_CACHE must be zero or positive (0: ask every time)")
        if self.auth_hook_timeout <= 0:
            raise ConfigError("AUTH_HOOK_TIMEOUT must be positive")
        if self.auth_hook_cache_size < 1:
            raise ConfigError("AUTH_HOOK_CACHE_SIZE must be positive")

    def _validate_webhooks(self) -> None:
        from chat_gateway.webhooks.egress import check_url
        from chat_gateway.webhooks.signing import parse_secrets

        for url in self.webhook_urls:
            try:
                check_url(url, allow_private=self.webhook_allow_private)
            except ValueError as exc:
                raise ConfigError(f"WEBHOOK_URLS: {exc}") from None
        if len(set(self.webhook_urls)) != len(self.webhook_urls):
            raise ConfigError("WEBHOOK_URLS lists a URL twice")
        if self.webhook_urls and not self.webhook_secret:
            raise ConfigError(
                "WEBHOOK_SECRET is required when WEBHOOK_URLS is set "
                "(whsec_<base64>; several separated by spaces)"
            )
        if self.webhook_secret:
            try:
                parse_secrets(self.webhook_secret)
            except ValueError as exc:
                raise ConfigError(f"WEBHOOK_SECRET: {exc}") from None
        if self.publish_hook_url is not None:
            try:
                check_url(self.publish_hook_url, allow_private=self.webhook_allow_private)
            except ValueError as exc:
                raise ConfigError(f"PUBLISH_HOOK_URL: {exc}") from None
            if not self.webhook_secret:
                raise ConfigError(
                    "WEBHOOK_SECRET is required when PUBLISH_HOOK_URL is set: the hook's "
                    "requests are signed with it (whsec_<base64>)"
                )
        if self.publish_hook_timeout <= 0:
            raise ConfigError("PUBLISH_HOOK_TIMEOUT must be a positive number of seconds")
        if self.publish_hook_failure not in ("closed", "open"):
            raise ConfigError(
                f"PUBLISH_HOOK_FAILURE={self.publish_hook_failure!r}: use closed (refuse "
                "posts while the hook fails) or open (store them as given)"
            )
        for name in (
            "webhook_timeout",
            "webhook_max_attempts",
            "webhook_max_age",
            "webhook_breaker_failures",
            "webhook_breaker_cooldown",
            "webhook_concurrency",
            "webhook_poll_interval",
            "webhook_keep_delivered",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be positive")


_KNOWN_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "float | None": float,
}


def _convert(name: str, type_: Any, raw: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    try:
        if type_name == "Rate":
            return Rate.parse(raw, name.upper())
        if type_name == "Namespaces":
            return namespaces.load(raw, Rate.parse)
        if type_name == "Backoff":
            return Backoff.parse(raw, name.upper())
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if type_name == "bool":
            return _bool(raw)
        return _KNOWN_TYPES[type_name](raw)
    except ConfigError:
        raise
    except namespaces.NamespaceError as exc:
        raise ConfigError(str(exc)) from None
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{name.upper()}={raw!r} is not a valid {type_name}") from exc


def env_names() -> set[str]:
    """The environment variables the gateway reads."""
    return {f.name.upper() for f in fields(Settings)}

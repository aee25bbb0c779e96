"""The gateway's parts: built, started and closed here, handed on as ``Services``.

``Gateway`` owns the store, the broker, the history cache, the hub, the rate
limiter and the rest. Constructing it does no I/O; ``start`` connects (from the
app's lifespan) and makes the parts that need a started broker (reached through
properties that raise ``NotStarted`` before that), and ``close`` releases
everything ``start`` started, last started first. Routes never see it: they get
:attr:`Gateway.services` (chat_gateway.services), the started parts typed.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from chat_gateway.access.auth import Authenticator
from chat_gateway.access.limits import ConnectionLimits
from chat_gateway.access.ratelimit import LocalRateLimiter, RateLimiter, Rates, rates_of
from chat_gateway.access.sessions import SessionHook
from chat_gateway.access.shutdown import Shutdown
from chat_gateway.config import Settings
from chat_gateway.delivery.chat import Chat, RedisChat
from chat_gateway.delivery.commands import Control
from chat_gateway.delivery.hub import Hub
from chat_gateway.delivery.moderation import Moderation
from chat_gateway.delivery.online import Online, RedisOnline
from chat_gateway.delivery.output import Output
from chat_gateway.delivery.presence import Presence, RedisPresence
from chat_gateway.delivery.publish_hook import HttpPublishHook, PublishHook
from chat_gateway.delivery.publisher import Publisher
from chat_gateway.delivery.retention import Retention
from chat_gateway.metrics import Metrics
from chat_gateway.ops.figures import Figures
from chat_gateway.ops.readiness import Readiness
from chat_gateway.ops.shared_figures import RedisSharedFigures, SharedFigures
from chat_gateway.pubsub import create_broker
from chat_gateway.redisio.context import RedisContext
from chat_gateway.services import Services
from chat_gateway.storage import HistoryCache, RedisHistoryCache, Store, create_store
from chat_gateway.storage.base import display_url
from chat_gateway.webhooks import Webhooks
from chat_gateway.webhooks.metrics import WebhookMetrics
from chat_gateway.webhooks.signing import parse_secrets, sign

log = logging.getLogger("gateway")

T = TypeVar("T")


def _nothing() -> None:
    pass


class NotStarted(RuntimeError):
    """A part of the gateway used before ``start`` made it."""


def _started(part: T | None, name: str) -> T:
    if part is None:
        raise NotStarted(f"the gateway's {name} is used before the gateway was started")
    return part


class Gateway:
    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = store or create_store(
            settings.database_url,
            **(
                dict(command_timeout=settings.db_command_timeout)
                if settings.database_url.startswith("sqlite")
                else dict(
                    pool_min=settings.db_pool_min,
                    pool_max=settings.db_pool_max,
                    connect_timeout=settings.db_connect_timeout,
                    command_timeout=settings.db_command_timeout,
                    idle_timeout=settings.db_idle_timeout,
                    search_language=settings.search_language,
                )
            ),
        )
        memory = settings.redis_url.startswith("memory")
        # The one Redis every user shares, the broker included (None without Redis):
        # its client, its failure cooldown and its pipelined connection.
        self.redis: RedisContext | None = (
            None
            if memory
            else RedisContext.for_url(settings.redis_url, command_timeout=settings.redis_timeout)
        )
        self.broker = create_broker(
            settings.redis_url,
            self.redis,
            **(
                {}
                if memory
                else dict(
                    probe_interval=settings.broker_probe_interval,
                    command_timeout=settings.redis_timeout,
                    control_channel=f"{settings.key_prefix}control",
                )
            ),
        )
        self.auth = Authenticator.from_settings(settings)
        # AUTH_HOOK_URL: the application's sessions (chat_gateway.access.sessions)
        self.sessions = _session_hook(settings)
        self.limits = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_identity
        )
        self.started_at = time.time()
        self.shutdown = Shutdown()
        # One id per running instance: its presence members and its shared figures.
        self.instance_id = uuid.uuid4().hex[:12]
        # Only with WEBHOOK_URLS set: otherwise no outbox rows, no dispatcher.
        self.webhooks: Webhooks | None = None
        # Told after every commit of messages or changes; the webhooks' dispatcher,
        # once there is one, sends the events the commit wrote.
        self.committed: Callable[[], None] = _nothing
        # The parts start makes, each reached through its property once made.
        self._history: HistoryCache | None = None
        self._hub: Hub | None = None
        self._presence: Presence | None = None
        self._control: Control | None = None  # server API commands (chat_gateway.delivery.commands)
        self._chat: Chat | None = None  # edits, typing and read receipts
        self._moderation: Moderation | None = None  # bans, mutes, slow mode: the checks
        self._limiter: LocalRateLimiter | None = None
        self._services: Services | None = None
        self._running = contextlib.AsyncExitStack()  # what start started, closed in reverse
        # When direct WebSocket output writes its sockets (chat_gateway.delivery.output).
        self.output = Output(settings.ws_write_delay)

    @property
    def closing(self) -> bool:
        return self.shutdown.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.shutdown.closing = value

    @property
    def history(self) -> HistoryCache:
        return _started(self._history, "history cache")

    @property
    def hub(self) -> Hub:
        return _started(self._hub, "hub")

    @property
    def presence(self) -> Presence:
        return _started(self._presence, "presence")

    @property
    def control(self) -> Control:
        return _started(self._control, "server API control")

    @property
    def chat(self) -> Chat:
        return _started(self._chat, "chat")

    @property
    def moderation(self) -> Moderation:
        return _started(self._moderation, "moderation")

    @property
    def limiter(self) -> LocalRateLimiter:
        return _started(self._limiter, "rate limiter")

    @property
    def services(self) -> Services:
        """The started parts, as routes use them."""
        return _started(self._services, "services")

    def _posted_by_sql(self, room: str, seq: int) -> None:
        """A backend committed a message with SQL (``chat_post``): its outbox rows
        are claimed now and its subscribers here get it from the store."""
        self.hub.committed_elsewhere(room, seq)
        self.committed()

    async def start(self, *, migrate: bool = True) -> None:
        running = self._running
        await self.auth.start()
        running.push_async_callback(self.auth.close)
        if self.sessions is not None:
            running.push_async_callback(self.sessions.close)
        await self.store.start()
        running.push_async_callback(self.store.close)
        if migrate:
            applied = await self.store.migrate()
            if applied:
                log.info("migrations applied: %s", ", ".join(applied))
        if self.settings.webhook_urls:
            # Before the first post: from here every commit writes its events.
            self.webhooks = Webhooks(
                self.store, self.settings, WebhookMetrics(self.metrics.registry)
            )
            await self.webhooks.start()
            self.committed = self.webhooks.poke
        redis = self.redis
        if redis is not None:  # closed after the broker, which publishes through it
            await redis.start()
            running.push_async_callback(redis.close)
        await self.broker.start()
        running.push_async_callback(self.broker.close)
        # Which data this instance serves: a relative SQLite path depends on the
        # working directory, so a start from another folder opens another file.
        broker = display_url(self.settings.redis_url)
        log.info(
            "database: %s; broker: %s",
            self.store.where(),
            broker,
            extra={"database": self.store.where(), "broker": broker},
        )
        if self.webhooks is not None:  # closed before the broker, as it was started before
            running.push_async_callback(self.webhooks.close)
        prefix = self.settings.key_prefix
        ttl = self.settings.history_cache_ttl
        history = self._history = (
            HistoryCache(self.store, prefix=prefix, ttl=ttl, metrics=self.metrics)
            if redis is None
            else RedisHistoryCache(self.store, redis, prefix=prefix, ttl=ttl, metrics=self.metrics)
        )
        running.push_async_callback(history.close)
        hub = self._hub = Hub(
            self.broker,
            history,
            prefix=prefix,
            gap_wait=self.settings.gap_wait,
            position_interval=self.settings.position_interval,
            metrics=self.metrics,
            namespaces=self.settings.namespaces_file,
            tombstone_ttl=self.settings.state_tombstone_ttl,
            origin=self.instance_id,
        )
        await hub.start()
        running.push_async_callback(hub.close)
        self.store.listen(self._posted_by_sql)
        running.push_async_callback(self.store.unlisten)  # before the hub closes
        # Shared across instances in Redis, or this instance's own without one.
        presence_kind: Callable[..., Presence] = (
            Presence if redis is None else partial(RedisPresence, redis=redis)
        )
        online_kind: Callable[..., Online] = (
            Online if redis is None else partial(RedisOnline, redis=redis)
        )
        online = online_kind(
            emit=self.webhooks.record if self.webhooks else None,
            offline_after=self.settings.presence_offline_after,
            ttl=self.settings.presence_ttl,
            prefix=prefix,
            instance=self.instance_id,
            offline_write_delay=self.settings.fault_offline_write_delay,
        )
        await online.start()
        running.push_async_callback(online.close)  # after presence has left
        presence = self._presence = presence_kind(
            self.broker,
            prefix=prefix,
            ttl=self.settings.presence_ttl,
            channel=hub.channel,
            held_rooms=hub.held_rooms,
            debounce=self.settings.presence_debounce,
            instance=self.instance_id,
            notify=self.webhooks.notify if self.webhooks else None,
            tracked=lambda room: self.settings.namespaces_file.of(room).presence,
            online=online,
        )
        await presence.start()
        running.push_async_callback(presence.close)
        parts = (self.settings, self.store, self.broker, hub, history, self.metrics)
        chat = self._chat = (
            Chat(*parts, ensure_open=self.shutdown.ensure_open, committed=self.committed)
            if redis is None
            else RedisChat(
                *parts,
                redis=redis,
                ensure_open=self.shutdown.ensure_open,
                committed=self.committed,
            )
        )
        chat.start()
        running.push_async_callback(chat.close)
        moderation = self._moderation = Moderation(self.store, redis, prefix=prefix)
        moderation.start()
        running.push_async_callback(moderation.close)
        control = self._control = Control(self.broker, hub, presence, history, moderation)
        await control.start()
        running.push_async_callback(control.close)
        # Messages past RETENTION_DAYS (when set) and state tombstones past
        # STATE_TOMBSTONE_TTL.
        retention = Retention(
            self.store,
            history=history,
            days=self.settings.retention_days,
            interval=self.settings.retention_interval,
            batch=self.settings.retention_batch,
            tombstone_ttl=self.settings.state_tombstone_ttl,
        )
        retention.start()
        running.push_async_callback(retention.close)
        figures = Figures(
            self.metrics,
            hub.positions,
            instance_id=self.instance_id,
            started_at=self.started_at,
            closing=self.shutdown.is_closing,
        )
        shared = (
            SharedFigures()
            if redis is None
            else RedisSharedFigures(
                redis,
                prefix,
                instance_id=self.instance_id,
                own=figures.reading,
                describe=figures.describe,
            )
        )
        figures.share(shared)
        shared.start()
        running.push_async_callback(shared.close)
        rates = rates_of(self.settings)
        limiter = self._limiter = (
            LocalRateLimiter(prefix=prefix, metrics=self.metrics, rates=rates)
            if redis is None
            else RateLimiter(
                redis,
                prefix=prefix,
                metrics=self.metrics,
                rates=rates,
                lease=self.settings.rate_limit_lease,
                hold=self.settings.rate_limit_lease_hold,
            )
        )
        running.push_async_callback(limiter.close)
        namespaces = self.settings.namespaces_file
        publish_hook = (
            PublishHook()
            if self.settings.publish_hook_url is None
            else HttpPublishHook(
                self.settings, self.metrics, lambda room: namespaces.of(room).publish_hook
            )
        )
        await publish_hook.start()
        running.push_async_callback(publish_hook.close)
        self.metrics.watch_pool(self.store.stats)
        for warning in self.auth.warnings():
            log.warning(warning)
        self._services = Services(
            settings=self.settings,
            auth=self.auth,
            store=self.store,
            history=history,
            hub=hub,
            publisher=Publisher(
                self.settings,
                self.store,
                self.broker,
                history,
                self.metrics,
                channel=hub.channel,
                ensure_open=self.shutdown.ensure_open,
                committed=self.committed,
                refused=moderation.store_refused,
                changed=chat.announce,
                local=hub.local,
                origin=hub.origin,
            ),
            chat=chat,
            publish_hook=publish_hook,
            moderation=moderation,
            presence=presence,
            control=control,
            rates=Rates(limiter, self.settings.namespaces_file),
            figures=figures,
            readiness=Readiness(
                {"database": self.store.ping, "broker": self.broker.ping},
                self.shutdown.is_closing,
                told=lambda ok: self.metrics.ready.set(1 if ok else 0),
            ),
            webhooks=self.webhooks,
            limits=self.limits,
            output=self.output,
            metrics=self.metrics,
            shutdown=self.shutdown,
        )

    async def close(self) -> None:
        """Close what ``start`` started, last started first."""
        self.shutdown.begin()
        await self._running.aclose()


def _session_hook(settings: Settings) -> SessionHook | None:
    """The session hook of ``AUTH_HOOK_URL``, signing with ``AUTH_HOOK_SECRET`` or else
    ``WEBHOOK_SECRET`` (config checks that one is set); None when unset."""
    if settings.auth_hook_url is None:
        return None
    keys = parse_secrets(settings.auth_hook_secret or settings.webhook_secret or "")
    return SessionHook(
        settings.auth_hook_url,
        sign=partial(sign, keys),
        cache_seconds=settings.auth_hook_cache,
        timeout=settings.auth_hook_timeout,
        max_entries=settings.auth_hook_cache_size,
        leeway=settings.auth_leeway,
    )

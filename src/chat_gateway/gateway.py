"""The gateway's resources and its one write path.

``Gateway`` owns the store, the broker, the history cache, the hub and the
rate limiter. Constructing it does no I/O; ``start`` connects (from the app's
lifespan) and makes the parts that need a started broker (reached through
properties that raise ``NotStarted`` before that), and ``close`` releases
everything ``start`` started, last started first.

A post goes one way: validate, commit in the store (seq assigned there), raise
the cache's seq, publish on the room's channel, acknowledge. The publish is the
fast path only: if it is lost (Redis down, this process killed right after the
commit), every instance finds the message by its position check and fills it
from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from chat_gateway import tracing
from chat_gateway.access.auth import Authenticator, Identity
from chat_gateway.access.limits import ConnectionLimits
from chat_gateway.access.ratelimit import Decision, LocalRateLimiter, RateLimiter
from chat_gateway.config import Settings
from chat_gateway.core.wire import encode_event, encode_message, traced
from chat_gateway.delivery.chat import Chat, RedisChat
from chat_gateway.delivery.commands import Control
from chat_gateway.delivery.hub import Hub
from chat_gateway.delivery.output import Output
from chat_gateway.delivery.presence import Presence
from chat_gateway.delivery.retention import Retention
from chat_gateway.errors import ApiError
from chat_gateway.metrics import Metrics
from chat_gateway.ops import figures
from chat_gateway.ops.figures import Reading, Sampler
from chat_gateway.ops.shared_figures import RedisSharedFigures, SharedFigures
from chat_gateway.pubsub import Broker, BrokerUnavailable, create_broker
from chat_gateway.storage import HistoryCache, Message, Store, create_store
from chat_gateway.storage.base import display_url
from chat_gateway.webhooks import Webhooks
from chat_gateway.webhooks.metrics import WebhookMetrics

log = logging.getLogger("gateway")

POST = "post"  # message posts: HTTP and WS publish frames share one bucket
PUBLISH = "publish"  # POST /v1/publish
CONNECT = "connect"  # WebSocket and SSE connection attempts
SUBSCRIBE = "subscribe"  # WebSocket subscribe frames
SEARCH = "search"  # GET /v1/search
READ = "read"  # read positions marked: POST /v1/rooms/{room}/read and WS read frames
READY_TIMEOUT = 2.0  # seconds each /readyz probe may take

T = TypeVar("T")


def _nothing() -> None:
    pass


def scoped_key(identity: Identity, key: str) -> str:
    """An ``Idempotency-Key`` as stored: qualified by the poster's identity, so keys
    are unique per (room, identity). The kind (a token's ``sub`` or a client
    address) and the name's length come first, so no two (identity, key) pairs
    give the same text whatever characters they hold."""
    kind = "sub" if identity.user else "addr"
    return f"{kind}:{len(identity.name)}:{identity.name}:{key}"


class NotStarted(RuntimeError):
    """A part of the gateway used before ``start`` made it."""


def _started(part: T | None, name: str) -> T:
    if part is None:
        raise NotStarted(f"the gateway's {name} is used before the gateway was started")
    return part


class Gateway:
    def __init__(
        self, settings: Settings, *, store: Store | None = None, broker: Broker | None = None
    ) -> None:
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
        self.broker = broker or create_broker(
            settings.redis_url,
            **(
                {}
                if settings.redis_url.startswith("memory")
                else dict(
                    probe_interval=settings.broker_probe_interval,
                    command_timeout=settings.redis_timeout,
                    control_channel=f"{settings.key_prefix}control",
                )
            ),
        )
        self.auth = Authenticator.from_settings(settings)
        self.limits = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_identity
        )
        self.started_at = time.time()
        self.closing = False
        # One id per running instance: its presence members and its shared figures.
        self.instance_id = uuid.uuid4().hex[:12]
        # This instance alone until start finds a Redis to share figures through.
        self.shared_figures = SharedFigures()
        # Only with WEBHOOK_URLS set: otherwise no outbox rows, no dispatcher.
        self.webhooks: Webhooks | None = None
        # Told after every commit of messages or changes; the webhooks' dispatcher,
        # once there is one, sends the events the commit wrote.
        self.committed: Callable[[], None] = _nothing
        # Holds Redis back after a failure, shared by every user of the broker's
        # client; without Redis one that never holds anything back.
        self.guard = self.broker.guard
        # The parts start makes, each reached through its property once made.
        self._history: HistoryCache | None = None
        self._hub: Hub | None = None
        self._presence: Presence | None = None
        self._control: Control | None = None  # server API commands (chat_gateway.delivery.commands)
        self._chat: Chat | None = None  # edits, typing and read receipts
        self._limiter: LocalRateLimiter | None = None
        self._running = contextlib.AsyncExitStack()  # what start started, closed in reverse
        self._probes: set[asyncio.Task[Any]] = set()  # readiness probes given up on
        # When direct WebSocket output writes its sockets (chat_gateway.delivery.output).
        self.output = Output(settings.ws_write_delay)

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
    def limiter(self) -> LocalRateLimiter:
        return _started(self._limiter, "rate limiter")

    async def start(self, *, migrate: bool = True) -> None:
        running = self._running
        await self.auth.start()
        running.push_async_callback(self.auth.close)
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
        redis = self.broker.redis
        prefix = self.settings.key_prefix
        guard = self.guard
        batch = self.broker.batch
        history = self._history = HistoryCache(
            self.store,
            redis,
            prefix=prefix,
            guard=self.broker.guard,
            ttl=self.settings.history_cache_ttl,
            metrics=self.metrics,
            batch=batch,
        )
        running.push_async_callback(history.close)
        hub = self._hub = Hub(
            self.broker,
            history,
            prefix=prefix,
            gap_wait=self.settings.gap_wait,
            position_interval=self.settings.position_interval,
            metrics=self.metrics,
        )
        await hub.start()
        running.push_async_callback(hub.close)
        presence = self._presence = Presence(
            self.broker,
            redis,
            prefix=prefix,
            ttl=self.settings.presence_ttl,
            channel=hub.channel,
            held_rooms=hub.held_rooms,
            debounce=self.settings.presence_debounce,
            instance=self.instance_id,
            notify=self.webhooks.notify if self.webhooks else None,
        )
        await presence.start()
        running.push_async_callback(presence.close)
        parts = (self.settings, self.store, self.broker, hub, history, self.metrics)
        chat = self._chat = (
            Chat(*parts, ensure_open=self.ensure_open, committed=self.committed)
            if redis is None
            else RedisChat(
                *parts,
                redis=redis,
                guard=guard,
                batch=batch,
                ensure_open=self.ensure_open,
                committed=self.committed,
            )
        )
        chat.start()
        running.push_async_callback(chat.close)
        control = self._control = Control(self.broker, hub, presence, history)
        await control.start()
        running.push_async_callback(control.close)
        if self.settings.retention_days is not None:
            retention = Retention(
                self.store,
                days=self.settings.retention_days,
                interval=self.settings.retention_interval,
                batch=self.settings.retention_batch,
            )
            retention.start()
            running.push_async_callback(retention.close)
        if redis is not None:
            self.shared_figures = RedisSharedFigures(
                redis,
                prefix,
                instance_id=self.instance_id,
                own=self.reading,
                describe=self.describe,
                guard=guard,
            )
        self.shared_figures.start()
        running.push_async_callback(self.shared_figures.close)
        rates = {
            POST: self.settings.rate_limit,
            PUBLISH: self.settings.publish_rate_limit,
            CONNECT: self.settings.connect_rate_limit,
            SUBSCRIBE: self.settings.subscribe_rate_limit,
            SEARCH: self.settings.search_rate_limit,
            READ: self.settings.read_rate_limit,
        }
        self._limiter = (
            LocalRateLimiter(prefix=prefix, metrics=self.metrics, rates=rates)
            if redis is None
            else RateLimiter(
                redis, prefix=prefix, metrics=self.metrics, guard=guard, rates=rates, batch=batch
            )
        )
        self.metrics.watch_pool(self.store.stats)
        for warning in self.auth.warnings():
            log.warning(warning)

    async def close(self) -> None:
        """Close what ``start`` started, last started first."""
        self.closing = True
        await self._running.aclose()

    # -- figures -----------------------------------------------------------

    def reading(self) -> Reading:
        """This instance's figures now (chat_gateway.ops.figures)."""
        return figures.read(self.metrics, self.hub.room_stats())

    def describe(self) -> dict[str, Any]:
        return figures.describe_instance(self.instance_id, self.started_at, self.closing)

    def sampler(self, *, cluster: bool) -> Sampler:
        """Snapshots of this instance's figures, or with ``cluster`` of every instance's."""
        return Sampler(self.reading, self.describe, self.shared_figures.others if cluster else None)

    # -- the write path ----------------------------------------------------

    def ensure_open(self) -> None:
        """Refuse new work (a post, a change, a connection) once the instance shuts down."""
        if self.closing:
            raise ApiError("unavailable", "the instance is shutting down; retry on another")

    async def rate(self, action: str, identity: str) -> Decision:
        decision = await self.limiter.hit(action, identity)
        if not decision.allowed:
            raise ApiError(
                "rate_limited",
                f"too many requests; retry in {decision.retry_after:.1f} s",
                headers=decision.headers(),
                retry_after=round(decision.retry_after, 3),
            )
        return decision

    async def post(
        self,
        room: str,
        author: str,
        text: str,
        *,
        identity: Identity,
        transport: str,
        idempotency_key: str | None = None,
    ) -> tuple[Message, bool]:
        """Commit one post by ``identity``; return the message and whether it is new.

        An ``idempotency_key`` is the poster's own: it is stored qualified by the
        identity (:func:`scoped_key`), so another identity's equal key is another
        key. A repeat whose message differs (text or author) from the one the key
        first stored is refused with ``idempotency_conflict``. A store that cannot
        be reached raises ``StoreUnavailable`` (nothing was stored).
        """
        self.ensure_open()
        if room == self.settings.fault_fail_room:  # test-only: an unexpected failure
            raise RuntimeError(f"injected failure while posting {text!r}")
        key = None if idempotency_key is None else scoped_key(identity, idempotency_key)
        msg, created = await self.store.append(room, author, text, key)
        if created:
            self.metrics.messages_accepted.labels(transport).inc()
            self.committed()
            await self._announce([msg])
        elif msg.text != text or msg.author != author:
            raise ApiError(
                "idempotency_conflict",
                "this Idempotency-Key was already used in this room for a different "
                "message; use a new key for a new message",
            )
        return msg, created

    async def post_many(
        self, posts: list[tuple[str, str, str]], *, transport: str
    ) -> list[Message]:
        """Commit ``(room, author, text)`` posts in this order, together where the
        store can (one connection's publishes that arrived during a commit). A store
        that cannot be reached raises ``StoreUnavailable`` (nothing was stored)."""
        self.ensure_open()
        msgs = await self.store.append_many(posts)
        self.metrics.messages_accepted.labels(transport).inc(len(msgs))
        self.committed()
        await self._announce(msgs)
        return msgs

    async def _announce(self, msgs: list[Message]) -> None:
        """Raise the cache's seq, then publish, per message in order. Where the broker
        carries commands for the cache's Redis (they share a healthy client) all go
        in one round trip, with whatever other callers send at the same moment
        (chat_gateway.redisio.pipelined), each command's failure keeping its meaning (an
        unraised seq is retried by the cache, a lost publish is filled from the
        store by every position check)."""
        history, hub = self.history, self.hub
        trace = tracing.traceparent()  # None unless tracing is on (chat_gateway.tracing)
        if self.settings.fault_cut_from_redis:  # test-only: Redis unreachable from here
            return
        if self.settings.fault_skip_publish:  # test-only: killed after commit
            for msg in msgs:
                await history.committed(msg)
            return
        if not self.broker.carries(history.redis):
            for msg in msgs:
                await history.committed(msg)
                try:
                    await self.broker.publish(
                        hub.channel(msg.room), traced(encode_message(msg), trace)
                    )
                except BrokerUnavailable as exc:
                    log.warning("live publish lost, delivery falls back to the store: %s", exc)
            return
        sent = await self.broker.publish_batch(
            [(hub.channel(msg.room), traced(encode_message(msg), trace)) for msg in msgs],
            ahead=[history.raise_command(msg) for msg in msgs],
        )
        for msg, (raised, lost) in zip(msgs, sent, strict=True):
            await history.queued_result(msg, raised)
            if lost is not None:
                log.warning("live publish lost, delivery falls back to the store: %r", lost)

    async def publish_event(self, room: str, event: str, data: Any) -> None:
        try:
            await self.broker.publish(self.hub.channel(room), encode_event(room, event, data))
        except BrokerUnavailable:
            raise ApiError(
                "unavailable", "the broker is unavailable; the event was not published"
            ) from None
        self.metrics.events_published.inc()

    async def publish_events(self, rooms: list[str], event: str, data: Any) -> None:
        """One ephemeral event to each of ``rooms`` (the server API's broadcast): in one
        round trip where the broker has a pipelined connection, else one publish
        after another (never all at once: that would take a pooled connection each)."""
        hub = self.hub
        unavailable = ApiError(
            "unavailable", "the broker is unavailable; the event was not published to every room"
        )
        try:
            sent = await self.broker.publish_batch(
                [(hub.channel(room), encode_event(room, event, data)) for room in rooms]
            )
        except BrokerUnavailable:
            raise unavailable from None
        published = sum(1 for outcome in sent if outcome.lost is None)
        self.metrics.events_published.inc(published)
        if published < len(rooms):
            log.warning(
                "broadcast not published to every room: %r",
                next(outcome.lost for outcome in sent if outcome.lost is not None),
            )
            raise unavailable

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Probe each dependency; answered within ``READY_TIMEOUT`` whatever the network
        does: a probe still running then is reported failed and left to end in the
        background (waiting for its cancellation could take as long as the link)."""
        t0 = time.perf_counter()

        def took() -> float:
            return round((time.perf_counter() - t0) * 1000, 2)

        async def check(probe: Any) -> dict[str, Any]:
            try:
                await probe()
            except Exception as exc:
                return {"ok": False, "error": str(exc) or type(exc).__name__, "latency_ms": took()}
            return {"ok": True, "latency_ms": took()}

        probes = {
            name: asyncio.ensure_future(check(probe))
            for name, probe in (("database", self.store.ping), ("broker", self.broker.ping))
        }
        try:
            await asyncio.wait(probes.values(), timeout=READY_TIMEOUT)
        finally:
            for task in probes.values():
                if not task.done():
                    task.cancel()
                    self._probes.add(task)  # held until it ends
                    task.add_done_callback(self._probes.discard)
        results = {
            name: task.result()
            if task.done() and not task.cancelled()
            else {
                "ok": False,
                "error": f"no answer within {READY_TIMEOUT:g} s",
                "latency_ms": took(),
            }
            for name, task in probes.items()
        }
        ok = all(r["ok"] for r in results.values()) and not self.closing
        self.metrics.ready.set(1 if ok else 0)
        return ok, results

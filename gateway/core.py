"""The gateway's resources and its one write path.

``Gateway`` owns the store, the broker, the history cache, the hub and the
rate limiter. Constructing it does no I/O; ``start`` connects (from the app's
lifespan) and ``close`` releases everything.

A post goes one way: validate, commit in the store (seq assigned there), raise
the cache's seq, publish on the room's channel, acknowledge. The publish is the
fast path only: if it is lost (Redis down, this process killed right after the
commit), every instance finds the message by its position check and fills it
from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from gateway.auth import Authenticator, Identity
from gateway.config import Settings
from gateway.control import Control
from gateway.errors import ApiError
from gateway.hub import Hub, wire_event, wire_message
from gateway.limits import ConnectionLimits
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.ratelimit import Decision, RateLimiter
from gateway.retention import Retention
from gateway.stats import Beacon
from gateway.wsout import Output
from pubsub import Broker, BrokerUnavailable, create_broker
from storage import HistoryCache, Message, Store, StoreUnavailable, create_store
from webhooks import Webhooks
from webhooks.metrics import WebhookMetrics

log = logging.getLogger("gateway")

POST = "post"  # message posts: HTTP and WS publish frames share one bucket
PUBLISH = "publish"  # POST /v1/publish
CONNECT = "connect"  # WebSocket and SSE connection attempts
SUBSCRIBE = "subscribe"  # WebSocket subscribe frames
READY_TIMEOUT = 2.0  # seconds each /readyz probe may take


def scoped_key(identity: Identity, key: str) -> str:
    """An ``Idempotency-Key`` as stored: qualified by the poster's identity, so keys
    are unique per (room, identity). The kind (a token's ``sub`` or a client
    address) and the name's length come first, so no two (identity, key) pairs
    give the same text whatever characters they hold."""
    kind = "sub" if identity.user else "addr"
    return f"{kind}:{len(identity.name)}:{identity.name}:{key}"


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
        self.history: HistoryCache | None = None
        self.hub: Hub | None = None
        self.limiter: RateLimiter | None = None
        self.presence: Presence | None = None
        self.retention: Retention | None = None
        self.limits = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_identity
        )
        self.started_at = time.time()
        self.closing = False
        # One id per running instance: its presence members and its stats entry.
        self.instance_id = uuid.uuid4().hex[:12]
        self.beacon: Beacon | None = None
        self.control: Control | None = None  # server API commands (gateway.control)
        self._probes: set[asyncio.Task[Any]] = set()  # readiness probes given up on
        # Only with WEBHOOK_URLS set: otherwise no outbox rows, no dispatcher.
        self.webhooks: Webhooks | None = None
        self.chat: Any = None  # typing and read receipts (gateway.chat.Chat)
        # When direct WebSocket output writes its sockets (gateway.wsout).
        self.output = Output(settings.ws_write_delay)

    async def start(self, *, migrate: bool = True) -> None:
        await self.auth.start()
        await self.store.start()
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
        await self.broker.start()
        redis = self.broker.redis
        prefix = self.settings.key_prefix
        guard = self.broker.guard
        batch = getattr(self.broker, "batch", None)
        self.history = HistoryCache(
            self.store,
            redis,
            prefix=prefix,
            guard=guard,
            ttl=self.settings.history_cache_ttl,
            metrics=self.metrics,
            batch=batch,
        )
        self.hub = Hub(
            self.broker,
            self.history,
            prefix=prefix,
            gap_wait=self.settings.gap_wait,
            position_interval=self.settings.position_interval,
            metrics=self.metrics,
        )
        await self.hub.start()
        hub = self.hub
        self.presence = Presence(
            self.broker,
            redis,
            prefix=prefix,
            ttl=self.settings.presence_ttl,
            channel=hub.channel,
            held_rooms=lambda: list(hub.rooms),
            debounce=self.settings.presence_debounce,
            instance=self.instance_id,
            notify=self.webhooks.notify if self.webhooks else None,
        )
        await self.presence.start()
        self.control = Control(self.broker, hub, self.presence, self.history)
        await self.control.start()
        from gateway.chat import Chat  # it uses this module's names

        self.chat = Chat(self)
        self.chat.start()
        if redis is not None:
            self.beacon = Beacon(self, redis, prefix, guard=guard)
            self.beacon.start()
        if self.settings.retention_days is not None:
            self.retention = Retention(
                self.store,
                days=self.settings.retention_days,
                interval=self.settings.retention_interval,
                batch=self.settings.retention_batch,
            )
            self.retention.start()
        self.limiter = RateLimiter(
            redis,
            prefix=prefix,
            metrics=self.metrics,
            guard=guard,
            rates={
                POST: self.settings.rate_limit,
                PUBLISH: self.settings.publish_rate_limit,
                CONNECT: self.settings.connect_rate_limit,
                SUBSCRIBE: self.settings.subscribe_rate_limit,
            },
            batch=batch,
        )
        self.metrics.watch_pool(self.store.stats)
        for warning in self.auth.warnings():
            log.warning(warning)

    async def close(self) -> None:
        self.closing = True
        if self.beacon is not None:
            await self.beacon.close()
        if self.retention is not None:
            await self.retention.close()
        if self.control is not None:
            await self.control.close()
        if self.chat is not None:
            await self.chat.close()
        if self.presence is not None:
            await self.presence.close()
        if self.hub is not None:
            await self.hub.close()
        if self.history is not None:
            await self.history.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.broker.close()
        await self.store.close()
        await self.auth.close()

    # -- the write path ----------------------------------------------------

    async def rate(self, action: str, identity: str) -> Decision:
        assert self.limiter is not None
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
        first stored is refused with ``idempotency_conflict``.
        """
        if self.closing:
            raise ApiError("unavailable", "the instance is shutting down; retry on another")
        assert self.history is not None and self.hub is not None
        key = None if idempotency_key is None else scoped_key(identity, idempotency_key)
        try:
            msg, created = await self.store.append(room, author, text, key)
        except StoreUnavailable as exc:
            log.warning("post refused: %s", exc)
            raise ApiError(
                "unavailable", "the message store is unavailable; nothing was stored, retry later"
            ) from None
        if created:
            self.metrics.messages_accepted.labels(transport).inc()
            if self.webhooks is not None:
                self.webhooks.poke()
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
        store can (one connection's publishes that arrived during a commit)."""
        if self.closing:
            raise ApiError("unavailable", "the instance is shutting down; retry on another")
        try:
            msgs = await self.store.append_many(posts)
        except StoreUnavailable as exc:
            log.warning("post refused: %s", exc)
            raise ApiError(
                "unavailable", "the message store is unavailable; nothing was stored, retry later"
            ) from None
        self.metrics.messages_accepted.labels(transport).inc(len(msgs))
        if self.webhooks is not None:
            self.webhooks.poke()
        await self._announce(msgs)
        return msgs

    async def _announce(self, msgs: list[Message]) -> None:
        """Raise the cache's seq, then publish, per message in order. When the cache and
        the broker share a healthy Redis client all go in one pipeline, with whatever
        other callers send at the same moment (pubsub.batch): one round trip, each
        command's failure keeping its meaning (an unraised seq is retried by the
        cache, a lost publish is filled from the store by every position check)."""
        assert self.history is not None and self.hub is not None
        if self.settings.fault_cut_from_redis:  # test-only: Redis unreachable from here
            return
        skip_publish = self.settings.fault_skip_publish  # test-only: killed after commit
        redis = self.history.redis
        batch = getattr(self.broker, "batch", None)
        publish_command = getattr(self.broker, "publish_command", None)
        guard = self.broker.guard
        if (
            redis is None
            or batch is None
            or publish_command is None
            or redis is not self.broker.redis
            or (guard is not None and not guard.usable())
        ):
            for msg in msgs:
                await self.history.committed(msg)
                if skip_publish:
                    continue
                try:
                    await self.broker.publish(self.hub.channel(msg.room), wire_message(msg))
                except BrokerUnavailable as exc:
                    log.warning("live publish lost, delivery falls back to the store: %s", exc)
            return
        step = 1 if skip_publish else 2  # commands per message
        commands = []
        for msg in msgs:
            commands.append(self.history.raise_command(msg))
            if not skip_publish:
                commands.append(publish_command(self.hub.channel(msg.room), wire_message(msg)))
        try:
            results = await batch.run(commands)
        except Exception as exc:
            if guard is not None:
                guard.failed()
            results = [exc] * (step * len(msgs))
        for i, msg in enumerate(msgs):
            await self.history.queued_result(msg, results[step * i])
            if not skip_publish and isinstance(results[step * i + 1], Exception):
                log.warning(
                    "live publish lost, delivery falls back to the store: %r", results[step * i + 1]
                )

    async def publish_event(self, room: str, event: str, data: Any) -> None:
        assert self.hub is not None
        try:
            await self.broker.publish(self.hub.channel(room), wire_event(room, event, data))
        except BrokerUnavailable:
            raise ApiError(
                "unavailable", "the broker is unavailable; the event was not published"
            ) from None
        self.metrics.events_published.inc()

    async def publish_events(self, rooms: list[str], event: str, data: Any) -> None:
        """One ephemeral event to each of ``rooms`` (the server API's broadcast): in one
        round trip over the command batch where the broker has one, else one publish
        after another (never all at once: that would take a pooled connection each)."""
        assert self.hub is not None
        batch = getattr(self.broker, "batch", None)
        publish_command = getattr(self.broker, "publish_command", None)
        guard = self.broker.guard
        if batch is None or publish_command is None:
            for room in rooms:
                await self.publish_event(room, event, data)
            return
        unavailable = ApiError(
            "unavailable", "the broker is unavailable; the event was not published to every room"
        )
        if guard is not None and not guard.usable():
            raise unavailable
        try:
            results = await batch.run(
                [
                    publish_command(self.hub.channel(room), wire_event(room, event, data))
                    for room in rooms
                ]
            )
        except Exception as exc:
            log.warning("broadcast not published: %r", exc)
            results = [exc]
        if any(isinstance(r, BaseException) for r in results):
            if guard is not None:
                guard.failed()
            raise unavailable
        self.metrics.events_published.inc(len(rooms))

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
        return ok, results

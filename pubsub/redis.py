"""Redis Pub/Sub broker (``redis.asyncio``).

One subscriber connection per process carries every room channel this
instance holds; publishing and keys (cache, rate limits) share one pool.
Over ``redis+sentinel://`` that pool is redis-py's Sentinel-managed one
(:mod:`pubsub.sentinel`): each connection it opens, the subscriber link's
included, goes to the primary the sentinels name at that moment, so the
reconnect below is also how the broker follows a failover.

The subscriber link is watched: when nothing has arrived for
``probe_interval`` seconds a PING goes down the link, and a link that answers
neither data nor PONG within ``probe_timeout`` is dropped as dead. A dropped
link is re-established with exponential backoff, every channel is subscribed
again, and ``on_reconnect`` fires so the gateway can fill from the store what
was published while it was away. ``subscribe`` only records the channel when
the link is down; the reconnect subscribes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pubsub.base import Broker, BrokerUnavailable, RedisGuard
from pubsub.batch import CommandBatch
from pubsub.sentinel import SCHEMES as SENTINEL_SCHEMES
from pubsub.sentinel import sentinel_client

log = logging.getLogger("pubsub.redis")


def redis_address(url: str) -> str:
    """Where a Redis URL points, for a log line: ``host:port`` or a socket's path."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 1.0,
        control_channel: str = "chat:control",
    ) -> None:
        super().__init__()
        if probe_interval <= 0:
            raise ValueError("probe_interval must be positive")
        self.url = url
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout or max(1.0, probe_interval)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.control_channel = control_channel
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._channels: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.guard: RedisGuard = RedisGuard()
        self.batch: CommandBatch | None = None  # commands of many callers, one pipeline
        self._sentinel: Any = None  # over redis+sentinel://, the sentinels' clients

    @property
    def redis(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokerUnavailable("the broker is not started")
        return self._client

    def _make_client(self) -> aioredis.Redis:
        connection: dict[str, Any] = dict(
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.command_timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        if self.url.startswith(SENTINEL_SCHEMES):
            # Every connection this client opens asks the sentinels for the primary.
            self._sentinel, client = sentinel_client(self.url, **connection)
            return client  # type: ignore[no-any-return]
        return aioredis.from_url(self.url, **connection)

    async def start(self) -> None:
        # No failure here when Redis is down: the reader keeps trying, and
        # /readyz reports the broker until it answers.
        self._client = self._make_client()
        self.batch = CommandBatch(self._client)
        self._reader = asyncio.create_task(self._run(), name="broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        await self._drop_pubsub()
        if self.batch is not None:
            await self.batch.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            await sentinel.aclose()

    async def _drop_pubsub(self) -> None:
        self.connected.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
            except (TimeoutError, RedisError, OSError):
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        first = True
        warned = False
        while True:
            try:
                pubsub = self.redis.pubsub()
                # The control channel keeps the link open (and probed) with no room held.
                held = set(self._channels)
                await pubsub.subscribe(self.control_channel, *sorted(held))
                self._pubsub = pubsub
                # Channels added or dropped while that subscribe was in flight.
                if self._channels - held:
                    await pubsub.subscribe(*sorted(self._channels - held))
                if held - self._channels:
                    await pubsub.unsubscribe(*sorted(held - self._channels))
                self.guard.reset()
                self.connected.set()
                if not first:
                    self.reconnects += 1
                    log.warning(
                        "broker link restored; resubscribed %d channels", len(self._channels)
                    )
                if not first or self._channels:
                    self.on_reconnect()
                first = False
                backoff = 0.05
                await self._read(pubsub, loop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():
                    log.warning("broker link lost: %r", exc)
                elif first and not warned:  # once, until the first link is made
                    warned = True
                    log.warning(
                        "Redis at %s is unreachable at start (%s); running degraded "
                        "until it answers (/readyz reports the broker)",
                        redis_address(self.url),
                        exc,
                    )
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read(self, pubsub: Any, loop: asyncio.AbstractEventLoop) -> None:
        last_seen = loop.time()
        probe_sent: float | None = None
        while True:
            msg = await pubsub.get_message(timeout=min(0.5, self.probe_interval))
            now = loop.time()
            if msg is not None:
                last_seen = now
                probe_sent = None
                kind = msg["type"]
                if kind in ("message", b"message"):
                    channel = msg["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    if channel == self.control_channel:
                        self.on_control(msg["data"])
                    else:
                        self.on_message(channel, msg["data"])
                continue
            if probe_sent is None and now - last_seen >= self.probe_interval:
                await pubsub.ping()
                probe_sent = now
            elif probe_sent is not None and now - probe_sent > self.probe_timeout:
                raise RedisConnectionError("subscriber link silent: no PONG to the probe")

    async def publish(self, channel: str, data: bytes) -> None:
        if not self.guard.usable():
            raise BrokerUnavailable("Redis failed moments ago; not waiting on it again yet")
        try:
            await self.redis.publish(channel, data)
        except (RedisError, OSError) as exc:
            self.guard.failed()
            raise BrokerUnavailable(f"Redis publish failed: {exc!r}") from exc

    async def publish_control(self, data: bytes) -> None:
        """Published on the control channel, which every instance's link holds (this
        one's too, so the sender acts through the same path as the others)."""
        await self.publish(self.control_channel, data)

    def publish_command(self, channel: str, data: bytes) -> tuple[Any, ...]:
        """``publish`` as one command for :attr:`batch` (this broker's client), so a
        post's cache update and publish share one round trip."""
        return ("PUBLISH", channel, data)

    async def subscribe(self, channel: str) -> None:
        if channel in self._channels:
            return
        self._channels.add(channel)
        await self._send("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        await self._send("unsubscribe", channel)

    async def _send(self, command: str, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # the reconnect applies the channel set
        try:
            await getattr(pubsub, command)(channel)
        except (RedisError, OSError) as exc:
            # The link is failing; the reader notices, reconnects and resubscribes the set.
            log.warning("broker %s %s failed: %r", command, channel, exc)

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {exc!r}") from exc
        if not self.connected.is_set():
            raise BrokerUnavailable("Redis answers, but the subscriber link is not up yet")

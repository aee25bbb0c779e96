"""The broker interface: moves opaque payloads between gateway instances.

Contract:

- ``publish(channel, data)`` hands ``data`` to every instance subscribed to
  ``channel`` at that moment, at most once (Redis Pub/Sub gives no more). The
  gateway turns that into exactly-once, in-order delivery with seqs and the
  store; the broker only has to keep the order of one publisher's messages on
  one channel.
- Received payloads go to ``on_message(channel, data)``, called on the event
  loop in arrival order; it must not block (the hub only enqueues).
- ``subscribe``/``unsubscribe`` change what this instance receives. They are
  idempotent and raise ``BrokerUnavailable`` if the broker cannot be reached, in
  which case nothing changed.
- When the link drops, the broker reconnects with backoff by itself, restores
  every subscription, then calls ``on_reconnect()``: anything published in
  between was lost to this instance and the caller fills it from the store.
- ``publish_control(data)`` hands ``data`` to ``on_control(data)`` on every
  instance sharing the broker, this one included, at most once, in publish
  order per publisher: commands that act on every instance (the server API).
  It raises ``BrokerUnavailable`` when nothing could be sent. The control
  channel is held from ``start`` to ``close`` and restored with the others.
- Constructors do no I/O; ``start`` connects, ``close`` releases everything.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

MessageHandler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], None]
ControlHandler = Callable[[bytes], None]


class BrokerUnavailable(Exception):
    """The broker cannot be reached; nothing was published or (un)subscribed."""


class RedisGuard:
    """Skip Redis for ``cooldown`` seconds after a command failed or timed out.

    Shared by every user of one Redis client (publish, history cache, rate
    limiter): during an outage, or while the link is silent, one caller pays
    the timeout and the others fall back at once (store reads, per-instance
    buckets, delivery by the position check) instead of each waiting it out.

    ``key`` names the Redis key (or sharded channel) a call is about. One Redis
    server fails as a whole, so this guard ignores it; over a cluster
    (``pubsub.cluster.ShardGuard``) it picks the shard, and only the shard that
    failed is skipped. A call about no one key passes None.

    ``failed`` is for a call that was made and failed, never for one skipped
    because of the cooldown: each report starts the cooldown anew, so a busy
    caller reporting its skips would keep the instance off Redis for as long as
    it is busy. After the cooldown the next call tries Redis.
    """

    def __init__(self, cooldown: float = 1.0) -> None:
        self.cooldown = cooldown
        self._until: dict[str, float] = {}

    def shard(self, key: str | None) -> str:
        """Which cooldown ``key`` falls under: the one server's."""
        return ""

    def usable(self, key: str | None = None) -> bool:
        return self.shard_usable(self.shard(key))

    def failed(self, key: str | None = None) -> None:
        self.shard_failed(self.shard(key))

    # A caller that needs the shard itself (the rate limiter's fallback state)
    # looks it up once with shard() and passes it to these.
    def shard_usable(self, shard: str) -> bool:
        return time.monotonic() >= self._until.get(shard, 0.0)

    def shard_failed(self, shard: str) -> None:
        self._until[shard] = time.monotonic() + self.cooldown

    def reset(self) -> None:
        """End every cooldown: a subscriber link was just restored, so Redis answers.
        (What was skipped before is filled from the store by the reconnect.)"""
        self._until.clear()


class Broker(ABC):
    on_message: MessageHandler
    on_reconnect: ReconnectHandler
    on_control: ControlHandler

    def __init__(self) -> None:
        self.on_message = lambda channel, data: None
        self.on_reconnect = lambda: None
        self.on_control = lambda data: None
        self.reconnects = 0

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, channel: str, data: bytes) -> None: ...

    @abstractmethod
    async def subscribe(self, channel: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abstractmethod
    async def publish_control(self, data: bytes) -> None:
        """Send ``data`` to ``on_control`` of every instance, this one included."""

    @abstractmethod
    async def ping(self) -> None:
        """One round trip; raises BrokerUnavailable."""

    guard: RedisGuard | None = None

    @property
    def redis(self) -> Any | None:
        """The Redis client for keys (cache, rate limits, presence); None in memory mode."""
        return None


def create_broker(url: str, **options: Any) -> Broker:
    """Pick the implementation by URL; the driver is imported only in its branch."""
    if url.startswith("memory://"):
        from pubsub.memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(
        ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
    ):
        from pubsub.redis import RedisBroker

        return RedisBroker(url, **options)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from pubsub.cluster import ClusterBroker

        return ClusterBroker(url, **options)
    raise ValueError(
        f"unsupported REDIS_URL {url!r}: use redis://…, rediss://…, "
        "redis+cluster://…, redis+sentinel://… or memory://"
    )

"""Skipping Redis right after it failed: one cooldown shared by every user of a client.

:class:`RedisGuard` serves one Redis server, :class:`ShardGuard` a cluster (a
cooldown per primary), and :data:`NO_GUARD` a user with no guard of its own
(tests, tools): it never skips and forgets every failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError


def pool_exhausted(exc: BaseException | None) -> bool:
    """Whether ``exc`` says this process' pool had no connection to give, not that
    Redis failed: redis-py's ``MaxConnectionsError``, or the ``ConnectionError`` a
    ``BlockingConnectionPool`` raises from its wait's ``TimeoutError``."""
    if isinstance(exc, MaxConnectionsError):
        return True
    return type(exc) is RedisConnectionError and isinstance(exc.__cause__, asyncio.TimeoutError)


class RedisGuard:
    """Skip Redis for ``cooldown`` seconds after a command failed or timed out.

    Shared by every user of one Redis client (publish, history cache, rate
    limiter): during an outage, or while the link is silent, one caller pays
    the timeout and the others fall back at once (store reads, per-instance
    buckets, delivery by the position check) instead of each waiting it out.

    ``key`` names the Redis key (or sharded channel) a call is about. One Redis
    server fails as a whole, so this guard ignores it; over a cluster
    (:class:`ShardGuard`) it picks the shard, and only the shard that failed is
    skipped. A call about no one key passes None.

    ``failed`` is for a call that was made and failed, never for one skipped
    because of the cooldown: each report starts the cooldown anew, so a busy
    caller reporting its skips would keep the instance off Redis for as long as
    it is busy. After the cooldown the next call tries Redis. A call that failed
    only because the client's pool had no connection free in time (``exc``, see
    :func:`pool_exhausted`) is no news about Redis: one feature's burst must not
    send every other one off Redis, so it starts no cooldown.
    """

    def __init__(self, cooldown: float = 1.0) -> None:
        self.cooldown = cooldown
        self._until: dict[str, float] = {}

    def shard(self, key: str | None) -> str:
        """Which cooldown ``key`` falls under: the one server's."""
        return ""

    def usable(self, key: str | None = None) -> bool:
        return self.shard_usable(self.shard(key))

    def failed(self, key: str | None = None, exc: BaseException | None = None) -> None:
        self.shard_failed(self.shard(key), exc)

    # A caller that needs the shard itself (the rate limiter's fallback state)
    # looks it up once with shard() and passes it to these.
    def shard_usable(self, shard: str) -> bool:
        return time.monotonic() >= self._until.get(shard, 0.0)

    def shard_failed(self, shard: str, exc: BaseException | None = None) -> None:
        if not pool_exhausted(exc):
            self._until[shard] = time.monotonic() + self.cooldown

    def reset(self) -> None:
        """End every cooldown: a subscriber link was just restored, so Redis answers.
        (What was skipped before is filled from the store by the reconnect.)"""
        self._until.clear()


class _NoGuard(RedisGuard):
    """Never skips: failures are not remembered (see :data:`NO_GUARD`)."""

    def shard_usable(self, shard: str) -> bool:
        return True

    def shard_failed(self, shard: str, exc: BaseException | None = None) -> None:
        pass


# For a Redis user built without a shared guard, and the broker of ``memory://``.
NO_GUARD: RedisGuard = _NoGuard(cooldown=0.0)


class ShardGuard(RedisGuard):
    """A cooldown per cluster primary: after a call to one shard fails, the cache,
    rate limiter and presence fall back at once for ``cooldown`` seconds for keys
    on that shard, and use the other shards as before. ``client`` gives the
    ``RedisCluster`` whose slot map names the shards (None before it exists)."""

    def __init__(self, client: Callable[[], Any | None], cooldown: float = 1.0) -> None:
        super().__init__(cooldown)
        self._client = client

    def shard(self, key: str | None) -> str:
        client = self._client()
        if key is None or client is None:
            return ""
        try:
            return str(client.nodes_manager.get_node_from_slot(client.keyslot(key)).name)
        except (RedisError, LookupError, AttributeError):  # the slot map is not read yet
            return ""

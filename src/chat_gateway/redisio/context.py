"""One Redis as every user of it shares it: the client for keys, the cooldown
after a failure (:mod:`chat_gateway.redisio.guard`) and, over one server, the
pipelined connection (:mod:`chat_gateway.redisio.pipelined`).

The same context is handed to the broker and to each user of keys (history
cache, chat, presence, rate limiter, shared figures), so that a failure one of
them sees makes the others fall back at once, and a post's cache update can go
in the broker's round trip. Nobody asks the broker for its Redis.

- :meth:`RedisContext.for_url` makes the context of a ``REDIS_URL`` (one server,
  Sentinel or Cluster); its client is built by :meth:`RedisContext.start` and
  released by :meth:`RedisContext.close`. Over Sentinel the client is redis-py's
  Sentinel-managed pool (:func:`chat_gateway.redisio.clients.sentinel_client`), so
  every reconnect of every user lands on the primary the sentinels name: the
  context follows a failover as the broker's link does. Over a cluster the guard
  is per shard (:class:`~chat_gateway.redisio.guard.ShardGuard`) and there is no
  pipelined connection (keys live on different nodes).
- :meth:`RedisContext.of` wraps a client already made (tests, tools); whoever made
  it closes it.

Without Redis (``memory://``) there is no context: its users are given None and
the gateway picks their per-instance variants.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chat_gateway.redisio.clients import cluster_client, keep_pool_trimmed, server_client
from chat_gateway.redisio.guard import NO_GUARD, RedisGuard, ShardGuard
from chat_gateway.redisio.pipelined import PipelinedConnection
from chat_gateway.redisio.urls import CLUSTER_SCHEMES, parse_cluster_url


class RedisNotStarted(RuntimeError):
    """The context's client is used before ``start`` made it."""


class RedisContext:
    def __init__(
        self,
        client: Any | None = None,
        *,
        guard: RedisGuard = NO_GUARD,
        batch: PipelinedConnection | None = None,
    ) -> None:
        self._client = client
        self.guard = guard
        self.batch = batch
        self.url: str | None = None  # set by for_url: start builds the client from it
        self.cluster = False
        self.connect_timeout = 2.0
        self.command_timeout = 1.0
        self._sentinel: Any = None  # over Sentinel, the sentinels' manager
        self._trimming: asyncio.Task[None] | None = None

    @classmethod
    def of(
        cls,
        client: Any,
        *,
        guard: RedisGuard = NO_GUARD,
        batch: PipelinedConnection | None = None,
    ) -> RedisContext:
        """A context around a client already made (never started or closed here)."""
        return cls(client, guard=guard, batch=batch)

    @classmethod
    def for_url(
        cls, url: str, *, connect_timeout: float = 2.0, command_timeout: float = 1.0
    ) -> RedisContext:
        """The context of ``url``; nothing connects before :meth:`start`."""
        context = cls()
        context.url = url
        context.connect_timeout = connect_timeout
        context.command_timeout = command_timeout
        context.cluster = url.startswith(CLUSTER_SCHEMES)
        # Each user reports failures here; over a cluster per shard of the client.
        context.guard = ShardGuard(lambda: context._client) if context.cluster else RedisGuard()
        return context

    @property
    def started(self) -> bool:
        return self._client is not None

    @property
    def client(self) -> Any:
        """The client for keys (a ``Redis``, or a ``RedisCluster`` over a cluster)."""
        if self._client is None:
            raise RedisNotStarted("the Redis client is used before it was started")
        return self._client

    async def start(self) -> None:
        if self.url is None or self._client is not None:
            return
        if self.cluster:
            startup_nodes, options = parse_cluster_url(self.url)
            self._client = cluster_client(
                startup_nodes,
                options,
                connect_timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
            )
            return
        client, self._sentinel = server_client(
            self.url, connect_timeout=self.connect_timeout, command_timeout=self.command_timeout
        )
        self._client = client
        self.batch = PipelinedConnection(client)
        self._trimming = asyncio.create_task(keep_pool_trimmed(client), name="redis-pool")

    async def close(self) -> None:
        """Release what :meth:`start` made (nothing for a context made by :meth:`of`)."""
        if self.url is None:
            return
        if self._trimming is not None:
            self._trimming.cancel()
            await asyncio.gather(self._trimming, return_exceptions=True)
            self._trimming = None
        if self.batch is not None:
            batch, self.batch = self.batch, None
            await batch.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            await sentinel.aclose()

"""Redis clients built from a ``REDIS_URL`` (no I/O until first used).

- ``redis://``, ``rediss://``, ``unix://``: one server, one pooled client. Its
  pool is bounded (``POOL_MAX`` connections) and a caller waits for a free
  connection, at most the command timeout (redis-py's ``BlockingConnectionPool``;
  the default pool allows 100 and refuses the 101st at once), so a burst of
  callers queues instead of opening a connection each or failing.
- ``redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/DB]``
  (``rediss+sentinel://`` for TLS to the sentinels and the servers): the hosts
  are sentinels; ``SERVICE`` is the name they monitor the primary under; the
  password is the Redis servers' (the sentinels are asked without one). The
  client is redis-py's ``Sentinel.master_for`` pool, which asks the sentinels
  for the primary's address whenever it opens a connection, so every
  reconnect (a subscriber link's, a pooled command connection's, the
  pipelined connection's) lands on whichever server the sentinels promoted. A
  connection to a server that was demoted is dropped on its first ``READONLY``
  reply.
- ``redis+cluster://``: a ``RedisCluster`` client, and a plain client per node
  for the subscriber links (:func:`node_client`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat_gateway.redisio.urls import SENTINEL_SCHEMES, parse_sentinel_url

log = logging.getLogger("redisio.clients")

# Connections one server's pool may hold (the subscriber link's included). Most
# commands go over the pipelined connection; the pool serves the rest.
POOL_MAX = 32
# Seconds between closings of the pool's idle connections (see keep_pool_trimmed).
IDLE_TRIM_EVERY = 10.0


async def keep_pool_trimmed(redis: aioredis.Redis, every: float = IDLE_TRIM_EVERY) -> None:
    """Every ``every`` seconds close the connections idle in ``redis``' pool (a
    burst's extra connections go; the few in steady use reconnect on their next
    command). redis-py's pool never closes one by itself. Runs until cancelled."""
    while True:
        await asyncio.sleep(every)
        try:
            await redis.connection_pool.disconnect(inuse_connections=False)
        except (RedisError, OSError) as exc:
            log.debug("closing idle Redis connections: %r", exc)


def server_client(
    url: str, *, connect_timeout: float, command_timeout: float
) -> tuple[aioredis.Redis, Sentinel | None]:
    """The client of one Redis server, or of the primary the sentinels name; over
    Sentinel also the sentinels' manager, to close with the client."""
    connection: dict[str, Any] = dict(
        socket_connect_timeout=connect_timeout,
        socket_timeout=command_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    if url.startswith(SENTINEL_SCHEMES):
        return sentinel_client(url, **connection)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_MAX, timeout=command_timeout, **connection
    )
    return aioredis.Redis.from_pool(pool), None


def sentinel_client(url: str, **connection: Any) -> tuple[aioredis.Redis, Sentinel]:
    """A client of the current primary and the Sentinel manager behind it.
    ``connection`` (timeouts, retry) applies to the primary's connections; the
    sentinels get the same socket timeouts and TLS."""
    sentinels, service, options = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in connection.items() if k.startswith("socket_")}
    sentinel_kwargs["ssl"] = options["ssl"]
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return manager.master_for(service, **connection, **options), manager


def cluster_client(
    startup_nodes: list[tuple[str, int]],
    options: dict[str, Any],
    *,
    connect_timeout: float,
    command_timeout: float,
) -> RedisCluster:
    """A cluster client from :func:`chat_gateway.redisio.urls.parse_cluster_url`'s pieces."""
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in startup_nodes],
        socket_connect_timeout=connect_timeout,
        socket_timeout=command_timeout,
        # One quick retry (a stale pooled connection), no more: a call to a shard
        # that is down fails in well under a second instead of stalling the
        # post (the store is the truth and fills the live copy); a failover
        # takes longer than any retry would wait.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        **options,
    )


def node_client(
    host: str,
    port: int,
    options: dict[str, Any],
    *,
    connect_timeout: float,
    command_timeout: float,
) -> aioredis.Redis:
    """A client of one cluster node (a subscriber link's), with the URL's credentials
    and TLS. It never retries: a dropped link must surface, not reconnect quietly,
    since what was published meanwhile is lost."""
    return aioredis.Redis(
        host=host,
        port=port,
        socket_connect_timeout=connect_timeout,
        socket_timeout=command_timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )

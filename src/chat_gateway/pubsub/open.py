"""The broker for a ``REDIS_URL``."""

from __future__ import annotations

from typing import Any

from chat_gateway.pubsub.base import Broker
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.urls import CLUSTER_SCHEMES, PLAIN_SCHEMES, SENTINEL_SCHEMES


def create_broker(url: str, context: RedisContext | None = None, **options: Any) -> Broker:
    """Pick the implementation by URL; the driver is imported only in its branch.
    ``context`` is the Redis of ``url`` shared with the users of keys (none for
    ``memory://``); without one a Redis broker makes its own."""
    if url.startswith("memory://"):
        from chat_gateway.pubsub.memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(PLAIN_SCHEMES + SENTINEL_SCHEMES):
        from chat_gateway.pubsub.redis import RedisBroker

        return RedisBroker(url, context=context, **options)
    if url.startswith(CLUSTER_SCHEMES):
        from chat_gateway.pubsub.cluster import ClusterBroker

        return ClusterBroker(url, context=context, **options)
    raise ValueError(
        f"unsupported REDIS_URL {url!r}: use redis://…, rediss://…, "
        "redis+cluster://…, redis+sentinel://… or memory://"
    )

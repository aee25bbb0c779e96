"""Each instance's figures shared with the others, for the cluster-wide stats stream
and the server API's subscriber counts.

With Redis every instance writes its reading (chat_gateway.ops.figures) to one hash,
``{prefix}stats``, under its instance id, every second; readers take the entries
written within ``ENTRY_MAX_AGE`` seconds. An instance removes its entry on close;
one that dies leaves it to age. Without Redis (``memory://``) the cluster is this
instance: there are no others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from chat_gateway.ops.figures import Reading, Shared
from chat_gateway.periodic import every
from chat_gateway.redisio.context import RedisContext

# An entry older than this is an instance gone (or cut off from Redis).
ENTRY_MAX_AGE = 3.0


def stats_key(prefix: str) -> str:
    return f"{prefix}stats"


class SharedFigures:
    """Figures without Redis: this instance is the cluster, no other shares any."""

    def start(self) -> None:
        pass

    async def others(self) -> list[Shared]:
        """The fresh entries of the other instances (none if no one can say)."""
        return []

    async def close(self) -> None:
        pass


class RedisSharedFigures(SharedFigures):
    """This instance's reading in the shared hash every ``interval`` seconds, and the
    other instances' fresh entries from it. A Redis failure is reported to ``guard``
    (shared with the other Redis users) and costs only the figures: writing is skipped
    while the guard holds Redis back, and reading then finds no others."""

    def __init__(
        self,
        redis: RedisContext,
        prefix: str,
        *,
        instance_id: str,
        own: Callable[[], Reading],
        describe: Callable[[], dict[str, Any]],
        interval: float = 1.0,
    ) -> None:
        self.redis = redis.client
        self.key = stats_key(prefix)
        self.instance_id = instance_id
        self.own = own
        self.describe = describe
        self.guard = redis.guard
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = every(self.interval, self.write, "shared figures", now=True)

    async def write(self) -> None:
        if not self.guard.usable(self.key):
            return  # Redis failed moments ago: the other users report it
        reading = self.own()
        # JSON has no infinity: the last bucket's bound goes as text ("inf").
        reading["lat_buckets"] = [[str(b), v] for b, v in reading["lat_buckets"]]
        entry = {"who": self.describe(), "t": time.time(), "c": reading}
        try:
            await self.redis.hset(self.key, self.instance_id, orjson.dumps(entry))
            await self.redis.pexpire(self.key, int(ENTRY_MAX_AGE * 10_000))
        except Exception as exc:
            self.guard.failed(self.key, exc)

    async def others(self) -> list[Shared]:
        if not self.guard.usable(self.key):
            return []
        try:
            raw = await self.redis.hgetall(self.key)
        except Exception as exc:
            self.guard.failed(self.key, exc)
            return []
        now = time.time()
        out = []
        for field_, value in raw.items():
            name = field_.decode() if isinstance(field_, bytes) else field_
            if name == self.instance_id:
                continue
            try:
                entry = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if now - float(entry.get("t", 0)) <= ENTRY_MAX_AGE:
                out.append(entry)
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.redis.hdel(self.key, self.instance_id)
        except Exception:
            pass

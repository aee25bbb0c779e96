"""History: the latest page read from the warm cache vs from Postgres.

Two views of the same room (300 messages, pages of 50): end to end over HTTP
(``?before=`` past the latest seq takes the store path, the plain latest-page
read takes the cache), and the storage layer alone in this process
(``HistoryCache.history`` warm vs ``PostgresStore.history``), where the cost
of the read itself is not hidden behind HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.http import HTTPConn
from bench.procs import REDIS_URL
from bench.stats import summary_ms
from bench.targets import Gateway
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.pipelined import PipelinedConnection
from chat_gateway.storage.cache import RedisHistoryCache
from chat_gateway.storage.postgres import PostgresStore

ROOM = "history"
MESSAGES = 300
LIMIT = 50


async def timed(label: str, reads: int, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    await call()  # warm
    durations = []
    for _ in range(reads):
        t0 = time.perf_counter()
        await call()
        durations.append(time.perf_counter() - t0)
    return {"path": label, "reads": reads, **summary_ms(durations)}


async def run(*, reads: int = 2000) -> list[dict[str, Any]]:
    target = Gateway()
    (server,) = await target.start(1)
    try:
        conn = HTTPConn("127.0.0.1", server.port)
        for i in range(MESSAGES):
            status, body = await conn.request(
                "POST", f"/v1/rooms/{ROOM}/messages", {"text": f"message {i}", "author": "bench"}
            )
            assert status == 201, body
        latest = orjson.loads(body)["seq"]

        async def http_get(path: str) -> None:
            status, body = await conn.request("GET", path)
            assert status == 200, body

        rows = [
            await timed(
                "http: warm cache",
                reads,
                lambda: http_get(f"/v1/rooms/{ROOM}/messages?limit={LIMIT}"),
            ),
            await timed(
                "http: postgres",
                reads,
                lambda: http_get(f"/v1/rooms/{ROOM}/messages?limit={LIMIT}&before={latest + 1}"),
            ),
        ]
        await conn.close()
        assert target.database_url is not None
        store = PostgresStore(target.database_url)
        redis = aioredis.from_url(REDIS_URL)
        await store.start()
        try:
            # Built as the gateway builds it: the seq check goes through the batch.
            batch = PipelinedConnection(redis)
            cache = RedisHistoryCache(
                store, RedisContext.of(redis, batch=batch), prefix=target.prefix
            )
            rows.append(
                await timed("layer: warm cache", reads, lambda: cache.history(ROOM, limit=LIMIT))
            )
            rows.append(
                await timed("layer: postgres", reads, lambda: store.history(ROOM, limit=LIMIT))
            )
        finally:
            await batch.close()
            await store.close()
            await redis.aclose()
        for a, b in ((0, 1), (2, 3)):
            if rows[a]["p50_ms"]:
                rows[a]["speedup_p50"] = round(rows[b]["p50_ms"] / rows[a]["p50_ms"], 1)
        return rows
    finally:
        await target.stop()

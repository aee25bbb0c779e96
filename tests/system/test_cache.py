"""The history cache on real Redis and Postgres: warm reads, no stale page, one load."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.guard import RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection
from chat_gateway.storage import RedisHistoryCache
from chat_gateway.storage.cache import MGET_KEYS
from chat_gateway.storage.postgres import PostgresStore
from tests.harness import REDIS_URL, RedisServer


class CountingStore(PostgresStore):
    """The real Postgres store, counting history reads."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads = 0

    async def history(self, room: str, **kwargs: Any):  # type: ignore[override]
        self.reads += 1
        await asyncio.sleep(0.05)  # a slow query, so readers pile up on the cold key
        return await super().history(room, **kwargs)


async def _setup(pg_url: str, prefix: str, redis_url: str = REDIS_URL):
    store = CountingStore(pg_url)
    await store.start()
    await store.migrate()
    client = aioredis.from_url(redis_url)
    return store, client, RedisHistoryCache(store, RedisContext.of(client), prefix=prefix)


async def test_read_after_commit_is_never_stale_and_warm_reads_skip_the_store(pg_url, redis_prefix):
    store, client, cache = await _setup(pg_url, redis_prefix)
    try:
        for i in range(1, 31):
            msg, _ = await store.append("room", "ana", f"t{i}")
            await cache.committed(msg)
            page = await cache.history("room", limit=10)
            assert page.messages[-1].seq == i
            assert [m.seq for m in page.messages] == list(range(max(1, i - 9), i + 1))
            assert page.has_more == (i > 10)
        reads = store.reads
        for _ in range(5):
            page = await cache.history("room", limit=50)
            assert [m.seq for m in page.messages] == list(range(1, 31))
        assert store.reads == reads, "warm reads must come from Redis"
    finally:
        await client.aclose()
        await store.close()


async def test_many_readers_at_a_cold_key_cause_one_query(pg_url, redis_prefix):
    store, client, cache = await _setup(pg_url, redis_prefix)
    try:
        for i in range(5):
            msg, _ = await store.append("cold", "ana", f"t{i}")
            await cache.committed(msg)
        pages = await asyncio.gather(*(cache.history("cold", limit=3) for _ in range(50)))
        assert store.reads == 1
        assert all([m.seq for m in p.messages] == [3, 4, 5] for p in pages)
    finally:
        await client.aclose()
        await store.close()


async def test_a_late_loader_cannot_shadow_a_newer_write(pg_url, redis_prefix):
    store, client, cache = await _setup(pg_url, redis_prefix)
    other = RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix)
    try:
        m1, _ = await store.append("race", "ana", "one")
        await cache.committed(m1)
        old_window = await store.history("race", limit=200)  # a reader loads seq 1 ...
        m2, _ = await store.append("race", "ana", "two")  # ... a write commits ...
        await cache.committed(m2)
        # ... and the slow reader writes its old page late
        import orjson

        data = orjson.dumps({"m": [m.to_dict() for m in old_window.messages], "h": False})
        await other._raise(keys=other._keys("race"), args=[1, 60, data])
        page = await cache.history("race")
        assert [m.seq for m in page.messages] == [1, 2]
    finally:
        await client.aclose()
        await store.close()


async def test_redis_down_reads_fall_back_to_the_store_and_recover(pg_url):
    rs = RedisServer()
    rs.start()
    store, client, cache = await _setup(pg_url, "p:", rs.url)
    try:
        m1, _ = await store.append("down", "ana", "one")
        await cache.committed(m1)
        assert [m.seq for m in (await cache.history("down")).messages] == [1]
        rs.stop()
        m2, _ = await store.append("down", "ana", "two")
        await cache.committed(m2)  # acknowledged although Redis is down
        assert [m.seq for m in (await cache.history("down")).messages] == [1, 2]
        rs.start()  # an empty Redis comes back
        await asyncio.sleep(0.5)
        assert [m.seq for m in (await cache.history("down")).messages] == [1, 2]
    finally:
        await cache.close()
        await client.aclose()
        await store.close()
        rs.stop()


async def test_many_rooms_positions_over_the_batch_in_few_mgets_and_from_the_store_when_redis_fails(
    pg_url,
):
    # Over one Redis, the periodic read of every held room's seq goes as MGETs of
    # MGET_KEYS keys: thousands of rooms, each answered from its own key; with Redis
    # gone, every room is answered by the store.
    rs = RedisServer()
    rs.start()
    store = PostgresStore(pg_url)
    await store.start()
    await store.migrate()
    client = aioredis.from_url(rs.url)
    batch = PipelinedConnection(client, timeout=1.0)
    guard = RedisGuard()
    cache = RedisHistoryCache(store, RedisContext.of(client, guard=guard, batch=batch), prefix="p:")
    try:
        rooms = [f"many.{i}" for i in range(MGET_KEYS * 2 + 500)]
        await client.mset({cache._keys(room)[0]: i for i, room in enumerate(rooms) if i % 3 == 0})
        assert await cache.latest_seqs(rooms) == {
            room: i for i, room in enumerate(rooms) if i % 3 == 0
        }
        await store.append(rooms[1], "ana", "one")
        rs.stop()
        latest = await cache.latest_seqs(rooms)
        assert latest == {room: (1 if room == rooms[1] else 0) for room in rooms}
        assert not guard.usable()  # the failure was reported once for all
    finally:
        await batch.close()
        await client.aclose()
        await store.close()
        rs.stop()


async def test_a_queued_raise_is_one_command_and_survives_a_script_flush(pg_url):
    """After a commit the seq raise rides the caller's pipeline as a bare EVALSHA (no
    SCRIPT EXISTS round trip); if Redis lost the script, the raise is redone before
    the ack, so a read after it is still fresh."""
    server = RedisServer()
    server.start()
    store, client, cache = await _setup(pg_url, "t:", server.url)
    try:
        for i in range(1, 4):
            if i == 3:
                await client.script_flush()
            msg, _ = await store.append("room", "ana", f"t{i}")
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*cache.raise_command(msg))
                (result,) = await pipe.execute(raise_on_error=False)
            await cache.queued_result(msg, result)
            assert int(await client.get("t:{room}:seq")) == i
            page = await cache.history("room", limit=10)
            assert [m.seq for m in page.messages] == list(range(1, i + 1))
        stats = await client.info("commandstats")
        assert "cmdstat_script|exists" not in stats
        assert stats["cmdstat_evalsha"]["failed_calls"] >= 1, "the flush was noticed"
        assert not cache._dirty, "nothing left for the background retry"
    finally:
        await client.aclose()
        await store.close()
        server.stop()


async def test_readers_on_several_instances_at_a_cold_key_cause_one_query(pg_url, redis_prefix):
    store, client, first = await _setup(pg_url, redis_prefix)
    caches = [first] + [
        RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix) for _ in range(2)
    ]
    try:
        for i in range(5):
            msg, _ = await store.append("shared", "ana", f"t{i}")
            await first.committed(msg)
        pages = await asyncio.gather(
            *(c.history("shared", limit=3) for c in caches for _ in range(20))
        )
        assert store.reads == 1, "one instance loads; the others wait for its page"
        assert all([m.seq for m in p.messages] == [3, 4, 5] for p in pages)
        # an empty room leaves no page to wait for: nobody hangs, everyone answers
        empty = await asyncio.gather(*(c.history("nobody") for c in caches for _ in range(5)))
        assert all(p.messages == [] and not p.has_more for p in empty)
    finally:
        await client.aclose()
        await store.close()

"""Failover of both engines, on servers of the test's own.

Redis: a primary, a replica and three sentinels; the primary is killed and the
sentinels promote the replica. Postgres: a primary with a synchronous
streaming replica; the primary is stopped hard and the replica promoted. In
both, two gateways carry posts and WS/SSE subscribers throughout, and every
acknowledged message reaches every subscriber in order, once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError

from bench.acknowledged import Writer, delivered_in_order_once, subscribers
from chat_gateway.redisio.pipelined import PipelinedConnection
from chat_gateway.storage.base import StoreUnavailable
from chat_gateway.storage.postgres import PostgresStore
from tests.harness import (
    REDIS_URL,
    Instance,
    PostgresPair,
    RedisSentinelServers,
    RedisServer,
    WSClient,
    eventually,
    instances,
    metric,
    post,
    t,
)

# -- Redis Sentinel --------------------------------------------------------------------


async def test_a_demoted_server_retires_the_command_batch_link():
    """A server that turns replica under an open link answers READONLY: the caller
    gets that reply, and the next command opens a new link (over Sentinel, to the
    new primary) instead of writing to the replica again."""
    a, b = RedisServer(), RedisServer()
    a.start()
    b.start()
    client = aioredis.from_url(a.url)
    batch = PipelinedConnection(client)
    try:
        assert await batch.run([("SET", "k", "1")]) == [b"OK"]
        first = batch.link
        assert first is not None
        await client.execute_command("REPLICAOF", "127.0.0.1", str(b.port))
        (reply,) = await batch.run([("SET", "k", "2")])
        assert isinstance(reply, ReadOnlyError)
        assert batch.link is None and first.retired
        await eventually(lambda: first.lost is not None, timeout=5)  # and it is closed
        assert (await batch.run([("GET", "k")]))[0] is not None and batch.link is not first
    finally:
        await batch.close()
        await client.aclose()
        a.stop()
        b.stop()


async def ready(http: httpx.AsyncClient, g: Instance) -> int:
    try:
        return (await http.get(f"{g.url}/readyz", timeout=t(3))).status_code
    except httpx.HTTPError:
        return 0


async def test_gateways_follow_a_sentinel_failover(pg_url):
    """The primary is killed; the sentinels promote the replica; both gateways move
    their Pub/Sub link, command batch and pool to it. Every acknowledged post
    reaches every WS and SSE subscriber in order, once; /readyz goes 503 and back;
    rate limits, the history cache and presence work on the new primary."""
    servers = RedisSentinelServers().start()
    rooms = ["north", "south"]
    prefix = "cgfo:"
    env = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": servers.url,
        "KEY_PREFIX": prefix,
        # one shared bucket for all posts (the identity is the address): it must
        # not run out, and must refill slowly enough to tell shared from local
        "RATE_LIMIT": "5000/1000000s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "PUBLISH_RATE_LIMIT": "100000/1s",
        "LOG_LEVEL": "warning",
        "BROKER_PROBE_INTERVAL": "0.5",
        "POSITION_INTERVAL": "1",
    }
    try:
        old = servers.servers[0].port
        async with (
            instances(2, env) as gws,
            httpx.AsyncClient(timeout=30) as http,
            subscribers(gws, rooms) as (wss, sses),
        ):
            writer = Writer(gws, http, rooms).start()
            await writer.until(20)

            servers.servers[0].stop()  # SIGKILL, for good
            killed = time.monotonic()
            await eventually(lambda: all_status(http, gws, 503), timeout=20)
            await eventually(lambda: all_status(http, gws, 200), timeout=40)
            back = time.monotonic() - killed
            new = servers.primary_port()
            assert new is not None and new != old
            at = writer.count()
            await writer.until(at + 20)
            await writer.finish()
            first_post = min((a for a in writer.acked_at if a > killed), default=None)
            assert first_post is not None
            gaps = [b - a for a, b in zip(writer.acked_at, writer.acked_at[1:], strict=False)]
            print(
                f"\nredis sentinel failover: /readyz back {back:.2f} s after the kill; "
                f"first post acknowledged {first_post - killed:.2f} s after it; longest "
                f"wait between two acknowledged posts {max(gaps):.2f} s; "
                f"{writer.count()} posts, {len(writer.failed)} not acknowledged"
            )
            assert not writer.failed  # the store is the truth: Redis down fails no post

            await delivered_in_order_once(writer, wss, sses)

            client = servers.servers[1]
            assert client.port == new
            # the history cache is on the new primary and agrees with the store
            for room, seqs in writer.acked.items():
                for g in gws:
                    page = (
                        await http.get(f"{g.url}/v1/rooms/{room}/messages", params={"limit": 200})
                    ).json()
                    assert [m["seq"] for m in page["messages"]] == list(range(1, len(seqs) + 1))
                assert int(servers.ask(new, "get", f"{prefix}{{{room}}}:seq").strip()) == len(seqs)
            # rate limits: one shared bucket on the new primary, no local fallback
            remaining = []
            for g in gws:
                r = await post(http, g.url, rooms[0], "counted")
                assert r.status_code == 201
                remaining.append(int(r.headers["RateLimit-Remaining"]))
            assert remaining[1] < remaining[0]  # a local bucket would be fuller
            for g in gws:
                assert await metric(g.url, "chat_rate_limit_local_fallback") == 0
            assert servers.ask(new, "exists", f"{prefix}rl:post:{{127.0.0.1}}").strip() == "1"
            # presence: a join on one gateway is seen on the other, kept on the new primary
            async with WSClient.connect(f"{gws[0].ws_url}?user=eve") as eve:
                await eve.subscribe(rooms[1])
                await eventually(lambda: has_user(http, gws[1], rooms[1], "eve"), timeout=10)
                members = servers.ask(
                    new, "zrange", f"{prefix}{{{rooms[1]}}}:presence", "0", "-1"
                ).split()
                assert any(m.endswith(":eve") for m in members), members
            for g in gws:
                assert not errors_logged(g), errors_logged(g)
    finally:
        servers.stop()


def errors_logged(g: Instance) -> list[str]:
    """The gateway's log lines at error level or above: an outage is worth a warning."""
    return [
        line[:2000]
        for line in Path(g.log_path).read_text().splitlines()
        if '"level":"error"' in line.replace(" ", "")
        or '"level":"critical"' in line.replace(" ", "")
    ]


async def all_status(http: httpx.AsyncClient, gws: list[Instance], status: int) -> bool:
    return all([await ready(http, g) == status for g in gws])


async def has_user(http: httpx.AsyncClient, g: Instance, room: str, user: str) -> bool:
    r = await http.get(f"{g.url}/v1/rooms/{room}/presence")
    return user in r.json()["users"]


# -- Postgres: a synchronous standby promoted ---------------------------------------------


async def test_gateways_follow_a_postgres_promotion(redis_prefix):
    """The primary is stopped hard and its synchronous standby promoted, as an
    orchestrator would. Posts with keys go on over two gateways on the multi-host
    URL: none is answered 500, a retry with the same key after the switch returns
    what the old primary committed, every acknowledged message is on the new
    primary with seqs contiguous, and every subscriber resumes with no gap. The old
    primary comes back as a standby of the new one and is never written to."""
    pair = await asyncio.to_thread(PostgresPair().start)
    rooms = ["east", "west"]
    env = {
        "DATABASE_URL": pair.url(),
        "REDIS_URL": REDIS_URL,
        "KEY_PREFIX": redis_prefix,
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "PUBLISH_RATE_LIMIT": "100000/1s",
        "LOG_LEVEL": "warning",
        "POSITION_INTERVAL": "1",
    }
    try:
        async with (
            instances(2, env) as gws,
            httpx.AsyncClient(timeout=30) as http,
            subscribers(gws, rooms) as (wss, sses),
        ):
            writer = Writer(gws, http, rooms, keyed=True).start()
            await writer.until(20)

            # committed on the old primary (its answer may as well have been lost)
            kept = await post(http, gws[0].url, "kept", "before", headers={"Idempotency-Key": "K"})
            assert kept.status_code == 201

            await asyncio.to_thread(pair.ctl, 0, "stop", "-m", "immediate")
            killed = time.monotonic()
            await eventually(lambda: all_status(http, gws, 503), timeout=20)
            await asyncio.sleep(1)  # an orchestrator takes a moment to decide
            promoting = time.monotonic()
            await asyncio.to_thread(pair.ctl, 1, "promote")
            at = writer.count()
            await writer.until(at + 20)
            first_post = min(
                a
                for a, status in zip(writer.acked_at, writer.statuses, strict=True)
                if a > killed and status == 201
            )
            await eventually(lambda: all_status(http, gws, 200), timeout=20)
            # the retry of that post on the new primary finds it: the same message
            again = await post(http, gws[1].url, "kept", "before", headers={"Idempotency-Key": "K"})
            assert again.status_code == 200 and again.json() == kept.json()

            # Split brain: the old primary comes back as a primary, alone (nothing
            # fenced it, and it no longer has a synchronous standby to wait for).
            # The gateways' connections to the new primary drop, and asyncpg's first
            # read-write host is now the old one: it is refused, never written to.
            await asyncio.to_thread(pair.set_synchronous, 0, False)
            await asyncio.to_thread(pair.ctl, 0, "start")
            stale = await asyncio.to_thread(pair.sql, 0, "SELECT count(*) FROM messages")
            failed = len(writer.failed)
            await asyncio.to_thread(
                pair.sql,
                1,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = 'chat' AND pid <> pg_backend_pid()",
            )

            async def split_seen() -> bool:  # posts refused, or (the hole) written there
                return (
                    len(writer.failed) > failed + 5
                    or await asyncio.to_thread(pair.sql, 0, "SELECT count(*) FROM messages")
                    != stale
                )

            await eventually(split_seen, timeout=20)
            assert await asyncio.to_thread(pair.sql, 0, "SELECT count(*) FROM messages") == stale
            # the orchestrator fences it and makes it a standby of the new primary
            await asyncio.to_thread(pair.make_standby, 0, 1)
            at = writer.count()
            await writer.until(at + 20)
            await writer.finish()
            print(
                f"\npostgres promotion: first post acknowledged "
                f"{first_post - promoting:.2f} s after the promotion began "
                f"({first_post - killed:.2f} s after the primary stopped); "
                f"{writer.count()} posts, {len(writer.failed)} answers 503 then retried "
                f"with their key, {writer.count(200)} retries answered with the stored message"
            )
            assert writer.failed  # the switch was seen (and answered 503, never 500)

            # every acknowledged message is on the new primary, once, seqs contiguous
            assert await asyncio.to_thread(pair.in_recovery, 0)
            assert not await asyncio.to_thread(pair.in_recovery, 1)
            stored = (
                await asyncio.to_thread(
                    pair.sql, 1, "SELECT room, seq FROM messages ORDER BY room, seq"
                )
            ).split()
            for room, seqs in writer.acked.items():
                assert (
                    [int(r.split("|")[1]) for r in stored if r.startswith(room + "|")]
                    == sorted(seqs)
                    == list(range(1, len(seqs) + 1))
                ), room
            keys = await asyncio.to_thread(
                pair.sql, 1, "SELECT count(DISTINCT idempotency_key), count(*) FROM messages"
            )
            assert keys == f"{writer.count() + 1}|{writer.count() + 1}"  # and "kept"
            await delivered_in_order_once(writer, wss, sses)
            for g in gws:
                assert not errors_logged(g), errors_logged(g)

        # A pool that reaches a standby (any host will do here): a write is a 503,
        # and the pool's connections are replaced rather than kept on it.
        store = PostgresStore(pair.url(0, attrs="any"))
        await store.start()
        try:
            for key in ("k-standby", None):
                before = await backend_pid(store)
                with pytest.raises(StoreUnavailable, match="ReadOnlySQLTransaction"):
                    await store.append(rooms[0], "ana", "to a standby", idempotency_key=key)
                assert await backend_pid(store) != before
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(pair.remove)


async def backend_pid(store: PostgresStore) -> int:
    async with store.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))

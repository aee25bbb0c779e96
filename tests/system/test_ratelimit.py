"""Rate limits on real Redis and real gateway processes (the arithmetic alone is in
tests/unit/test_ratelimit.py): the Lua script on Redis' clock, NOSCRIPT reload, the
per-instance fallback while Redis is down or hung; then exact admission across
instances, one bucket for HTTP posts and WS publishes, separate buckets for
/v1/publish and connection attempts, the RateLimit headers, and which address
counts as the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
import websockets

from chat_gateway.access.auth import key_bucket
from chat_gateway.access.ratelimit import RateLimiter, take
from chat_gateway.config import Rate
from chat_gateway.metrics import Metrics
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.guard import RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection
from tests import harness
from tests.harness import (
    Instance,
    RedisServer,
    SSEClient,
    WSClient,
    embedded_env,
    eventually,
    instances,
    post,
)

SECOND = 1_000_000


# -- the Lua script on a real Redis -------------------------------------------------


async def test_lua_script_does_the_same_arithmetic_on_redis_server_time(redis_prefix):
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        rate = Rate(20, 60.0)
        pus = 60 * SECOND
        # The bucket is rewritten behind the limiter's back between decisions: no
        # lease, and no memory of having seen it empty.
        limiter = RateLimiter(
            RedisContext.of(client), prefix=redis_prefix, rates={"post": rate}, lease=0, recheck=0
        )
        key = limiter.key("post", "ana")
        cases = [
            (0, 10 * SECOND),  # empty, 10 s ago: 3.33 tokens refilled
            (5 * pus, 1),  # partly full, just now
            (0, 1000),  # empty, 1 ms ago: refused
            (19 * pus, 3600 * SECOND),
        ]  # long idle: clamped to the capacity
        for value, ago in cases:
            sec, usec = await client.time()
            before_ts = sec * SECOND + usec - ago
            await client.hset(key, mapping={"v": value, "t": before_ts})
            decision = await limiter.hit("post", "ana")
            stored = await client.hgetall(key)
            after_v, after_ts = int(stored[b"v"]), int(stored[b"t"])
            assert after_ts >= before_ts + ago
            expected = take(value, before_ts, after_ts, rate.capacity, pus, 1)
            assert (decision.allowed, after_v, after_ts) == expected[:3], (value, ago)
            assert decision.remaining == after_v // pus
        ttl = await client.pttl(key)
        assert 60_000 < ttl <= 61_000, "an idle bucket expires once it would be full again"
        assert not limiter.fallback
    finally:
        await client.aclose()


async def test_noscript_reloads_and_keeps_the_bucket():
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    try:
        metrics = Metrics()
        limiter = RateLimiter(
            RedisContext.of(client), prefix="t:", metrics=metrics, rates={"post": Rate(5, 3600.0)}
        )
        assert [(await limiter.hit("post", "ana")).remaining for _ in range(2)] == [4, 3]
        await client.script_flush()
        assert (await limiter.hit("post", "ana")).remaining == 2, "state survives a flush"
        await client.execute_command("SCRIPT", "FLUSH")
        assert (await limiter.hit("post", "ana")).remaining == 1
        assert not limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 0
        stats = await client.info("commandstats")
        # every decision went as EVALSHA (one round trip); the script body only
        # travelled in an EVAL after each NOSCRIPT (the first call's included)
        assert stats["cmdstat_evalsha"]["calls"] == 4
        assert stats["cmdstat_evalsha"]["failed_calls"] == 3
        assert stats["cmdstat_eval"]["calls"] == 3
        assert "cmdstat_script|load" not in stats
    finally:
        await client.aclose()
        server.stop()


async def test_concurrent_decisions_share_pipelines_and_stay_exact():
    """Hits asked for at once go out together (one connection, not one each); each is
    still its own atomic decision, in order, and exact right after Redis lost the script."""
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    try:
        limiter = RateLimiter(
            RedisContext.of(client, batch=PipelinedConnection(client)),
            prefix="t:",
            rates={"post": Rate(20, 3600.0)},
        )
        assert (await limiter.hit("post", "ana")).remaining == 19  # loads the script
        before = (await client.info("stats"))["total_connections_received"]
        first = await asyncio.gather(*(limiter.hit("post", "ana") for _ in range(10)))
        assert [d.remaining for d in first] == list(range(18, 8, -1))
        grown = (await client.info("stats"))["total_connections_received"] - before
        assert grown <= 1, "ten calls, one pipelined connection"
        await client.script_flush()
        rest = await asyncio.gather(*(limiter.hit("post", "ana") for _ in range(15)))
        assert sum(d.allowed for d in rest) == 9
        assert sorted(d.remaining for d in rest if d.allowed) == list(range(9))
        assert not limiter.fallback
    finally:
        await client.aclose()
        server.stop()


# -- leases: tokens taken ahead, reserved in Redis, given back ----------------------


def limiters(url: str, n: int, **kwargs: object) -> tuple[list[aioredis.Redis], list[RateLimiter]]:
    clients = [aioredis.from_url(url) for _ in range(n)]
    made = [
        RateLimiter(RedisContext.of(c), prefix="t:", **kwargs)  # type: ignore[arg-type]
        for c in clients
    ]
    return clients, made


@contextlib.asynccontextmanager
async def limiters_on_own_redis(
    n: int, **kwargs: object
) -> AsyncIterator[tuple[list[aioredis.Redis], list[RateLimiter]]]:
    """``n`` limiters over a redis-server of the test's own, closed with it."""
    server = RedisServer()
    server.start()
    clients, made = limiters(server.url, n, **kwargs)
    try:
        yield clients, made
    finally:
        for limiter in made:
            await limiter.close()
        for c in clients:
            await c.aclose()
        server.stop()


async def lease_of(client: aioredis.Redis, identity: str) -> int:
    return int((await client.hget(f"t:rl:post:{{{identity}}}", "l")) or 0)


async def test_leases_over_three_limiters_admit_no_more_than_capacity_plus_refill():
    """Three instances' limiters hammer one bucket of 320 refilled at 80/s: each
    leases ahead, yet together they never admit more than 320 + 80/s x elapsed,
    even when they ask more than it holds."""
    admitted = 0
    async with limiters_on_own_redis(3, rates={"post": Rate(320, 4.0)}, lease=16, hold=0.3) as (
        clients,
        made,
    ):
        start = time.monotonic()

        async def hammer(limiter: RateLimiter) -> None:
            nonlocal admitted
            while time.monotonic() - start < 2.0:
                got = await asyncio.gather(*(limiter.hit("post", "ana") for _ in range(8)))
                admitted += sum(d.allowed for d in got)
                await asyncio.sleep(0)

        await asyncio.gather(*(hammer(limiter) for limiter in made))
        elapsed = time.monotonic() - start
        assert admitted <= 320 + 80 * elapsed, (admitted, elapsed)
        assert admitted >= 320, "the tokens on lease must not starve the bucket"
        assert not any(limiter.fallback for limiter in made)


async def test_a_caller_cancelled_during_its_redis_call_leaves_the_bucket_to_the_next():
    """The caller making a bucket's script call is cancelled (its socket closed) while
    the call runs: the callers queued behind it, and later ones, still get decisions."""
    async with limiters_on_own_redis(1, rates={"post": Rate(20, 60.0)}) as (_, (limiter,)):
        for _ in range(5):
            first = asyncio.ensure_future(limiter.hit("post", "ana"))
            await asyncio.sleep(0)  # its script call is under way
            queued = asyncio.ensure_future(limiter.hit("post", "ana"))
            await asyncio.sleep(0)
            first.cancel()
            decision = await asyncio.wait_for(queued, harness.t(5))
            assert decision.allowed
            later = await asyncio.wait_for(limiter.hit("post", "ana"), harness.t(5))
            assert later.allowed


async def test_a_large_bucket_asks_redis_once_per_lease_not_per_decision():
    async with limiters_on_own_redis(2, rates={"post": Rate(100_000, 1.0)}, lease=16) as (
        clients,
        made,
    ):
        for _ in range(100):
            for limiter in made:
                got = await asyncio.gather(*(limiter.hit("post", "api") for _ in range(8)))
                assert all(d.allowed for d in got)
        calls = (await clients[0].info("commandstats"))["cmdstat_evalsha"]["calls"]
        # 1,600 decisions: the first calls grow the lease, then one in 16 or so asks
        assert calls <= 1600 / 8, calls


async def test_tokens_on_lease_are_reserved_until_spent_given_back_or_lapsed():
    server = RedisServer()
    server.start()
    rate = Rate(64, 2.0)  # 32 a second; a lease takes at most 64 // 32 = 2 ahead
    (ca, cb), (a, b) = limiters(server.url, 2, rates={"post": rate}, lease=16, hold=5.0)
    try:
        # a few quick decisions on a: it leases ahead, and Redis counts the lease
        assert all([(await a.hit("post", "ana")).allowed for _ in range(4)])
        assert await lease_of(ca, "ana") == 2
        await asyncio.sleep(2.2)  # the bucket refills, but only up to 64 - 2
        burst = await asyncio.gather(*(b.hit("post", "ana") for _ in range(100)))
        assert sum(d.allowed for d in burst) == 62
        # ... while a spends its two without asking Redis
        assert [(await a.hit("post", "ana")).allowed for _ in range(2)] == [True, True]

        # given back: a closing instance settles, and the tokens are others' again
        slow = Rate(64, 3600.0)  # no refill to speak of
        (cc,), (c,) = limiters(server.url, 1, rates={"post": slow}, lease=16, hold=5.0)
        (cd,), (d,) = limiters(server.url, 1, rates={"post": slow}, lease=16, hold=5.0)
        assert all([(await c.hit("post", "bo")).allowed for _ in range(4)])
        assert await lease_of(cc, "bo") == 2
        await c.close()
        assert await lease_of(cc, "bo") == 0
        burst = await asyncio.gather(*(d.hit("post", "bo") for _ in range(100)))
        assert sum(x.allowed for x in burst) == 64 - 4, "c spent 4; the 2 it held came back"
        await d.close()
        for x in (cc, cd):
            await x.aclose()

        # lapsed: an instance cut off before it settles holds its lease for HOLD only
        (ce,), (e,) = limiters(server.url, 1, rates={"post": rate}, lease=16, hold=0.3)
        assert all([(await e.hit("post", "cy")).allowed for _ in range(4)])
        assert await lease_of(cb, "cy") == 2
        await ce.aclose()  # its settlement will fail: nothing comes back
        await asyncio.sleep(2.2)  # the lease lapses, the bucket refills to the full 64
        burst = await asyncio.gather(*(b.hit("post", "cy") for _ in range(100)))
        assert sum(x.allowed for x in burst) == 64
        await e.close()
        await ce.aclose()  # whatever its failed settlement reopened
    finally:
        await a.close()
        await b.close()
        await ca.aclose()
        await cb.aclose()
        server.stop()


async def test_a_bucket_seen_empty_refuses_without_asking_again_for_a_moment():
    server = RedisServer()
    server.start()
    (client,), (limiter,) = limiters(
        server.url, 1, rates={"post": Rate(2, 3600.0)}, lease=16, recheck=3600.0
    )
    try:
        got = [await limiter.hit("post", "ana") for _ in range(3)]
        assert [d.allowed for d in got] == [True, True, False]
        before = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]
        refused = [await limiter.hit("post", "ana") for _ in range(5)]
        assert not any(d.allowed for d in refused)
        assert all(d.retry_after > 0 and d.remaining == 0 for d in refused)
        after = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert after == before, "a refusal seen moments ago costs no round trip"
    finally:
        await limiter.close()
        await client.aclose()
        server.stop()


async def test_posts_spread_over_three_gateways_never_exceed_capacity_plus_refill(gateway_env):
    """Posts from twelve clients over three gateways, each gateway leasing ahead,
    until well past the bucket's capacity: what is admitted, all instances
    together, stays within capacity + refill over the time it took."""
    env = {**gateway_env, "RATE_LIMIT": "96/4s", "RATE_LIMIT_LEASE_HOLD": "0.3"}
    room = "leased"
    async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
        statuses: list[int] = []
        start = time.monotonic()

        def enough() -> bool:
            return statuses.count(429) >= 40 or time.monotonic() - start > 60

        async def poster(i: int) -> None:
            n = 0
            while not enough():
                r = await post(http, gws[i % 3].url, room, f"p{i}-{n}")
                statuses.append(r.status_code)
                n += 1

        await asyncio.gather(*(poster(i) for i in range(12)))
        elapsed = time.monotonic() - start
        admitted = statuses.count(201)
        assert set(statuses) <= {201, 429}, set(statuses)
        assert statuses.count(429) >= 40, "the posts never outran the bucket"
        assert admitted <= 96 + 24 * elapsed, (admitted, elapsed)
        assert admitted >= 96, "tokens on lease must not starve the bucket"
        page = (await http.get(f"{gws[1].url}/v1/rooms/{room}/messages?limit=1")).json()
        assert page["messages"][-1]["seq"] == admitted, "every admitted post stored, no other"


# -- Redis outage: per-instance buckets, a metric and a log line -----------------------


async def test_redis_outage_falls_back_to_local_buckets_and_recovers(caplog):
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url, socket_connect_timeout=0.5)
    metrics = Metrics()
    limiter = RateLimiter(
        RedisContext.of(client, guard=RedisGuard(cooldown=0.0)),
        prefix="t:",
        metrics=metrics,
        rates={"post": Rate(3, 3600.0)},
    )
    caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
    try:
        assert (await limiter.hit("post", "ana")).remaining == 2
        server.stop()
        during = [await limiter.hit("post", "ana") for _ in range(8)]
        # neither a flood let through nor everyone blocked: the local bucket's capacity
        assert [d.allowed for d in during] == [True] * 3 + [False] * 5
        assert limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 1
        assert b"chat_rate_limit_local_fallback 1.0" in metrics.render()
        assert any("per-instance buckets" in r.getMessage() for r in caplog.records)

        server.start()  # same port, empty: the shared bucket starts full again
        await harness.eventually(lambda: limiter.hit("post", "ana"), timeout=10)
        assert not limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 0
        assert any("shared buckets restored" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()
        server.stop()


async def test_a_hung_redis_costs_one_timeout_then_local_buckets_for_the_cooldown():
    # A listener that accepts and never answers: Redis stuck, not down.
    accepted = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        try:
            while await reader.read(1 << 16):  # read everything, answer nothing
                pass
        finally:
            writer.close()

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
    metrics = Metrics()
    limiter = RateLimiter(
        RedisContext.of(client, guard=RedisGuard(cooldown=3600.0)),
        prefix="t:",
        metrics=metrics,
        rates={"post": Rate(2, 60.0)},
    )
    try:
        first = await limiter.hit("post", "ana")
        assert first.allowed and limiter.fallback
        attempts = len(accepted)
        assert attempts >= 1
        rest = [await limiter.hit("post", "ana") for _ in range(3)]
        assert [d.allowed for d in rest] == [True, False, False]
        # Redis is not tried again within the guard's cooldown
        assert len(accepted) == attempts
        assert metrics.rate_limit_fallback._value.get() == 1
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        hole.close()
        await hole.wait_closed()


# -- on real gateway processes -------------------------------------------------------


def assert_limited(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["error"]["code"] == "rate_limited"
    assert isinstance(body["error"]["retry_after"], float) and body["error"]["retry_after"] > 0
    assert int(r.headers["Retry-After"]) >= 1
    assert int(r.headers["Retry-After"]) >= body["error"]["retry_after"]
    assert r.headers["RateLimit-Limit"] == str(limit)
    assert r.headers["RateLimit-Remaining"] == "0"
    assert int(r.headers["RateLimit-Reset"]) >= 1


async def test_buckets_are_exact_across_instances_and_shared_by_http_and_ws(gateway_env):
    env = {
        **gateway_env,
        "RATE_LIMIT": "10/1h",
        "PUBLISH_RATE_LIMIT": "3/1h",
        "CONNECT_RATE_LIMIT": "4/1h",
    }
    room = "burst"
    async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
        async with WSClient.connect(gws[0].ws_url) as ws:
            assert ws.conn.response.headers["RateLimit-Limit"] == "4"
            assert ws.conn.response.headers["RateLimit-Remaining"] == "3"
            for ref in ("a", "b"):
                await ws.send({"type": "publish", "room": room, "text": ref, "ref": ref})
                assert (await ws.expect("ack"))["ref"] == ref

            # 40 posts at once, spread over three instances: exactly the 8 tokens left
            rs = await asyncio.gather(
                *(post(http, gws[i % 3].url, room, f"m{i}") for i in range(40))
            )
            ok = [r for r in rs if r.status_code == 201]
            limited = [r for r in rs if r.status_code != 201]
            assert len(ok) == 8, [r.status_code for r in rs]
            assert sorted(int(r.headers["RateLimit-Remaining"]) for r in ok) == list(range(8))
            for r in ok:
                assert r.headers["RateLimit-Limit"] == "10"
                assert int(r.headers["RateLimit-Reset"]) >= 1
                assert "Retry-After" not in r.headers
            for r in limited:
                assert_limited(r, 10)

            # the WS publish draws on the same, now empty, bucket; the socket stays
            await ws.send({"type": "publish", "room": room, "text": "more", "ref": "c"})
            err = await ws.expect("error")
            assert err["code"] == "rate_limited" and err["ref"] == "c"
            assert isinstance(err["retry_after"], float) and err["retry_after"] > 0
            await ws.send({"type": "ping"})
            assert (await ws.expect("pong")) == {"type": "pong"}
            assert (await ws.subscribe(room))["seq"] == 10

        page = (await http.get(f"{gws[2].url}/v1/rooms/{room}/messages")).json()
        assert len(page["messages"]) == 10, "a refused post must store nothing"

        # /v1/publish has its own bucket, untouched by the posts above
        rs = [
            await http.post(
                f"{gws[i % 3].url}/v1/publish", json={"room": room, "event": "tick", "data": {}}
            )
            for i in range(5)
        ]
        assert [r.status_code for r in rs] == [202, 202, 202, 429, 429]
        assert [r.headers["RateLimit-Remaining"] for r in rs[:3]] == ["2", "1", "0"]
        assert_limited(rs[3], 3)

        # connection attempts: one used by the WS above, three left, on any instance
        async with SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events") as sse:
            assert sse.status == 200
        async with WSClient.connect(gws[2].ws_url) as ws2:
            assert ws2.conn.response.headers["RateLimit-Remaining"] == "1"
        async with WSClient.connect(gws[0].ws_url) as ws3:
            assert ws3.conn.response.headers["RateLimit-Remaining"] == "0"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with WSClient.connect(gws[1].ws_url):
                pass
        assert refused.value.response.status_code == 429
        assert b'"rate_limited"' in refused.value.response.body
        r = await http.get(f"{gws[2].url}/v1/rooms/{room}/events")
        assert_limited(r, 4)
        # ... while reading history is not a connection attempt
        assert (await http.get(f"{gws[0].url}/v1/rooms/{room}/messages")).status_code == 200


async def test_forwarded_for_counts_only_from_a_trusted_proxy(gateway_env):
    base = {**gateway_env, "RATE_LIMIT": "2/1h"}
    direct = Instance(dict(base)).start()
    proxied = Instance({**base, "TRUSTED_PROXIES": "127.0.0.1/32, ::1"}).start()
    try:
        await asyncio.gather(direct.wait_ready(), proxied.wait_ready())
        async with httpx.AsyncClient(timeout=10) as http:

            async def send(inst: Instance, room: str, xff: str) -> int:
                r = await post(http, inst.url, room, "x", headers={"X-Forwarded-For": xff})
                return r.status_code

            # by default the header is ignored: every "client" is 127.0.0.1
            assert [await send(direct, "d", xff) for xff in ("1.1.1.1", "2.2.2.2", "3.3.3.3")] == [
                201,
                201,
                429,
            ]
            # from a trusted proxy, the rightmost untrusted hop is the client
            assert [await send(proxied, "p", xff) for xff in ("1.1.1.1", "2.2.2.2", "3.3.3.3")] == [
                201,
                201,
                201,
            ]
            assert [
                await send(proxied, "p", xff)
                for xff in ("6.6.6.6, 1.1.1.1", "7.7.7.7, 1.1.1.1, 127.0.0.1")
            ] == [201, 429]
        assert "open mode" in direct.log(), "open mode must be announced at start"
    finally:
        direct.stop()
        proxied.stop()


async def test_a_redis_outage_limits_per_instance_and_says_so(pg_url):
    server = RedisServer()
    server.start()
    inst = Instance(
        {
            "DATABASE_URL": pg_url,
            "REDIS_URL": server.url,
            "KEY_PREFIX": "t:",
            "RATE_LIMIT": "3/1h",
            "LOG_LEVEL": "warning",
        }
    ).start()
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient(timeout=30) as http:

            async def fallback_gauge() -> str:
                text = (await http.get(inst.url + "/metrics")).text
                return next(
                    line
                    for line in text.splitlines()
                    if line.startswith("chat_rate_limit_local_fallback ")
                )

            r = await post(http, inst.url, "down", "before")
            assert r.status_code == 201 and r.headers["RateLimit-Remaining"] == "2"
            assert await fallback_gauge() == "chat_rate_limit_local_fallback 0.0"
            server.stop()
            # the instance's own bucket: neither a flood nor a wall
            statuses = [(await post(http, inst.url, "down", f"m{i}")).status_code for i in range(5)]
            assert statuses == [201, 201, 201, 429, 429]
            assert await fallback_gauge() == "chat_rate_limit_local_fallback 1.0"
            assert "per-instance buckets" in inst.log()

            server.start()  # empty again: the shared bucket starts full

            async def shared_again() -> bool:
                r = await post(http, inst.url, "down", "after")
                return (
                    r.status_code == 201
                    and await fallback_gauge() == "chat_rate_limit_local_fallback 0.0"
                )

            await eventually(shared_again, timeout=15, interval=0.3)
            assert "shared buckets restored" in inst.log()
    finally:
        inst.stop()
        server.stop()


async def test_memory_mode_runs_the_same_bucket_in_process(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
        "REDIS_URL": "memory://",
        "RATE_LIMIT": "2/1h",
        "LOG_LEVEL": "warning",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        rs = [await post(http, gw.url, "mem", f"m{i}") for i in range(3)]
        assert [r.status_code for r in rs] == [201, 201, 429]
        assert [r.headers["RateLimit-Remaining"] for r in rs] == ["1", "0", "0"]
        assert_limited(rs[2], 2)
        assert 1790 <= rs[2].json()["error"]["retry_after"] <= 1800  # half an hour per token
        async with WSClient.connect(gw.ws_url) as ws:
            await ws.send({"type": "publish", "room": "mem", "text": "x", "ref": "w"})
            err = await ws.expect("error")
            assert err["code"] == "rate_limited" and err["ref"] == "w"
            assert 1790 <= err["retry_after"] <= 1800


async def test_publish_buckets_are_per_api_key_and_name_no_secret(gateway_env, redis_prefix):
    base = {**gateway_env, "PUBLISH_RATE_LIMIT": "2/1h"}
    async with instances(1, base) as (open_gw,), httpx.AsyncClient(timeout=10) as http:
        # open mode: a made-up bearer per request does not buy a fresh bucket
        event = {"room": "r", "event": "e"}
        rs = [
            await http.post(
                f"{open_gw.url}/v1/publish",
                json=event,
                headers={"Authorization": f"Bearer made-up-{i}"},
            )
            for i in range(3)
        ]
        assert [r.status_code for r in rs] == [202, 202, 429]
    keyed_env = {**base, "API_KEYS": "secret-key-one,secret-key-two"}
    async with instances(1, keyed_env) as (gw,), httpx.AsyncClient(timeout=10) as http:

        async def send(key: str) -> int:
            r = await http.post(
                f"{gw.url}/v1/publish", json=event, headers={"Authorization": f"Bearer {key}"}
            )
            return r.status_code

        assert [await send("secret-key-one") for _ in range(3)] == [202, 202, 429]
        assert [await send("secret-key-two") for _ in range(3)] == [202, 202, 429]
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        keys = [k.decode() async for k in client.scan_iter(match=f"{redis_prefix}rl:*")]
    finally:
        await client.aclose()
    assert len([k for k in keys if ":publish:" in k]) == 3, keys
    assert not any("secret" in k for k in keys), keys


async def test_marking_read_is_rate_limited_on_http_and_ws(tmp_path):
    env = embedded_env(tmp_path, READ_RATE_LIMIT="3/60s")
    async with (
        instances(1, env) as (gw,),
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        assert (await post(http, gw.url, "seen", "hi", author="ana")).status_code == 201
        for _ in range(3):
            r = await http.post("/v1/rooms/seen/read", json={"seq": 1, "user": "ana"})
            assert r.status_code == 200 and r.headers["ratelimit-limit"] == "3"
        r = await http.post("/v1/rooms/seen/read", json={"seq": 1, "user": "ana"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        async with WSClient.connect(gw.ws_url + "?user=ana") as ws:
            await ws.send({"type": "read", "room": "seen", "seq": 1, "ref": "r1"})
            err = await ws.expect("error")
            assert err["code"] == "rate_limited" and err.get("ref") == "r1"


async def test_a_user_named_like_an_api_key_has_a_bucket_of_its_own(tmp_path):
    secret = "s" * 40
    env = embedded_env(tmp_path, AUTH_SECRET=secret, API_KEYS="backend-key", RATE_LIMIT="2/60s")
    lookalike = key_bucket("backend-key")

    def token(sub: str) -> dict[str, str]:
        tok = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        return {"Authorization": f"Bearer {tok}"}

    async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/rooms/b/messages", json={"text": "one"}, headers=token("bob"))
        assert r.status_code == 201
        key = {"Authorization": "Bearer backend-key"}
        for i in range(2):  # the key's post bucket, emptied by edits
            r = await http.patch("/v1/rooms/b/messages/1", json={"text": f"e{i}"}, headers=key)
            assert r.status_code == 200
        r = await http.patch("/v1/rooms/b/messages/1", json={"text": "e3"}, headers=key)
        assert r.status_code == 429
        r = await http.post("/v1/rooms/b/messages", json={"text": "me"}, headers=token(lookalike))
        assert r.status_code == 201, r.text

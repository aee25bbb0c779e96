"""Faults an operator meets, against real processes: a frozen Redis, an instance cut
from Redis but not from Postgres, a frozen Postgres link. Each test asserts the
promise that must hold through the fault, with generous bounds (correctness, not
speed: speed is the bench's)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import redis.asyncio as aioredis

from tests.harness import (REDIS_URL, RedisServer, SSEClient, WSClient, eventually, instances,
                           metric, post)


async def _fallbacks(gws: list) -> list[float]:
    return [await metric(g.url, "chat_rate_limit_local_fallback") for g in gws]


async def test_a_redis_freeze_under_steady_posts_leaves_no_instance_off_redis(gateway_env):
    """Redis is frozen (SIGSTOP) for 2 s while posts keep coming over three instances.
    Every instance must be back on Redis within seconds of the thaw, while the posts
    go on, and then a post read at once on another instance is never stale. (Before,
    each post skipped while Redis cooled down moved the cooldown forward, so a busy
    instance stayed off Redis for as long as posts kept coming.)"""
    rs = RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url}
    try:
        async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
            done = asyncio.Event()
            acked = [0]

            async def poster(n: int) -> None:
                i = 0
                while not done.is_set():
                    r = await post(http, gws[(n + i) % 3].url, f"steady{n}", f"m{i}")
                    assert r.status_code == 201, r.text
                    acked[0] += 1
                    i += 1
                    await asyncio.sleep(0.02)

            posters = [asyncio.create_task(poster(n)) for n in range(4)]
            try:
                await asyncio.sleep(1)
                assert await _fallbacks(gws) == [0, 0, 0]
                assert rs.proc is not None
                rs.proc.send_signal(signal.SIGSTOP)
                frozen_at = time.monotonic()
                try:
                    # Every instance notices (its posts time out on Redis).
                    await eventually(lambda: _all_off(gws), timeout=10)
                    await asyncio.sleep(max(0.0, frozen_at + 2 - time.monotonic()))
                finally:
                    rs.proc.send_signal(signal.SIGCONT)
                before = acked[0]
                # Back on Redis while the posts go on (they do: see below).
                await eventually(lambda: _all_on(gws), timeout=5)
                # Post here, read there at once: the page holds the post.
                for i in range(30):
                    r = await post(http, gws[i % 3].url, "pairs", f"p{i}")
                    assert r.status_code == 201, r.text
                    mid = r.json()["id"]
                    page = (await http.get(f"{gws[(i + 1) % 3].url}/v1/rooms/pairs/messages",
                                           params={"limit": 5})).json()
                    assert mid in [m["id"] for m in page["messages"]], (i, page)
                assert acked[0] > before, "the posts went on all along"
            finally:
                done.set()
                await asyncio.gather(*posters)
    finally:
        if rs.proc is not None:
            rs.proc.send_signal(signal.SIGCONT)
        rs.stop()


async def _all_off(gws: list) -> bool:
    return all(v == 1 for v in await _fallbacks(gws))


async def _all_on(gws: list) -> bool:
    return all(v == 0 for v in await _fallbacks(gws))


async def test_a_commit_whose_seq_raise_and_publish_were_lost_reaches_every_subscriber(
        gateway_env):
    """Instance A is cut from Redis but not from Postgres: it commits and answers 201,
    but neither raises the room's seq key nor publishes. The other instances'
    position checks read the store every few rounds, so the message reaches their
    subscribers with no further post, even after A is gone."""
    room = "cut"
    cut = {**gateway_env, "FAULT_CUT_FROM_REDIS": "1"}
    async with instances(1, cut) as (a,), instances(2, gateway_env) as (b, c):
        async with (WSClient.connect(b.ws_url) as ws, httpx.AsyncClient() as http,
                    SSEClient.open(f"{c.url}/v1/rooms/{room}/events") as sse):
            await ws.subscribe(room)
            r = await post(http, a.url, room, "only in the store")
            assert r.status_code == 201 and r.json()["seq"] == 1
            assert await ws.messages(room, 1, timeout=10) == [1]
            assert await sse.wait_for(1, timeout=10) == [1]
            # The same once the cut instance is gone for good.
            r = await post(http, a.url, room, "and its last words")
            assert r.status_code == 201 and r.json()["seq"] == 2
            a.kill()
            assert await ws.messages(room, 2, timeout=10) == [1, 2]
            assert await sse.wait_for(2, timeout=10) == [1, 2]
            redis = aioredis.from_url(REDIS_URL)
            try:
                assert await redis.get(f"{gateway_env['KEY_PREFIX']}{{{room}}}:seq") is None
            finally:
                await redis.aclose()
            assert await metric(b.url, "chat_gap_fills_total", reason="position") >= 1

"""Presence across real gateway processes sharing one Redis, and in memory:// mode."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tests.harness import (
    REDIS_URL,
    RedisServer,
    SSEClient,
    WSClient,
    eventually,
    instances,
    metric,
    post,
    t,
)


async def users(http: httpx.AsyncClient, base: str, room: str) -> list[str]:
    r = await http.get(f"{base}/v1/rooms/{room}/presence")
    assert r.status_code == 200, r.text
    assert r.json()["room"] == room
    return r.json()["users"]  # type: ignore[no-any-return]


def seen(room: str, action: str, user: str) -> dict:
    return {"room": room, "action": action, "user": user}


async def next_presence(ws: WSClient, user: str) -> dict:
    """The next presence frame about ``user`` (frames about others are passed over)."""
    while True:
        frame = await ws.expect("presence")
        if frame["user"] == user:
            return {k: frame[k] for k in ("room", "action", "user")}


async def test_join_leave_and_crash_across_instances(gateway_env, redis_prefix):
    env = {**gateway_env, "PRESENCE_TTL": "1.5"}
    room = "hall"
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(b.ws_url + "?user=bob") as bob,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?user=cy") as cy,
        ):
            await bob.subscribe(room)
            await eventually(lambda: _has(http, c.url, room, {"bob", "cy"}))

            async with WSClient.connect(a.ws_url + "?user=ana") as ana:
                await ana.subscribe(room)
                assert await next_presence(bob, "ana") == seen(room, "join", "ana")
                await eventually(
                    lambda: any(
                        e.get("event") == "presence" and e["json"]["user"] == "ana"
                        for e in cy.events
                    )
                )
                assert await users(http, c.url, room) == ["ana", "bob", "cy"]
                # the key is the room's, under the prefix, with the {room} hash tag
                client = aioredis.from_url(REDIS_URL)
                try:
                    assert await client.zcard(f"{redis_prefix}{{{room}}}:presence") == 3
                finally:
                    await client.aclose()

                # a second connection of ana elsewhere: leaving one does not make her leave
                async with WSClient.connect(c.ws_url + "?user=ana") as ana2:
                    await ana2.subscribe(room)
                    await ana.send({"type": "unsubscribe", "room": room})
                    await ana.expect("unsubscribed")
                    assert "ana" in await users(http, a.url, room)
                assert await next_presence(bob, "ana") == seen(room, "leave", "ana")
                assert [
                    f["action"]
                    for f in bob.frames
                    if f.get("type") == "presence" and f["user"] == "ana"
                ] == ["join", "leave"]
                assert await users(http, a.url, room) == ["bob", "cy"]

            # dan on instance a, which then crashes: dan expires and bob is told
            async with WSClient.connect(a.ws_url + "?user=dan") as dan:
                await dan.subscribe(room)
                assert await next_presence(bob, "dan") == seen(room, "join", "dan")
                a.kill()
                assert await next_presence(bob, "dan") == seen(room, "leave", "dan")
                assert await users(http, c.url, room) == ["bob", "cy"]


async def _has(http: httpx.AsyncClient, base: str, room: str, expected: set[str]) -> bool:
    return set(await users(http, base, room)) == expected


async def test_presence_in_memory_mode_and_bad_input(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/p.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "warning",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(gw.ws_url + "?user=ana") as ana,
            WSClient.connect(gw.ws_url + "?user=bob") as bob,
            WSClient.connect(gw.ws_url) as anonymous,
        ):
            await ana.subscribe("r1")
            await anonymous.subscribe("r1")
            await bob.subscribe("r1")
            assert await next_presence(ana, "bob") == seen("r1", "join", "bob")
            assert await users(http, gw.url, "r1") == ["ana", "bob"]
            assert await users(http, gw.url, "r2") == []
        await eventually(lambda: _has(http, gw.url, "r1", set()))

        r = await http.get(f"{gw.url}/v1/rooms/bad room!/presence")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        r = await http.get(f"{gw.url}/v1/rooms/r1/presence?bogus=1")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        r = await http.get(f"{gw.url}/v1/rooms/r1/events?user=" + "x" * 65)
        assert r.status_code == 422 and r.json()["error"]["field"] == "author"
        # a backend cannot forge presence through POST /v1/publish
        r = await http.post(
            f"{gw.url}/v1/publish", json={"room": "r1", "event": "presence", "data": {}}
        )
        assert r.status_code == 422


async def test_an_sse_stream_that_ends_announces_its_leave_at_once(gateway_env):
    """A closed SSE stream leaves at once, not when its member expires: its clean-up
    runs to the end even though the stream's task is being cancelled."""
    env = {**gateway_env, "PRESENCE_TTL": "120", "PRESENCE_DEBOUNCE": "0.2"}
    room = "lounge"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(a.ws_url + "?user=bob") as bob:
            await bob.subscribe(room)
            async with SSEClient.open(f"{b.url}/v1/rooms/{room}/events?user=cy"):
                assert await next_presence(bob, "cy") == seen(room, "join", "cy")
            # far sooner than the 120 s a crashed instance's member would take
            assert await next_presence(bob, "cy") == seen(room, "leave", "cy")
            assert await users(http, a.url, room) == ["bob"]


async def test_a_burst_of_disconnects_keeps_the_instance_on_redis(gateway_env):
    """Hundreds of sockets in one room close at once beside a 20/s poster in another
    room. Every leave is announced to a watcher; the other room's messages keep
    arriving through Redis (no fill from the store, no per-instance rate limits,
    no failed Redis call in the log); and the instance's connections to Redis come
    back down afterwards. (Before, the debounced leaves fired together, one EVALSHA
    on a pooled connection each: past redis-py's 100 connections the pool refused,
    the shared guard sent every feature off Redis for a second, leaves went
    unannounced, and the pool kept its 101 connections.)"""
    crowd = 300
    rs = RedisServer()
    rs.start()
    env = {
        **gateway_env,
        "REDIS_URL": rs.url,
        "MAX_CONNECTIONS_PER_IDENTITY": "1000",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "SUBSCRIBE_RATE_LIMIT": "100000/1s",
        "PRESENCE_DEBOUNCE": "1",
        "LOG_LEVEL": "warning",
    }
    admin = aioredis.from_url(rs.url)
    try:
        async with (
            instances(1, env) as (gw,),
            httpx.AsyncClient(timeout=30) as http,
            WSClient.connect(f"{gw.ws_url}?user=watcher") as watcher,
            WSClient.connect(f"{gw.ws_url}?user=reader") as reader,
            contextlib.AsyncExitStack() as stack,
        ):
            await watcher.subscribe("crowd")
            await reader.subscribe("other")
            sem = asyncio.Semaphore(40)

            async def join(i: int) -> WSClient:
                async with sem:
                    ws = await stack.enter_async_context(WSClient.connect(f"{gw.ws_url}?user=u{i}"))
                    await ws.subscribe("crowd")
                    return ws

            members = await asyncio.gather(*(join(i) for i in range(crowd)))
            await eventually(lambda: _has_users(http, gw.url, "crowd", crowd + 1), timeout=30)
            fills = await metric(gw.url, "chat_gap_fills_total")
            done = asyncio.Event()
            posted: list[int] = []

            async def poster() -> None:
                i = 0
                while not done.is_set():
                    r = await post(http, gw.url, "other", f"m{i}")
                    assert r.status_code == 201, r.text
                    posted.append(r.json()["seq"])
                    i += 1
                    await asyncio.sleep(0.05)

            posting = asyncio.create_task(poster())
            await asyncio.sleep(1)
            await asyncio.gather(*(ws.conn.close() for ws in members))

            left: set[str] = set()

            async def all_left() -> bool:
                while len(left) < crowd:
                    frame = await watcher.expect("presence", timeout=30)
                    if frame["action"] == "leave":
                        left.add(frame["user"])
                return True

            await asyncio.wait_for(all_left(), t(40))
            await asyncio.sleep(1)
            done.set()
            await posting
            assert await reader.messages("other", len(posted), timeout=20) == posted
            assert await metric(gw.url, "chat_gap_fills_total") == fills, "filled from the store"
            log = Path(gw.log_path).read_text()
            for sign in ("per-instance buckets", "not recorded", "publish failed", "lost"):
                assert sign not in log, log[-3000:]

            async def few_connections() -> bool:
                clients = await admin.client_list()
                return len(clients) - 1 <= 6  # this test's own is one of them

            await eventually(few_connections, timeout=40)
    finally:
        await admin.aclose()
        rs.stop()


async def _has_users(http: httpx.AsyncClient, base: str, room: str, n: int) -> bool:
    return len(await users(http, base, room)) == n

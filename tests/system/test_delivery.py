"""The delivery guarantee through failures: each subscriber sees seq 1..N, once, in order.

Every test asserts the exact sequence each subscriber saw, not a count.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import websockets

from tests.harness import (
    Instance,
    RawWebSocket,
    RedisServer,
    SSEClient,
    WSClient,
    all_ready,
    eventually,
    instances,
    metric,
    post,
    t,
)
from tests.proxy import TCPProxy


async def _post_all(
    http: httpx.AsyncClient,
    gws: list[Instance],
    room: str,
    count: int,
    *,
    start: int = 0,
    pause: float = 0.0,
) -> list[int]:
    """Post ``count`` messages round-robin over ``gws``; the acknowledged seqs."""
    seqs = []
    for i in range(start, start + count):
        r = await post(http, gws[i % len(gws)].url, room, f"m{i}")
        assert r.status_code == 201, r.text
        seqs.append(r.json()["seq"])
        if pause:
            await asyncio.sleep(pause)
    return seqs


async def test_resume_stitches_replay_and_live_while_writers_race(gateway_env):
    room = "resume"
    async with instances(2, gateway_env) as gws, httpx.AsyncClient(timeout=30) as http:
        first = await _post_all(http, gws, room, 30)
        assert first == list(range(1, 31))
        # writers keep posting while the subscribers below replay from the store
        writer = asyncio.create_task(_post_all(http, gws, room, 60, start=30, pause=0.005))
        b = gws[1]
        async with AsyncExitStack() as stack:
            ws = await stack.enter_async_context(WSClient.connect(b.ws_url))
            sub = await ws.subscribe(room, since=10)
            assert sub["seq"] >= 30
            sse_header = await stack.enter_async_context(
                SSEClient.open(f"{b.url}/v1/rooms/{room}/events", headers={"Last-Event-ID": "5"})
            )
            sse_query = await stack.enter_async_context(
                SSEClient.open(f"{gws[0].url}/v1/rooms/{room}/events?since=20")
            )
            await writer
            assert await ws.messages(room, 80) == list(range(11, 91))
            assert await sse_header.wait_for(85) == list(range(6, 91))
            assert await sse_query.wait_for(70) == list(range(21, 91))
            await asyncio.sleep(0.3)
            assert ws.seqs(room) == list(range(11, 91))
            assert sse_header.seqs() == list(range(6, 91))


async def test_live_only_subscriber_gets_messages_after_the_subscribed_seq(gateway_env):
    room = "liveonly"
    async with instances(1, gateway_env) as gws, httpx.AsyncClient() as http:
        await _post_all(http, gws, room, 5)
        async with WSClient.connect(gws[0].ws_url) as ws:
            assert (await ws.subscribe(room))["seq"] == 5
            await _post_all(http, gws, room, 3)
            assert await ws.messages(room, 3) == [6, 7, 8]
            await ws.send({"type": "unsubscribe", "room": room})
            await ws.expect("unsubscribed")
            await _post_all(http, gws, room, 2)
            await ws.send({"type": "ping"})
            await ws.expect("pong")
            assert ws.seqs(room) == [6, 7, 8]


async def test_a_publish_lost_after_commit_is_filled_from_the_store(gateway_env):
    """Instance A commits but never publishes (as if killed right after each commit);
    posts alternate between A and B, so B's subscribers see seq jumps (gap fill) and a
    silent tail (position check)."""
    room = "lost"
    env_a = {**gateway_env, "FAULT_SKIP_PUBLISH": "1"}
    async with instances(1, env_a) as (a,), instances(2, gateway_env) as (b, c):
        async with (
            WSClient.connect(b.ws_url) as ws,
            httpx.AsyncClient() as http,
            SSEClient.open(f"{c.url}/v1/rooms/{room}/events") as sse,
        ):
            await ws.subscribe(room)
            for i in range(20):
                target = a if i % 2 == 0 or i >= 16 else b
                r = await post(http, target.url, room, f"m{i}")
                assert r.status_code == 201
            expected = list(range(1, 21))
            assert await ws.messages(room, 20, timeout=15) == expected
            assert await sse.wait_for(20, timeout=15) == expected
            assert await metric(b.url, "chat_gap_fills_total") >= 1


async def test_redis_restart_while_writers_post_through_three_instances(gateway_env):
    rs = RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url, "BROKER_PROBE_INTERVAL": "0.5"}
    room = "outage"
    try:
        async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
            async with AsyncExitStack() as stack:
                wss = [await stack.enter_async_context(WSClient.connect(g.ws_url)) for g in gws]
                sses = [
                    await stack.enter_async_context(
                        SSEClient.open(f"{g.url}/v1/rooms/{room}/events")
                    )
                    for g in gws
                ]
                for ws in wss:
                    await ws.subscribe(room)
                acked = await _post_all(http, gws, room, 15, pause=0.01)
                rs.stop()
                # posts during the outage still commit (and are acknowledged)
                acked += await _post_all(http, gws, room, 15, start=15, pause=0.01)
                rs.start()
                await eventually(lambda: all_ready(http, gws), timeout=15)
                acked += await _post_all(http, gws, room, 15, start=30, pause=0.01)
                assert acked == list(range(1, 46))
                for ws in wss:
                    assert await ws.messages(room, 45, timeout=20) == acked
                for sse in sses:
                    assert await sse.wait_for(45, timeout=20) == acked
                assert await metric(gws[0].url, "chat_broker_reconnects_total") >= 1
                page = (await http.get(f"{gws[2].url}/v1/rooms/{room}/messages")).json()
                assert [m["seq"] for m in page["messages"]] == list(range(1, 46))[-50:]
    finally:
        rs.stop()


async def test_instance_killed_mid_stream_subscribers_resume_elsewhere(gateway_env):
    room = "killed"
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=30) as http:
        doomed = gws[2]
        async with WSClient.connect(gws[0].ws_url) as survivor:
            await survivor.subscribe(room)
            seen: list[int] = []
            async with WSClient.connect(doomed.ws_url) as victim:
                await victim.subscribe(room)
                await _post_all(http, gws, room, 20)
                seen = await victim.messages(room, 20)
                doomed.kill()
                with pytest.raises((websockets.ConnectionClosed, OSError)):
                    for _ in range(100):
                        await victim.recv(timeout=5)
            assert seen == list(range(1, 21))
            writer = asyncio.create_task(_post_all(http, gws[:2], room, 30, start=20, pause=0.005))
            await asyncio.sleep(0.05)
            async with WSClient.connect(gws[1].ws_url) as resumed:
                await resumed.subscribe(room, since=seen[-1])
                await writer
                assert await resumed.messages(room, 30) == list(range(21, 51))
            assert await survivor.messages(room, 50) == list(range(1, 51))


async def _flood(http: httpx.AsyncClient, gw: Instance, room: str, count: int) -> None:
    """``count`` ephemeral events of ~48 KB each: megabytes that a stalled reader's
    socket buffers cannot absorb."""
    blob = "z" * 48_000
    for i in range(count):
        r = await http.post(
            f"{gw.url}/v1/publish",
            json={"room": room, "event": "blob", "data": {"i": i, "b": blob}},
        )
        assert r.status_code == 202, r.text


async def test_slow_consumer_is_closed_1013_and_others_get_everything(gateway_env):
    env = {**gateway_env, "QUEUE_MAX_MESSAGES": "50", "QUEUE_MAX_BYTES": "1000000"}
    room = "slow"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as http:
        stalled = RawWebSocket(gw.port)
        try:
            stalled.send_json({"type": "subscribe", "room": room})
            async with WSClient.connect(gw.ws_url) as fast:
                await fast.subscribe(room)
                await eventually(lambda: _subs(gw, 2), timeout=5)
                reading = asyncio.create_task(fast.messages(room, 5, timeout=60))
                await _flood(http, gw, room, 200)
                for i in range(5):
                    assert (await post(http, gw.url, room, f"after {i}")).status_code == 201
                assert await reading == [1, 2, 3, 4, 5]
                events = [f["data"]["i"] for f in fast.frames if f.get("type") == "event"]
                assert events == list(range(200))
            assert stalled.closed_by_server(timeout=10)
            assert await metric(gw.url, "chat_slow_consumer_disconnects_total", transport="ws") == 1
            await eventually(lambda: _subs_zero(gw), timeout=10)
            assert await metric(gw.url, "chat_connections", transport="ws") == 0
        finally:
            stalled.close()


async def _subs(gw: Instance, n: int) -> bool:
    return await metric(gw.url, "chat_subscriptions") == n


async def _subs_zero(gw: Instance) -> bool:
    return await _subs(gw, 0)


async def test_slow_sse_consumer_stream_is_ended_and_resumes(gateway_env):
    env = {**gateway_env, "QUEUE_MAX_MESSAGES": "10", "QUEUE_MAX_BYTES": "100000"}
    room = "slowsse"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as http:
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(f"GET /v1/rooms/{room}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            await eventually(lambda: _subs_one(gw), timeout=5)
            await _flood(http, gw, room, 200)
            for i in range(200):
                assert (await post(http, gw.url, room, f"m{i}")).status_code == 201
            await eventually(lambda: _subs_zero(gw), timeout=15)
            assert await metric(gw.url, "chat_slow_consumer_disconnects_total") >= 1
        finally:
            sock.close()
        # it resumes with Last-Event-ID and gets the rest in order
        async with SSEClient.open(
            f"{gw.url}/v1/rooms/{room}/events", headers={"Last-Event-ID": "150"}
        ) as sse:
            assert await sse.wait_for(50) == list(range(151, 201))


async def _subs_one(gw: Instance) -> bool:
    return await _subs(gw, 1)


async def test_sse_sends_ping_comments(gateway_env):
    env = {**gateway_env, "SSE_PING": "0.2"}
    async with instances(1, env) as (gw,):
        async with SSEClient.open(f"{gw.url}/v1/rooms/pings/events") as sse:
            await eventually(lambda: sse.comments >= 3, timeout=5)


async def test_dead_websocket_peer_is_dropped_and_its_subscription_released(gateway_env):
    env = {**gateway_env, "WS_PING_INTERVAL": "0.3", "WS_PING_TIMEOUT": "0.3"}
    async with instances(1, env) as (gw,):
        dead = RawWebSocket(gw.port)
        try:
            dead.send_json({"type": "subscribe", "room": "ghost"})
            await eventually(lambda: _subs_one(gw), timeout=5)
            # it never reads, so never answers a ping
            await eventually(lambda: _subs_zero(gw), timeout=t(10))
            assert await metric(gw.url, "chat_connections", transport="ws") == 0
        finally:
            dead.close()


async def test_silent_redis_link_is_detected_and_delivery_resumes(gateway_env):
    """The link to Redis goes silent (no RST, no data): the probe notices, the
    instance reconnects once Redis answers again, and fills what it missed."""
    rs = RedisServer()
    rs.start()
    proxy = await TCPProxy("127.0.0.1", rs.port).start()
    env_proxied = {
        **gateway_env,
        "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
        "BROKER_PROBE_INTERVAL": "0.5",
    }
    env_direct = {**gateway_env, "REDIS_URL": rs.url}
    room = "silent"
    try:
        async with (
            instances(1, env_proxied) as (a,),
            instances(1, env_direct) as (b,),
            httpx.AsyncClient(timeout=60) as http,
            WSClient.connect(a.ws_url) as ws,
        ):
            await ws.subscribe(room)
            await _post_all(http, [b], room, 5)
            assert await ws.messages(room, 5) == [1, 2, 3, 4, 5]
            proxy.hold()
            await _post_all(http, [b], room, 5, start=5)  # published while A hears nothing
            await eventually(lambda: _not_ready(a), timeout=20)
            # The probe noticed (readiness may fail first on a ping's own timeout).
            await eventually(
                lambda: "broker links lost" in Path(a.log_path).read_text(), timeout=20
            )
            proxy.restore()
            await eventually(lambda: all_ready(http, [a]), timeout=20)
            await _post_all(http, [b], room, 5, start=10)
            assert await ws.messages(room, 15, timeout=20) == list(range(1, 16))
            assert await metric(a.url, "chat_broker_reconnects_total") >= 1
    finally:
        await proxy.close()
        rs.stop()


async def _not_ready(inst: Instance) -> bool:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(inst.url + "/readyz")).status_code == 503


async def test_posts_never_hang_while_redis_is_silent_and_delivery_continues(gateway_env):
    rs = RedisServer()
    rs.start()
    proxy = await TCPProxy("127.0.0.1", rs.port).start()
    env = {
        **gateway_env,
        "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
        "BROKER_PROBE_INTERVAL": "0.5",
    }
    room = "frozen"
    try:
        async with (
            instances(2, env) as gws,
            httpx.AsyncClient(timeout=t(15)) as http,
            WSClient.connect(gws[0].ws_url) as ws0,
            WSClient.connect(gws[1].ws_url) as ws1,
        ):
            for ws in (ws0, ws1):
                await ws.subscribe(room)
            await _post_all(http, gws, room, 4)
            proxy.hold()
            # each post is committed and acknowledged (the client's timeout would fail
            # the test if one hung), and subscribers get them from the store
            await _post_all(http, gws, room, 6, start=4)
            for ws in (ws0, ws1):
                assert await ws.messages(room, 10, timeout=20) == list(range(1, 11))
            page = (await http.get(f"{gws[1].url}/v1/rooms/{room}/messages")).json()
            assert [m["seq"] for m in page["messages"]] == list(range(1, 11))
            proxy.restore()
            await eventually(lambda: all_ready(http, gws), timeout=20)
            await _post_all(http, gws, room, 4, start=10)
            for ws in (ws0, ws1):
                assert await ws.messages(room, 14, timeout=20) == list(range(1, 15))
            page = (await http.get(f"{gws[0].url}/v1/rooms/{room}/messages")).json()
            assert [m["seq"] for m in page["messages"]] == list(range(1, 15))
    finally:
        await proxy.close()
        rs.stop()

"""/metrics moves with real traffic on a real gateway process."""

from __future__ import annotations

import asyncio
import socket

import httpx

from tests.harness import SSEClient, WSClient, eventually, instances, post, t
from tests.metrics_text import sample


async def scrape(http: httpx.AsyncClient, base: str) -> str:
    r = await http.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_counters_follow_connections_messages_cache_and_rate_limits(gateway_env):
    env = {**gateway_env, "RATE_LIMIT": "3/60s"}
    room = "metered"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        before = await scrape(http, gw.url)
        assert sample(before, "chat_connections", transport="ws") == 0
        assert sample(before, "chat_messages_accepted_total", transport="http") == 0
        async with (WSClient.connect(gw.ws_url) as ws,
                    SSEClient.open(f"{gw.url}/v1/rooms/{room}/events") as sse):
            await ws.subscribe(room)
            text = await scrape(http, gw.url)
            assert sample(text, "chat_connections", transport="ws") == 1
            assert sample(text, "chat_connections", transport="sse") == 1
            assert sample(text, "chat_subscriptions") == 2

            for i in range(3):
                assert (await post(http, gw.url, room, f"m{i}")).status_code == 201
            refused = await post(http, gw.url, room, "one too many")
            assert refused.status_code == 429
            assert await ws.messages(room, 3) == [1, 2, 3]
            assert await sse.wait_for(3) == [1, 2, 3]
            for _ in range(2):
                assert (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).status_code == 200

            text = await scrape(http, gw.url)
            assert sample(text, "chat_messages_accepted_total", transport="http") == 3
            assert sample(text, "chat_messages_delivered_total") == 6
            assert sample(text, "chat_delivery_latency_seconds_count") == 3  # one per message
            assert sample(text, "chat_rate_limit_decisions_total",
                          action="post", decision="allowed") == 3
            assert sample(text, "chat_rate_limit_decisions_total",
                          action="post", decision="limited") == 1
            assert sample(text, "chat_history_cache_total", outcome="miss") >= 1
            assert sample(text, "chat_history_cache_total", outcome="hit") >= 1
            assert sample(text, "chat_db_pool_size") >= 1
            assert "chat_db_pool_in_use" in text
        # both clients gone: the gauges come back down
        await eventually(lambda: _gauges_zero(http, gw.url))


async def _gauges_zero(http: httpx.AsyncClient, base: str) -> bool:
    text = await scrape(http, base)
    return (sample(text, "chat_connections", transport="ws") == 0
            and sample(text, "chat_connections", transport="sse") == 0
            and sample(text, "chat_subscriptions") == 0)


async def test_a_client_that_stops_reading_is_counted_as_a_slow_disconnect(gateway_env):
    env = {**gateway_env, "QUEUE_MAX_BYTES": "65536", "QUEUE_MAX_MESSAGES": "4"}
    room = "slow"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        # A raw socket with a tiny receive buffer that never reads after subscribing.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        await loop.sock_sendall(sock, (
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(loop.sock_recv(sock, 4096), t(10))
        assert head.startswith(b"HTTP/1.1 101")
        payload = b'{"type":"subscribe","room":"slow"}'
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        await eventually(lambda: _subscribed(http, gw.url))
        try:
            blob = "x" * 60000
            for i in range(400):
                r = await http.post(f"{gw.url}/v1/publish",
                                    json={"room": room, "event": "blob", "data": {"b": blob}})
                assert r.status_code == 202
                if i % 10 == 9:
                    text = await scrape(http, gw.url)
                    if sample(text, "chat_slow_consumer_disconnects_total", transport="ws"):
                        break
            text = await scrape(http, gw.url)
            assert sample(text, "chat_slow_consumer_disconnects_total", transport="ws") == 1
            await eventually(lambda: _gauges_zero(http, gw.url))
        finally:
            sock.close()


async def _subscribed(http: httpx.AsyncClient, base: str) -> bool:
    return sample(await scrape(http, base), "chat_subscriptions") == 1

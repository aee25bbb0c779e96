"""Graceful shutdown of a real process on a real signal."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import httpx
import pytest
import websockets

from tests.harness import Instance, SSEClient, WSClient, eventually, new_prefix, post, t
from tests.proxy import tcp_proxy


async def test_sigterm_closes_sockets_1001_ends_sse_and_finishes_the_post_in_flight(pg_url):
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = Instance(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": "memory://",
                "KEY_PREFIX": new_prefix(),
                "LOG_LEVEL": "warning",
                "SHUTDOWN_TIMEOUT": "15",
            }
        ).start()
        try:
            await inst.wait_ready()
            async with (
                httpx.AsyncClient(timeout=30) as http,
                WSClient.connect(inst.ws_url) as ws,
                SSEClient.open(f"{inst.url}/v1/rooms/drain/events") as sse,
            ):
                await ws.subscribe("drain")
                # A first post reads the room's moderation state, so the next one's
                # only database work is its commit.
                assert (await post(http, inst.url, "drain", "first")).status_code == 201
                # Hold the database link so the post is in flight when the signal lands.
                proxy.hold()
                in_flight = asyncio.create_task(post(http, inst.url, "drain", "last words"))
                await eventually(lambda: proxy.waiting > 0)
                inst.signal(signal.SIGTERM)

                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await ws.recv(timeout=15)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
                await asyncio.wait_for(sse.ended.wait(), t(10))
                # no longer accepting
                with pytest.raises(httpx.TransportError):
                    await http.get(f"{inst.url}/healthz")
                assert not in_flight.done()

                proxy.restore()
                r = await in_flight
                assert r.status_code == 201, r.text
                code = await asyncio.to_thread(inst.proc.wait, t(15))
                assert code == 0, inst.log()
        finally:
            inst.stop()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE room = 'drain'") == 2
    finally:
        await conn.close()


async def test_shutdown_is_bounded_even_when_a_request_cannot_finish(pg_url):
    async with tcp_proxy(pg_url) as (proxy, db_url):
        # Without the bound the held post would wait a minute for the database.
        inst = Instance(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": "memory://",
                "LOG_LEVEL": "warning",
                "SHUTDOWN_TIMEOUT": "2",
                "DB_COMMAND_TIMEOUT": "60",
                "DB_CONNECT_TIMEOUT": "60",
            }
        ).start()
        try:
            await inst.wait_ready()
            async with httpx.AsyncClient(timeout=60) as http:
                proxy.hold()
                in_flight = asyncio.create_task(post(http, inst.url, "stuck", "never"))
                await eventually(lambda: proxy.waiting > 0)
                inst.signal(signal.SIGINT)
                code = await asyncio.to_thread(inst.proc.wait, t(20))
                assert code == 0, inst.log()
                r = await asyncio.gather(in_flight, return_exceptions=True)
                assert isinstance(r[0], httpx.TransportError) or r[0].status_code >= 500
        finally:
            proxy.restore()
            inst.stop()

"""The gateway's server writes fan-out frames straight to each socket (gateway.wsout);
these check that the frames and closes a client sees are still the contract's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from tests.harness import WSClient, instances, post, t


async def test_many_messages_arrive_as_separate_frames_in_order(gateway_env):
    # Several messages dispatched in one loop turn leave in one write; the client
    # must still read one JSON object per frame, in seq order.
    room = "direct.burst"
    async with instances(1, gateway_env) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws, httpx.AsyncClient() as http:
            await ws.subscribe(room)
            results = await asyncio.gather(*(post(http, gw.url, room, f"m{i}")
                                              for i in range(40)))
            assert all(r.status_code == 201 for r in results)
            seqs = [(await ws.expect("message"))["message"]["seq"] for _ in range(40)]
            assert seqs == list(range(1, 41))
            await ws.send({"type": "ping"})
            assert (await ws.expect("pong")) == {"type": "pong"}


async def test_shutdown_closes_direct_sockets_with_1001(gateway_env):
    async with instances(1, gateway_env) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws:
            await ws.subscribe("direct.shutdown")
            gw.signal(15)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.conn.recv(), t(10))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

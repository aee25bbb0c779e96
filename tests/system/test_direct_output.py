"""The gateway's server writes fan-out frames straight to each socket (chat_gateway.delivery.output,
its schedule tested alone in tests/unit/test_output.py); these check, on real gateway
processes, that the frames and closes a client sees are still the contract's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from tests.harness import WSClient, instances, post, t


@pytest.mark.parametrize("write_delay", ["0", "0.02"])
async def test_many_messages_arrive_as_separate_frames_in_order(gateway_env, write_delay):
    # Several messages dispatched in one loop turn (or within WS_WRITE_DELAY) leave
    # in one write; the client must still read one JSON object per frame, in order.
    room = "direct.burst"
    async with instances(1, {**gateway_env, "WS_WRITE_DELAY": write_delay}) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws, httpx.AsyncClient() as http:
            await ws.subscribe(room)
            results = await asyncio.gather(*(post(http, gw.url, room, f"m{i}") for i in range(40)))
            assert all(r.status_code == 201 for r in results)
            seqs = [(await ws.expect("message"))["message"]["seq"] for _ in range(40)]
            assert seqs == list(range(1, 41))
            await ws.send({"type": "ping"})
            assert (await ws.expect("pong")) == {"type": "pong"}


async def test_a_quiet_instance_sends_each_live_frame_at_once(gateway_env):
    # WS_WRITE_DELAY only bounds a hold on a busy instance: on a quiet one a live
    # message to a socket that was just written (the "subscribed" reply) leaves at
    # once, not up to 30 s later.
    room = "direct.quiet"
    async with instances(1, {**gateway_env, "WS_WRITE_DELAY": "30"}) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws, httpx.AsyncClient() as http:
            await ws.subscribe(room)
            for i in range(3):
                assert (await post(http, gw.url, room, f"m{i}")).status_code == 201
                frame = await ws.recv(timeout=5)
                assert frame["message"]["seq"] == i + 1


async def test_shutdown_closes_direct_sockets_with_1001(gateway_env):
    async with instances(1, gateway_env) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws:
            await ws.subscribe("direct.shutdown")
            gw.signal(15)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.conn.recv(), t(10))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_back_to_back_publishes_are_answered_in_frame_order(gateway_env):
    # Publishes that arrive while a commit runs are committed together; every
    # answer still follows the order of the frames, and seqs the order of publishes.
    room = "direct.pipeline"
    async with instances(1, gateway_env) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws:
            for i in range(30):
                text = "" if i == 7 else f"p{i}"  # frame 7 is invalid (empty text)
                await ws.send(
                    {"type": "publish", "room": room, "text": text, "ref": i, "author": "ana"}
                )
            await ws.send({"type": "ping"})
            answers = [await ws.recv() for _ in range(31)]
            assert [a.get("ref") for a in answers[:30]] == list(range(30))
            assert answers[7]["type"] == "error" and answers[7]["code"] == "invalid_request"
            acks = [a for a in answers[:30] if a["type"] == "ack"]
            assert [a["message"]["seq"] for a in acks] == list(range(1, 30))
            assert [a["message"]["text"] for a in acks] == [f"p{i}" for i in range(30) if i != 7]
            assert answers[30] == {"type": "pong"}
            await ws.subscribe(room)
            async with httpx.AsyncClient() as http:
                page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages?limit=200")).json()
            assert [m["seq"] for m in page["messages"]] == list(range(1, 30))

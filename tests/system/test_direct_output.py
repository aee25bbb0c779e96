"""The gateway's server writes fan-out frames straight to each socket (chat_gateway.delivery.output);
these check that the frames and closes a client sees are still the contract's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from chat_gateway.delivery.output import FrameSink, Output
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


class Recorder:
    """A socket's writes as the sink makes them: one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(data)
        return 0

    def frames(self) -> list[list[bytes]]:
        """Each write's frames (unmasked text frames of under 126 bytes)."""
        out = []
        for data in self.writes:
            frames, i = [], 0
            while i < len(data):
                assert data[i] == 0x81 and data[i + 1] < 126
                frames.append(data[i + 2 : i + 2 + data[i + 1]])
                i += 2 + data[i + 1]
            out.append(frames)
        return out


async def never_drained() -> None:
    raise AssertionError("not awaited here")


def sink(output: Output) -> tuple[FrameSink, Recorder]:
    rec = Recorder()
    return FrameSink(rec.write, never_drained, output), rec


async def settle(seconds: float = 0.0) -> None:
    await asyncio.sleep(seconds)
    await asyncio.sleep(0)


async def test_output_quiet_instance_writes_each_frame_at_the_end_of_the_turn():
    output = Output(0.05)
    a, rec = sink(output)
    for i in range(5):
        a.write(b"m%d" % i)
        await settle()
    assert not output.holding
    assert rec.frames() == [[b"m%d" % i] for i in range(5)]


async def test_output_frames_of_one_turn_leave_in_one_write():
    output = Output(0.05)
    a, rec = sink(output)
    for i in range(3):
        a.write(b"m%d" % i)
    await settle()
    assert rec.frames() == [[b"m0", b"m1", b"m2"]]


async def test_output_busy_instance_holds_a_busy_socket_and_not_a_quiet_one():
    # Above hold_rate frames a second the instance holds: a socket written moments
    # ago gets its next frames together at the hold timer, a socket not written
    # lately still gets its frame at once, and a reply takes held frames with it.
    output = Output(0.2, hold_rate=10.0)
    busy, busy_rec = sink(output)
    quiet, quiet_rec = sink(output)
    for i in range(30):  # well above 10 frames a second for a whole measure
        busy.write(b"b%d" % i)
        await settle(0.04)
    assert output.holding
    busy_rec.writes.clear()
    busy.write(b"x1")
    busy.write(b"x2")
    quiet.write(b"q1")
    await settle()
    assert quiet_rec.frames() == [[b"q1"]]  # at once
    assert busy_rec.writes == []  # held
    busy.write(b"x3")
    await settle(0.3)
    assert busy_rec.frames() == [[b"x1", b"x2", b"x3"]]  # together, at the timer
    busy.write(b"y1")
    await settle()
    assert busy_rec.frames()[1:] == []  # held again: written moments ago
    busy.write(b"pong", hold=False)
    await settle()
    assert busy_rec.frames()[1:] == [[b"y1", b"pong"]]  # the reply takes it along


async def test_output_stops_holding_when_the_rate_falls():
    output = Output(0.2, hold_rate=10.0)
    a, rec = sink(output)
    for i in range(30):
        a.write(b"b%d" % i)
        await settle(0.04)
    assert output.holding
    await settle(1.1)  # a quiet second
    rec.writes.clear()
    a.write(b"q1")
    await settle()
    a.write(b"q2")
    await settle()
    assert not output.holding
    assert rec.frames() == [[b"q1"], [b"q2"]]


def test_output_builds_each_message_frame_once():
    output = Output()
    payload = b'{"type":"message"}'
    frame = output.frame(payload)
    assert frame == b"\x81" + bytes([len(payload)]) + payload
    assert output.frame(payload) is frame  # the same object for the next subscriber
    big = b"x" * 70000
    assert output.frame(big)[:10] == b"\x81\x7f" + (70000).to_bytes(8, "big")


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

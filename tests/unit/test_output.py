"""The server's schedule of socket writes (chat_gateway.delivery.output), on sinks that
record their writes: frames of one turn in one write, a busy instance holding a busy
socket's frames to the hold timer and not a quiet one's, and each frame built once."""

from __future__ import annotations

import asyncio

from chat_gateway.delivery.output import FrameSink, Output
from tests.harness import t


class Recorder:
    """A socket's writes as the sink makes them: one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> int:
        self.writes.append(data)
        self.wrote.set()
        return 0

    async def written(self, last: bytes) -> None:
        """Wait until a write ends with the frame ``last``; woken by that write, so the
        test goes on in the next loop turn, however late the timer that wrote it ran."""
        while not (self.writes and self.frames()[-1][-1] == last):
            self.wrote.clear()
            await asyncio.wait_for(self.wrote.wait(), t(10))

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
    # The last frames were held: they leave at the hold timer, which a loaded machine
    # runs late, maybe after a fixed wait here. From that write on, the socket was
    # written moments ago.
    await busy_rec.written(b"b29")
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

"""Direct WebSocket output: a frame encoded once, written to each socket without a task.

uvicorn's ASGI ``send`` costs a task wake-up, an await, a frame object and a
write per socket per message. For the fan-out the server's frames are all
the same bytes (server frames are not masked), so :meth:`Output.frame` builds
a message's frame once and every subscriber's :class:`FrameSink` adds those
bytes to its socket's pending frames synchronously; frames pending for one
socket leave in one write.

When they leave is the server's :class:`Output`: at the end of the event-loop
turn, so a quiet instance sends each frame at once. A socket write costs a
system call (and a packet, and a wake-up of the reader) whatever it carries,
so an instance writing more than ``hold_rate`` frames a second (measured
over the last second) holds a socket's live frames while that socket was
written less than ``max_delay`` ago: a busy socket then gets several messages
per write, for at most ``max_delay`` of added latency, and a socket that was
not written moments ago still gets its frame at once. Replies never wait.

:class:`chat_gateway.server.uvicorn_internals.DirectProtocol`, the gateway's uvicorn protocol, offers
a socket's writer to the app as the ASGI extension ``EXTENSION``; under any other
server the session falls back to a writer task and ASGI sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.frames import Frame, Opcode

EXTENSION = "gateway.direct"

_IDLE, _NOW, _HELD = 0, 1, 2  # FrameSink._due: nothing waiting, end of turn, hold timer
# Frames a second an instance writes above which live frames to busy sockets are held.
HOLD_RATE = 8000.0
LOAD_WINDOW = 1.0  # seconds over which that rate is measured


class Output:
    """One server's schedule of socket writes: which sinks write at the end of this
    loop turn, which hold their frames until the hold timer, and the frame rate
    that decides between the two. Created by the server and handed to each sink."""

    __slots__ = ("max_delay", "hold_rate", "holding", "_now", "_held", "_memo", "_frames", "_since")

    def __init__(self, max_delay: float = 0.0, *, hold_rate: float = HOLD_RATE) -> None:
        # WS_WRITE_DELAY: the longest a live frame is held (0: never).
        self.max_delay = max_delay
        self.hold_rate = hold_rate
        # True while the instance writes more than ``hold_rate`` frames a second.
        self.holding = False
        self._now: list[FrameSink] = []  # sinks writing at the end of this turn
        self._held: list[FrameSink] = []  # sinks writing at the hold timer
        self._memo: tuple[bytes, bytes] = (b"", b"")
        self._frames = 0  # frames queued since ``_since``
        self._since = 0.0  # loop time of the last measure

    def frame(self, payload: bytes) -> bytes:
        """The unmasked, final text frame carrying ``payload``. One-entry memo: the
        fan-out hands the same payload object to every subscriber in turn, so the
        frame is built once per message."""
        memo = self._memo
        if memo[0] is payload:
            return memo[1]
        frame = Frame(Opcode.TEXT, payload).serialize(mask=False)
        self._memo = (payload, frame)
        return frame

    def schedule(self, sink: FrameSink, hold: bool) -> None:
        """``sink`` has frames to write: at the end of this turn, or, for a frame that
        may wait on a busy instance, with the held ones at the hold timer."""
        self._frames += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._since >= LOAD_WINDOW:
            self.measure(now)
        if hold and self.holding and (sink._due == _HELD or now - sink._written < self.max_delay):
            if sink._due != _HELD:
                if not self._held:
                    loop.call_later(self.max_delay, self._flush_held)
                self._held.append(sink)
                sink._due = _HELD
            return
        if not self._now:
            loop.call_soon(self._flush_now)
        self._now.append(sink)
        sink._due = _NOW

    def measure(self, now: float) -> None:
        """Hold from now on if more than ``hold_rate`` frames a second were queued
        since the last measure."""
        rate = self._frames / (now - self._since)
        self.holding = self.max_delay > 0 and rate > self.hold_rate
        self._frames = 0
        self._since = now

    def _flush_now(self) -> None:
        self._flush(self._now)

    def _flush_held(self) -> None:
        self._flush(self._held)

    def _flush(self, sinks: list[FrameSink]) -> None:
        """Write each sink's frames, one write per socket."""
        taken = sinks[:]
        sinks.clear()
        now = asyncio.get_running_loop().time()
        for sink in taken:
            sink.flush(now)


class FrameSink:
    """A subscriber's direct output: JSON payloads in, frames out as its
    :class:`Output` schedules them."""

    __slots__ = (
        "_write",
        "_drained",
        "_output",
        "_frames",
        "_size",
        "_buffered",
        "_written",
        "_due",
        "on_close",
    )

    def __init__(
        self, write: Callable[[bytes], int], drained: Callable[[], Any], output: Output
    ) -> None:
        self._write = write
        self._drained = drained
        self._output = output
        self._frames: list[bytes] = []
        self._size = 0
        self._buffered = 0
        self._written = -1e9  # loop time of the last write
        self._due = _IDLE  # when the frames waiting here leave
        # Called once when the subscriber is closed (the session stops reading).
        self.on_close: Callable[[], Any] | None = None

    @classmethod
    def of(cls, scope: Any, output: Output) -> FrameSink | None:
        direct = scope.get("extensions", {}).get(EXTENSION)
        return None if direct is None else cls(direct["write"], direct["drained"], output)

    def write(self, payload: bytes, *, hold: bool = True) -> int:
        """Queue ``payload`` as a text frame; the bytes pending for this socket, or -1.

        The frame leaves as the output schedules it: at the end of this loop turn,
        or, for a ``hold`` frame on a busy instance to a socket written moments
        ago, with the next ones at the hold timer. A frame that may not wait
        takes the held ones with it.
        """
        if self._buffered < 0:
            return -1
        frame = self._output.frame(payload)
        if self._due != _NOW:
            self._output.schedule(self, hold)
        self._frames.append(frame)
        self._size += len(frame)
        return self._buffered + self._size

    def flush(self, now: float | None = None) -> None:
        """Write the pending frames in one write (``now``: the loop time, if known)."""
        frames = self._frames
        self._due = _IDLE
        if not frames or self._buffered < 0:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._frames = []
        self._size = 0
        self._buffered = self._write(data)
        self._written = asyncio.get_running_loop().time() if now is None else now

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def drained(self) -> None:
        """Wait until the socket's buffer is below its high-water mark."""
        self.flush()
        await self._drained()

"""Direct WebSocket output: a frame encoded once, written to each socket without a task.

uvicorn's ASGI ``send`` costs a task wake-up, an await, a frame object and a
write per socket per message. For the fan-out the server's frames are all
the same bytes (server frames are not masked), so :func:`text_frame` builds
a message's frame once and every subscriber's :class:`FrameSink` writes those
bytes into its socket's buffer synchronously. Frames queued for one socket in
one turn of the event loop leave in one write.

:class:`gateway.uvicorn_internals.DirectProtocol`, the gateway's uvicorn protocol, offers
a socket's writer to the app as the ASGI extension ``EXTENSION``; under any other
server the session falls back to a writer task and ASGI sends.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

EXTENSION = "gateway.direct"

_last: tuple[bytes, bytes] = (b"", b"")
# Sinks with frames for the end of this loop turn, and sinks holding theirs until
# the hold timer (one event loop per server process).
_dirty: list[FrameSink] = []
_held: list[FrameSink] = []
_IDLE, _NOW, _HELD = 0, 1, 2  # FrameSink._due: nothing waiting, end of turn, hold timer
# WS_WRITE_DELAY: a socket written less than this long ago holds its next frames
# until the hold timer (at most this long), so that they leave in one write.
write_delay = 0.0


def text_frame(payload: bytes) -> bytes:
    """The unmasked, final text frame carrying ``payload`` (one-entry memo: the
    fan-out hands the same payload object to every subscriber in turn)."""
    global _last
    if _last[0] is payload:
        return _last[1]
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    frame = head + payload
    _last = (payload, frame)
    return frame


class FrameSink:
    """A subscriber's direct output: JSON payloads in, frames out once per loop turn."""

    __slots__ = (
        "_write",
        "_drained",
        "_frames",
        "_size",
        "_buffered",
        "_written",
        "_due",
        "on_close",
    )

    def __init__(self, write: Callable[[bytes], int], drained: Callable[[], Any]) -> None:
        self._write = write
        self._drained = drained
        self._frames: list[bytes] = []
        self._size = 0
        self._buffered = 0
        self._written = -1e9  # loop time of the last write
        self._due = _IDLE  # when the frames waiting here leave
        # Called once when the subscriber is closed (the session stops reading).
        self.on_close: Callable[[], Any] | None = None

    @classmethod
    def of(cls, scope: Any) -> FrameSink | None:
        direct = scope.get("extensions", {}).get(EXTENSION)
        return None if direct is None else cls(direct["write"], direct["drained"])

    def write(self, payload: bytes, *, hold: bool = True) -> int:
        """Queue ``payload`` as a text frame; the bytes pending for this socket, or -1.

        Frames leave at the end of this loop turn, except that a socket written
        less than ``write_delay`` ago holds ``hold`` frames until the hold timer
        (Nagle's rule): a busy socket gets several messages per write, a quiet one
        gets each at once. A frame that may not wait takes the held ones with it.
        """
        if self._buffered < 0:
            return -1
        frame = text_frame(payload)
        if self._due != _NOW:
            loop = asyncio.get_running_loop()
            if (
                hold
                and write_delay > 0
                and (self._due == _HELD or loop.time() - self._written < write_delay)
            ):
                if self._due != _HELD:
                    if not _held:
                        loop.call_later(write_delay, _flush_held)
                    _held.append(self)
                    self._due = _HELD
            else:
                if not _dirty:
                    loop.call_soon(_flush_dirty)
                _dirty.append(self)
                self._due = _NOW
        self._frames.append(frame)
        self._size += len(frame)
        return self._buffered + self._size

    def flush(self) -> None:
        frames = self._frames
        self._due = _IDLE
        if not frames or self._buffered < 0:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._frames = []
        self._size = 0
        self._buffered = self._write(data)
        if write_delay > 0:
            self._written = asyncio.get_running_loop().time()

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def drained(self) -> None:
        """Wait until the socket's buffer is below its high-water mark."""
        self.flush()
        await self._drained()


def _flush(sinks: list[FrameSink]) -> None:
    """Write each sink's frames, one write per socket."""
    taken = sinks[:]
    sinks.clear()
    for sink in taken:
        sink.flush()


def _flush_dirty() -> None:
    _flush(_dirty)


def _flush_held() -> None:
    _flush(_held)

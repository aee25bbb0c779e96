"""A client process holding its share of a state room's subscribers.

``python -m bench.state_subscribers CONFIG`` (JSON: transport ``sse`` or ``ws``,
ports, room, indexes, conflate (one ``conflate_ms`` per index, ``null``: none
asked), total, spread_s, quiet_s, out). It says ``up``; on ``connect T`` it opens
subscriber ``i`` at ``T + spread_s * i / total`` (``T`` and every time here a
``perf_counter``: the machine's monotonic clock, the same in every process),
each on ``ports[i % len(ports)]``, subscribes without ``since`` and applies its
snapshot then its frames. Once all have their snapshot (or a minute passed) it
says ``ready``; from ``mark`` (if it comes) it counts its own CPU; on ``stop`` it writes, per
subscriber, the frames received, the frames older than the key's last (must be
0), when it connected, got its snapshot and its last frame, and a digest of the
values it holds (compared to the store's by the caller), then says ``done``;
before that it waits until none of its subscribers got a frame for ``quiet_s``.

The SSE client is a bare asyncio Protocol (as :mod:`bench.wsclient`): one
request, the chunked body undone, events cut at blank lines and read with one
regular expression per chunk (``id:``, ``event:``, ``data:`` and a state
event's key); a ``state`` event's data is kept as bytes and decoded once at the
end.
A thousand streams each flushed ten times a second leave a Python client little
room: the cheaper the parse, the more of what is measured is the gateway (read
off one chunked stream, this Protocol and asyncio streams cost the same per
frame; httpx's streaming about 0.4 µs more, over half as much again).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from typing import Any

import orjson

from bench.clientproc import finish, run, say
from bench.wsclient import WSClient

# One event: optional ``id:``, ``event:``, one ``data:`` line (the gateway's form,
# chat_gateway.core.frames.sse_event). Comments (``: ping``) match nothing.
# The key of a state event is read by the same expression (the gateway's data
# starts ``{"room":…,"seq":N,"key":"k"``, chat_gateway.core.frames.state_frame).
_EVENT = re.compile(
    rb'(?:id: (\d+)\n)?event: (\w+)\ndata: ((?:\{"room":"[^"]*","seq":\d+,"key":"([^"]*)")?'
    rb"[^\n]*)\n\n"
)


def digest(values: dict[str, Any]) -> str:
    """The same for equal values whatever their keys' order: subscriber and store
    are compared by it."""
    return hashlib.sha1(orjson.dumps(values, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Holder:
    """One subscriber's view of the room: its snapshot, then its frames, in order.

    ``raw`` keeps each key's newest frame undecoded (an SSE ``data`` or a WS
    frame); :meth:`values` decodes them once, when asked."""

    def __init__(self) -> None:
        self.base: dict[str, Any] = {}
        self.seqs: dict[bytes, int] = {}  # keys as bytes: as read off the wire
        self.raw: dict[bytes, bytes] = {}
        self.frames = 0
        self.older = 0  # a frame older than (or as old as) the key's last: must stay 0
        self.last_frame = 0.0
        self.connect_at = 0.0
        self.snapshot_at: float | None = None
        self.closed = False

    def snapshot(self, data: bytes) -> None:
        values = orjson.loads(data)["values"]
        self.base = {k: v["value"] for k, v in values.items()}
        self.seqs = {k.encode(): v["seq"] for k, v in values.items()}
        self.raw.clear()
        self.snapshot_at = time.perf_counter()

    def state(self, seq: int, key: bytes, data: bytes) -> None:
        if seq <= self.seqs.get(key, 0):
            self.older += 1
        self.seqs[key] = seq
        self.raw[key] = data
        self.frames += 1
        self.last_frame = time.perf_counter()

    def values(self) -> dict[str, Any]:
        out = dict(self.base)
        for key, data in self.raw.items():
            frame = orjson.loads(data)
            if frame.get("deleted"):
                out.pop(key.decode(), None)
            else:
                out[key.decode()] = frame["value"]
        return out

    def on_events(self, events: list[tuple[bytes, bytes, bytes, bytes]]) -> None:
        """SSE events as :func:`parse_events` gives them."""
        seqs, raw, older, frames = self.seqs, self.raw, 0, 0
        for event_id, name, data, key in events:
            if name == b"state":
                seq = int(event_id)
                if seq <= seqs.get(key, 0):
                    older += 1
                seqs[key] = seq
                raw[key] = data
                frames += 1
            elif name == b"snapshot":
                self.snapshot(data)
                seqs, raw = self.seqs, self.raw
        if frames:
            self.older += older
            self.frames += frames
            self.last_frame = time.perf_counter()

    def on_ws_frame(self, _client: WSClient, data: bytes) -> None:
        if data.startswith(b'{"type":"state"'):
            start = data.index(b'"seq":') + 6
            seq = int(data[start : data.index(b",", start)])
            start = data.index(b'"key":"', start) + 7
            self.state(seq, data[start : data.index(b'"', start)], data)
        elif data.startswith(b'{"type":"snapshot"'):
            self.snapshot(data)


def parse_events(buf: bytes) -> tuple[list[tuple[bytes, bytes, bytes, bytes]], bytes]:
    """The complete events at the head of ``buf`` (``(id, event, data, key)``, id
    ``b""`` when absent, key ``b""`` but in a state event) and what is left of it
    (an event still arriving)."""
    end = buf.rfind(b"\n\n")
    if end < 0:
        return [], buf
    return _EVENT.findall(buf, 0, end + 2), buf[end + 2 :]


class SSEClient(asyncio.Protocol):
    """One ``GET /v1/rooms/{room}/events`` stream over HTTP/1.1, chunked or not."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = bytearray()
        self._open = False
        self._chunked = False
        self._raw = b""  # chunked bytes not yet undone
        self._body = b""  # event bytes not yet parsed

    @classmethod
    async def connect(cls, port: int, path: str, holder: Holder, timeout: float = 60) -> SSEClient:
        loop = asyncio.get_running_loop()
        client = cls(holder)
        await asyncio.wait_for(loop.create_connection(lambda: client, "127.0.0.1", port), timeout)
        assert client.transport is not None
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.holder.closed = True
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._open:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._head[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                assert self.transport is not None
                self.transport.close()
                return
            self._open = True
            self._chunked = b"transfer-encoding: chunked" in head
            data = bytes(self._head[end + 4 :])
            self._head.clear()
        if self._chunked:
            data = self._unchunk(data)
        events, self._body = parse_events(self._body + data)
        if events:
            self.holder.on_events(events)

    def _unchunk(self, data: bytes) -> bytes:
        raw = self._raw + data
        out: list[bytes] = []
        pos = 0
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
            if len(raw) < eol + 2 + size + 2:
                break
            out.append(raw[eol + 2 : eol + 2 + size])
            pos = eol + 2 + size + 2
        self._raw = raw[pos:]
        return b"".join(out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_one(
    transport: str, port: int, room: str, conflate_ms: int | None, holder: Holder
) -> SSEClient | WSClient:
    """One subscriber to ``room`` without ``since``: a snapshot, then live frames."""
    holder.connect_at = time.perf_counter()
    if transport == "sse":
        query = "" if conflate_ms is None else f"?conflate_ms={conflate_ms}"
        return await SSEClient.connect(port, f"/v1/rooms/{room}/events{query}", holder)
    ws = await WSClient.connect("127.0.0.1", port, "/v1/ws", holder.on_ws_frame, 60)
    frame: dict[str, Any] = {"type": "subscribe", "room": room}
    if conflate_ms is not None:
        frame["conflate_ms"] = conflate_ms
    ws.send_text(orjson.dumps(frame))
    ws.closed.add_done_callback(lambda _f: setattr(holder, "closed", True))
    return ws


async def main(cfg: dict[str, Any]) -> None:
    ports: list[int] = cfg["ports"]
    indexes: list[int] = cfg["indexes"]
    holders = [Holder() for _ in indexes]
    clients: list[SSEClient | WSClient] = []
    failed = 0
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    say("up")
    line = (await stdin.readline()).split()
    assert line[0] == b"connect"
    start = float(line[1])
    gate = asyncio.Semaphore(50)

    async def one(i: int, conflate_ms: int | None, holder: Holder) -> None:
        nonlocal failed
        await asyncio.sleep(
            max(0.0, start + cfg["spread_s"] * i / cfg["total"] - time.perf_counter())
        )
        async with gate:
            try:
                clients.append(
                    await open_one(
                        cfg["transport"], ports[i % len(ports)], cfg["room"], conflate_ms, holder
                    )
                )
            except (OSError, TimeoutError):
                failed += 1
                holder.closed = True

    await asyncio.gather(
        *(one(i, c, h) for i, c, h in zip(indexes, cfg["conflate"], holders, strict=True))
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        h.snapshot_at is None and not h.closed for h in holders
    ):
        await asyncio.sleep(0.02)
    say("ready")
    cpu0, t0 = time.process_time(), time.perf_counter()
    line = (await stdin.readline()).strip()
    if line == b"mark":  # else straight to stop: nothing to count
        cpu0, t0 = time.process_time(), time.perf_counter()
        line = (await stdin.readline()).strip()
    assert line == b"stop"
    # A busy process may still be reading what came before: it stops once no frame
    # came for quiet_s (a minute at most), so its last frames are counted as late
    # as they were read.
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and time.perf_counter() - max(
        (h.last_frame for h in holders), default=0.0
    ) < cfg.get("quiet_s", 0.0):
        await asyncio.sleep(0.05)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    result = {
        "connect_failed": failed,
        "cpu_s": cpu,
        "wall_s": wall,
        "subscribers": [
            {
                "conflate_ms": c,
                "frames": h.frames,
                "older": h.older,
                "closed": h.closed,
                "connect_at": h.connect_at,
                "snapshot_at": h.snapshot_at,
                "last_frame": h.last_frame,
                "digest": digest(h.values()) if h.snapshot_at is not None else None,
            }
            for c, h in zip(cfg["conflate"], holders, strict=True)
        ],
    }
    await finish(cfg["out"], result, clients, 0.2)


if __name__ == "__main__":
    run(main)

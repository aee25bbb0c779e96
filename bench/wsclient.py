"""A minimal WebSocket client on an asyncio Protocol, the same for every server.

It speaks just enough of RFC 6455 to drive a benchmark cheaply: no extensions
(no permessage-deflate offered), masked frames with a zero key, whole text
frames, pongs to pings. A cheap client leaves more of the shared CPU to the
servers being measured.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable

OnFrame = Callable[["WSClient", bytes], None]
_ZERO_MASK = b"\x00\x00\x00\x00"


class WSClient(asyncio.Protocol):
    def __init__(self, on_frame: OnFrame | None = None) -> None:
        self.on_frame = on_frame or (lambda _c, _d: None)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._open = False
        self._frag = bytearray()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        on_frame: OnFrame | None = None,
        timeout: float = 30.0,
        local_addr: tuple[str, int] | None = None,
    ) -> WSClient:
        """``local_addr``: the source address to connect from (a loopback address
        other than 127.0.0.1 gives another 28,000 ephemeral ports to the same server)."""
        loop = asyncio.get_running_loop()
        client = cls(on_frame)
        await asyncio.wait_for(
            loop.create_connection(lambda: client, host, port, local_addr=local_addr), timeout
        )
        key = base64.b64encode(os.urandom(16)).decode()
        assert client.transport is not None
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await asyncio.wait_for(asyncio.shield(client.ready), timeout)
        return client

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if self._open and not buf and len(data) >= 2 and data[1] < 126 and len(data) == 2 + data[1]:
            self._frame(data[0], data[2:])  # the common case: exactly one small frame
            return
        buf += data
        if not self._open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status:
                self.ready.set_exception(ConnectionError(f"upgrade refused: {status!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self._open = True
            self.ready.set_result(None)
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self._frame(b0, payload)
        if pos:
            del buf[:pos]

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode in (1, 2, 0):
            if not fin:
                self._frag += payload
                return
            if self._frag:
                payload = bytes(self._frag) + payload
                self._frag.clear()
            self.on_frame(self, payload)
        elif opcode == 9:
            self._send(0xA, payload)
        elif opcode == 8:
            if self.transport is not None and not self.transport.is_closing():
                self._send(0x8, payload[:2])
                self.transport.close()

    # -- sending -----------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        # A zero mask key leaves the payload as it is: valid framing, no per-byte work.
        assert self.transport is not None
        self.transport.write(head + _ZERO_MASK + payload)

    def send_text(self, text: str | bytes) -> None:
        self._send(0x1, text.encode() if isinstance(text, str) else text)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, struct.pack("!H", 1000))
            self.transport.close()


class RESPClient(WSClient):
    """A raw Redis connection with the WebSocket client's interface, for measuring
    Redis itself as a fan-out server: ``send_text`` writes a command as given
    (already in the Redis protocol), and ``on_frame`` gets each pushed message's
    payload, the kind of any other push (``subscribe``), or a reply's line."""

    @classmethod
    async def connect(  # type: ignore[override]
        cls, host: str, port: int, on_frame: OnFrame | None = None, timeout: float = 30.0
    ) -> RESPClient:
        loop = asyncio.get_running_loop()
        client = cls(on_frame)
        await asyncio.wait_for(loop.create_connection(lambda: client, host, port), timeout)
        client._open = True
        client.ready.set_result(None)
        return client

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        while pos < n:
            parsed = self._parse(buf, pos, n)
            if parsed is None:
                break
            pos, payload = parsed
            self.on_frame(self, payload)
        if pos:
            del buf[:pos]

    @staticmethod
    def _parse(buf: bytearray, pos: int, n: int) -> tuple[int, bytes] | None:
        """One reply or push from ``pos``: (where the next starts, what to hand on),
        or None when it is not all here yet."""
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        if buf[pos] != 0x2A:  # not an array: a simple reply, an integer or an error
            return end + 2, bytes(buf[pos:end])
        items: list[bytes] = []
        count = int(buf[pos + 1 : end])
        pos = end + 2
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            if buf[pos] == 0x24:  # a bulk string
                length = int(buf[pos + 1 : end])
                if n < end + 2 + length + 2:
                    return None
                items.append(bytes(buf[end + 2 : end + 2 + length]))
                pos = end + 2 + length + 2
            else:
                items.append(bytes(buf[pos + 1 : end]))
                pos = end + 2
        if items and items[0] == b"message":
            return pos, items[-1]
        return pos, items[0] if items else b""

    def send_text(self, text: str | bytes) -> None:
        assert self.transport is not None
        self.transport.write(text.encode() if isinstance(text, str) else text)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

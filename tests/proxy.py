"""A TCP proxy a test controls: put it between a gateway and Postgres, then cut
the link (connections reset, new ones refused), hold it (bytes wait), or
restore it; hold only the server's replies once a client sent given bytes
(``hold_replies_after``: the statement reaches the server, its answer waits);
``sent`` keeps what the clients sent, from ``record()`` on. The
shared database server itself is never touched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TCPProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.waiting = 0  # chunks read while held, not yet forwarded
        self.up = True
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.replying = asyncio.Event()  # server -> client bytes flow (see hold_replies_after)
        self.replying.set()
        self._reply_marker: bytes | None = None
        self._server: asyncio.base_events.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.sent: bytearray | None = None  # client bytes since record(), None: not kept

    def record(self) -> None:
        """Keep every byte the clients send from now on, in ``sent``."""
        self.sent = bytearray()

    async def start(self) -> TCPProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until ``restore``."""
        self.up = False
        self.flowing.set()
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def hold(self) -> None:
        """Keep connections open but stop forwarding bytes until ``restore``."""
        self.flowing.clear()

    def hold_replies_after(self, marker: bytes) -> None:
        """Once a client sends bytes holding ``marker``, forward them but hold every
        reply from the server until ``restore``: what was sent is executed (and
        committed), its answer never comes."""
        self._reply_marker = marker

    def restore(self) -> None:
        self.up = True
        self._reply_marker = None
        self.flowing.set()
        self.replying.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._links.discard(w)
            w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool = False
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if upstream and self.sent is not None:
                self.sent += data
            if upstream and self._reply_marker is not None and self._reply_marker in data:
                self.replying.clear()
            if not self.flowing.is_set() or not (upstream or self.replying.is_set()):
                self.waiting += 1
                await self.flowing.wait()
                if not upstream:
                    await self.replying.wait()
                self.waiting -= 1
            if not self.up:
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


@contextlib.asynccontextmanager
async def tcp_proxy(url: str) -> AsyncIterator[tuple[TCPProxy, str]]:
    """A proxy in front of the database ``url``; yields it and the URL through it."""
    rest = url.split("://", 1)[1]
    creds, _, hostpart = rest.rpartition("@")
    hostport, _, dbname = hostpart.partition("/")
    host, _, port = hostport.partition(":")
    proxy = await TCPProxy(host, int(port or 5432)).start()
    scheme = url.split("://", 1)[0]
    proxied = f"{scheme}://{creds + '@' if creds else ''}127.0.0.1:{proxy.port}/{dbname}"
    try:
        yield proxy, proxied
    finally:
        await proxy.close()

"""The servers under comparison, each driven in its own protocol by the same client.

A target knows how to start N instances sharing one Redis, the WebSocket path
of a room, the handshake that subscribes a socket, and the frame that
publishes a text to a room.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.procs import (
    PEERS,
    REDIS_URL,
    Server,
    create_database,
    delete_prefix,
    drop_database,
    new_prefix,
    node_peer,
    peers_python,
)
from bench.wsclient import OnFrame, RESPClient, WSClient

GATEWAY_ENV = {
    "REDIS_URL": REDIS_URL,
    "RATE_LIMIT": "1000000/1s",
    "CONNECT_RATE_LIMIT": "1000000/1s",
    "PUBLISH_RATE_LIMIT": "1000000/1s",
    "SUBSCRIBE_RATE_LIMIT": "1000000/1s",
    "LOG_LEVEL": "warning",
    # Every bench socket comes from one address; the per-instance caps would refuse them.
    "MAX_CONNECTIONS": "0",
    "MAX_CONNECTIONS_PER_IDENTITY": "0",
}


class Target:
    name = ""
    key = ""  # its name in TARGETS (and on the command line)
    persists = False
    ready_path = "/"
    # A reference row (Redis itself), not a chat server a user would pick instead.
    reference = False

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.prefix = new_prefix()

    async def start(self, n: int, extra_env: dict[str, str] | None = None) -> list[Server]:
        self.servers = [self.make_server(i, extra_env or {}).start() for i in range(n)]
        try:
            await asyncio.gather(*(s.wait_ready(self.ready_path) for s in self.servers))
        except BaseException:
            await self.stop()
            raise
        return self.servers

    def make_server(self, i: int, extra_env: dict[str, str]) -> Server:
        raise NotImplementedError

    async def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers = []
        await delete_prefix(self.prefix)

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.servers)

    # -- protocol ----------------------------------------------------------

    async def open(
        self,
        host: str,
        port: int,
        room: str,
        on_frame: OnFrame,
        local_addr: tuple[str, int] | None = None,
    ) -> WSClient:
        """A client socket for ``room`` (not yet subscribed), from ``local_addr``."""
        return await WSClient.connect(
            host, port, self.ws_path(room), on_frame, local_addr=local_addr
        )

    def ws_path(self, room: str) -> str:
        raise NotImplementedError

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        raise NotImplementedError

    async def prepare_publisher(
        self, client: WSClient, control: asyncio.Queue[bytes], room: str
    ) -> None:
        """Make a fresh socket able to publish to ``room``: the peers' sockets
        finish their handshake by joining a room of their own."""
        await self.subscribe(client, control, room + "-publisher")

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        raise NotImplementedError

    def control(self, client: WSClient, payload: bytes) -> bool:
        """Answer protocol chatter (pings); True when the frame was consumed."""
        return False


async def expect(control: asyncio.Queue[bytes], prefix: bytes, timeout: float = 30) -> bytes:
    """The next control frame that starts with (or, for JSON, contains) ``prefix``."""
    while True:
        frame = await asyncio.wait_for(control.get(), timeout)
        if frame.startswith(prefix) or (frame[:1] == b"{" and prefix in frame):
            return frame


class Gateway(Target):
    name = "gateway"
    key = "gateway"
    persists = True
    ready_path = "/readyz"

    # Set by ``--tracing``: the OTEL_* variables every gateway of the run is given.
    tracing_env: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.database_url: str | None = None

    async def start(self, n: int, extra_env: dict[str, str] | None = None) -> list[Server]:
        self.database_url = await create_database()
        return await super().start(n, extra_env)

    def make_server(self, i: int, extra_env: dict[str, str]) -> Server:
        assert self.database_url is not None
        env = {
            **GATEWAY_ENV,
            "DATABASE_URL": self.database_url,
            "KEY_PREFIX": self.prefix,
            **self.tracing_env,
            **extra_env,
        }
        return Server(f"gateway{i}", [sys.executable, "-m", "chat_gateway", "serve"], env)

    async def stop(self) -> None:
        await super().stop()
        if self.database_url is not None:
            await drop_database(self.database_url)
            self.database_url = None

    def ws_path(self, room: str) -> str:
        return "/v1/ws"

    async def prepare_publisher(
        self, client: WSClient, control: asyncio.Queue[bytes], room: str
    ) -> None:
        pass  # a gateway socket publishes to a room without holding it

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        client.send_text(orjson.dumps({"type": "subscribe", "room": room}))
        await expect(control, b'"subscribed"')

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        return orjson.dumps(
            {"type": "publish", "room": room, "text": text, "author": "bench", "ref": i}
        )


class EphemeralGateway(Gateway):
    """The gateway with the room in an ephemeral namespace (``NAMESPACES_FILE``,
    ``kind = "ephemeral"``): the publisher sends WS ``emit`` frames, every subscriber
    gets the ``event`` frame, nothing is stored (``--kind ephemeral``)."""

    name = "gateway-ephemeral"
    key = "gateway-ephemeral"
    persists = False
    NAMESPACE = "live"

    def make_server(self, i: int, extra_env: dict[str, str]) -> Server:
        folder = Path(tempfile.mkdtemp(prefix="bench-namespaces-"))
        path = folder / "namespaces.toml"
        path.write_text(f'[namespaces.{self.NAMESPACE}]\nkind = "ephemeral"\npresence = false\n')
        return super().make_server(i, {"NAMESPACES_FILE": str(path), **extra_env})

    def room(self, room: str) -> str:
        return f"{self.NAMESPACE}:{room}"

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        await super().subscribe(client, control, self.room(room))

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        return orjson.dumps(
            {
                "type": "emit",
                "room": self.room(room),
                "event": "bench",
                "data": {"text": text},
                "ref": i,
            }
        )


class Peer(Target):
    """A peer server: ``bench/peers/<short>_server.py`` in the peers' own environment."""

    short = ""

    def make_server(self, i: int, extra_env: dict[str, str]) -> Server:
        env = {"REDIS_URL": REDIS_URL, "CHANNEL": self.prefix + self.short, **extra_env}
        return Server(
            f"{self.short}{i}",
            [peers_python(), str(PEERS / f"{self.short}_server.py"), "{port}"],
            env,
        )


class SocketIO(Peer):
    name = "python-socketio"
    key = "socketio"
    short = "socketio"
    ready_path = "/socket.io/?EIO=4&transport=polling"

    def ws_path(self, room: str) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        await expect(control, b"0{")  # Engine.IO open
        client.send_text(b"40")  # Socket.IO connect to "/"
        await expect(control, b"40")
        client.send_text(b'421["join",' + orjson.dumps(room) + b"]")
        await expect(control, b"431")  # the join's acknowledgement

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        return b'42["publish",' + orjson.dumps({"room": room, "text": text}) + b"]"

    def control(self, client: WSClient, payload: bytes) -> bool:
        if payload == b"2":  # Engine.IO ping: answer pong
            client.send_text(b"3")
            return True
        return False


class Broadcaster(Peer):
    name = "broadcaster"
    key = "broadcaster"
    short = "broadcaster"

    def ws_path(self, room: str) -> str:
        return f"/ws?room={room}"

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        await expect(control, b"ready")

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        return text.encode()


class NodeSocketIO(SocketIO):
    """Socket.IO 4.8 on Node with @socket.io/redis-adapter: ``bench/peers/node_socketio``,
    its packages pinned by the committed package-lock.json. The same Engine.IO 4 /
    Socket.IO 5 protocol as python-socketio, so the same handshake and frames."""

    name = "node-socketio"
    key = "node-socketio"

    def make_server(self, i: int, extra_env: dict[str, str]) -> Server:
        folder = node_peer()
        env = {"REDIS_URL": REDIS_URL, "CHANNEL": self.prefix + "node-socketio", **extra_env}
        return Server(f"node-socketio{i}", ["node", str(folder / "server.js"), "{port}"], env)


class RedisFanout(Target):
    """Redis itself as a fan-out server, for reference: its own redis-server (not
    the shared one), raw SUBSCRIBE clients, one client PUBLISHing at the rate.
    One server whatever the instances asked for; it delivers what it is given
    and persists nothing."""

    name = "redis"
    key = "redis"
    reference = True

    async def start(self, n: int, extra_env: dict[str, str] | None = None) -> list[Server]:
        argv = ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--client-output-buffer-limit", "pubsub", "0", "0", "0"]
        self.servers = [Server("redis0", argv, extra_env or {}).start()]
        try:
            await self._wait_ping(self.servers[0])
        except BaseException:
            await self.stop()
            raise
        return self.servers

    @staticmethod
    async def _wait_ping(server: Server, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"PING\r\n")
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                if line.startswith(b"+PONG"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{server.name} not ready after {timeout} s:\n{server.tail()}")

    async def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers = []

    async def open(
        self,
        host: str,
        port: int,
        room: str,
        on_frame: OnFrame,
        local_addr: tuple[str, int] | None = None,
    ) -> WSClient:
        return await RESPClient.connect(host, port, on_frame)

    def ws_path(self, room: str) -> str:
        return ""

    async def subscribe(self, client: WSClient, control: asyncio.Queue[bytes], room: str) -> None:
        client.send_text(resp(b"SUBSCRIBE", room.encode()))
        await expect(control, b"subscribe")

    async def prepare_publisher(
        self, client: WSClient, control: asyncio.Queue[bytes], room: str
    ) -> None:
        pass  # a subscribed RESP connection may not publish

    def publish_frame(self, room: str, text: str, i: int) -> bytes:
        return resp(b"PUBLISH", room.encode(), text.encode())


def resp(*args: bytes) -> bytes:
    """A command in the Redis protocol."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


TARGETS: dict[str, Any] = {
    t.key: t for t in (Gateway, EphemeralGateway, NodeSocketIO, SocketIO, Broadcaster, RedisFanout)
}

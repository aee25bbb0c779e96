"""The uvicorn seam (chat_gateway.server.uvicorn_internals): the uvicorn it is pinned to is the one
installed and has what the seam overrides and reads; and the app still delivers
under stock uvicorn, without the seam's protocols (ASGI sends and a writer task
per socket instead of direct writes)."""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from chat_gateway.config import Settings
from chat_gateway.gateway import Gateway
from chat_gateway.server import uvicorn_internals
from chat_gateway.server.app import create_app
from tests.harness import ROOT, WSClient, post, t


def test_installed_uvicorn_is_in_the_range_the_seam_is_tested_with() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (declared,) = [
        Requirement(d)
        for d in pyproject["project"]["dependencies"]
        if Requirement(d).name == "uvicorn"
    ]
    assert declared.specifier == SpecifierSet(uvicorn_internals.UVICORN_VERSIONS)
    assert importlib.metadata.version("uvicorn") in SpecifierSet(uvicorn_internals.UVICORN_VERSIONS)


async def test_the_seams_hooks_exist_in_the_installed_uvicorn() -> None:
    for cls, methods, state in (
        (WebSocketsSansIOProtocol, uvicorn_internals.WS_METHODS, uvicorn_internals.WS_STATE),
        (HttpToolsProtocol, uvicorn_internals.HTTP_METHODS, uvicorn_internals.HTTP_STATE),
    ):
        for name in methods:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
        protocol = cls(
            config=uvicorn.Config(create_app(Settings())),
            server_state=ServerState(),
            app_state={},
        )
        missing = [name for name in state if not hasattr(protocol, name)]
        assert not missing, f"{cls.__name__} instances lack {missing}"
    for name in uvicorn_internals.SERVER_METHODS:
        assert callable(getattr(uvicorn.Server, name, None)), f"Server.{name}"
    server = uvicorn.Server(uvicorn.Config(create_app(Settings())))
    missing = [name for name in uvicorn_internals.SERVER_STATE if not hasattr(server, name)]
    assert not missing, f"Server instances lack {missing}"
    assert {400, 408, 431} <= set(STATUS_LINE)
    # The seam's own protocols are uvicorn's, so uvicorn drives them as its own.
    assert issubclass(uvicorn_internals.DirectProtocol, WebSocketsSansIOProtocol)
    assert issubclass(uvicorn_internals.HttpProtocol, HttpToolsProtocol)
    assert issubclass(uvicorn_internals.Server, uvicorn.Server)


async def test_the_main_loop_ticks_whole_seconds_and_a_signal_ends_it_at_once() -> None:
    """The gateway's server ticks once a second (uvicorn's Date header refresh on every
    tick) and a stop signal wakes its loop at once: with a tick of an hour, the loop
    still ends right after the signal."""
    server = uvicorn_internals.Server(uvicorn.Config(create_app(Settings())))
    server.tick = 3600.0
    ticks: list[int] = []

    async def on_tick(counter: int) -> bool:
        ticks.append(counter)
        return server.should_exit

    server.on_tick = on_tick  # type: ignore[method-assign]
    loop = asyncio.create_task(server.main_loop())
    while not ticks:
        await asyncio.sleep(0)
    assert not loop.done()
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(loop, t(10))
    # Every tick is one uvicorn reads as a whole second (a multiple of its 10 a second).
    assert ticks == [0, 10]


@pytest.fixture
async def stock_server(tmp_path: Path) -> AsyncIterator[tuple[str, Gateway, uvicorn.Server]]:
    """The app under uvicorn as anyone would serve it: stock protocols, no seam."""
    async with serving(tmp_path, "websockets-sansio") as served:
        yield served


@pytest.fixture
async def seam_server(tmp_path: Path) -> AsyncIterator[tuple[str, Gateway, uvicorn.Server]]:
    """The app in this process under the seam's WebSocket protocol."""
    async with serving(tmp_path, uvicorn_internals.DirectProtocol) as served:
        yield served


@asynccontextmanager
async def serving(tmp_path: Path, ws: Any) -> AsyncIterator[tuple[str, Gateway, uvicorn.Server]]:
    settings = Settings.from_env(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path}/gw.db",
            "REDIS_URL": "memory://",
            "RATE_LIMIT": "100000/1s",
            "CONNECT_RATE_LIMIT": "100000/1s",
            "SUBSCRIBE_RATE_LIMIT": "100000/1s",
            "LOG_LEVEL": "warning",
        }
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws=ws,
        http="httptools",
        lifespan="on",
        log_config=None,
        # GatewayApp.__call__ returns its coroutine rather than being one, which
        # uvicorn's interface detection would take for ASGI 2.
        interface="asgi3",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(t(10)):
            while not server.started:
                assert not task.done(), "the server did not start"
                await asyncio.sleep(0.02)
        yield f"127.0.0.1:{port}", app.state.gateway, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, t(15))
        sock.close()


async def test_stock_uvicorn_delivers_in_order_over_asgi_sends(
    stock_server: tuple[str, Gateway, uvicorn.Server],
) -> None:
    address, gw, server = stock_server
    missing = [name for name in uvicorn_internals.SERVER_STARTED_STATE if not hasattr(server, name)]
    assert not missing, f"a started Server lacks {missing}"
    room = "stock.burst"
    async with WSClient.connect(f"ws://{address}/v1/ws") as ws, httpx.AsyncClient() as http:
        assert (await ws.subscribe(room))["seq"] == 0
        assert gw.hub is not None
        (sub,) = gw.hub.subscribers.values()
        assert sub.sink is None, "no direct output without the seam's protocol"
        results = await asyncio.gather(
            *(post(http, f"http://{address}", room, f"m{i}") for i in range(40))
        )
        assert all(r.status_code == 201 for r in results)
        frames = [await ws.expect("message") for _ in range(40)]
        assert [f["message"]["seq"] for f in frames] == list(range(1, 41))
        assert sorted(f["message"]["text"] for f in frames) == sorted(f"m{i}" for i in range(40))
        await ws.send({"type": "ping", "ref": 1})
        assert (await ws.expect("pong")) == {"type": "pong", "ref": 1}


async def test_an_open_socket_keeps_no_handshake_behind(
    seam_server: tuple[str, Gateway, uvicorn.Server],
) -> None:
    """After the accept, the seam's protocol holds neither the handshake's request
    (nor its headers, which websockets' parser keeps a reference to) nor the instance
    dict uvicorn's attributes grew; the socket works as before."""
    address, _, _ = seam_server
    filler = {"x-filler": "f" * 2000}
    async with WSClient.connect(f"ws://{address}/v1/ws", additional_headers=filler) as ws:
        assert (await ws.subscribe("seam.idle"))["seq"] == 0
        (protocol,) = [
            o
            for o in gc.get_objects()
            if type(o) is uvicorn_internals.DirectProtocol and o.handshake_complete
        ]
        assert protocol.request is None and protocol.response is None
        parser = protocol.conn.parser
        request = parser.gi_frame.f_locals["request"]  # type: ignore[attr-defined]
        assert len(request.headers) == 0, "the handshake's headers are still held"
        grown = uvicorn_internals.DirectProtocol(
            config=uvicorn.Config(create_app(Settings())), server_state=ServerState(), app_state={}
        )
        for name in protocol.__dict__.keys() - grown.__dict__.keys():
            setattr(grown, name, None)
        assert sys.getsizeof(protocol.__dict__) < sys.getsizeof(grown.__dict__) * 0.7
        await ws.send({"type": "ping", "ref": 2})
        assert (await ws.expect("pong")) == {"type": "pong", "ref": 2}

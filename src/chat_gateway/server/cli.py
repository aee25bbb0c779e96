"""``chat-gateway serve`` and ``chat-gateway migrate``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from typing import Any

import uvicorn

from chat_gateway import tracing
from chat_gateway.config import ConfigError, Settings
from chat_gateway.errors import CLOSE_GOING_AWAY
from chat_gateway.ops import logs, reports
from chat_gateway.server.uvicorn_internals import Server
from chat_gateway.storage import StoreUnavailable

log = logging.getLogger("gateway.cli")

GC_YOUNG_THRESHOLD = 20_000


class GatewayServer(Server):
    """uvicorn, with the gateway's own drain first and a bound on the whole.

    On SIGTERM/SIGINT: stop accepting, mark the gateway closing (new posts and
    connections get 503), close every WebSocket with 1001 (uvicorn would send
    1012) and end every SSE stream, then let uvicorn finish in-flight requests
    and run the lifespan shutdown (pools closed). All of it within
    ``SHUTDOWN_TIMEOUT`` seconds; past that, what is left is cancelled. The
    process then exits 0. (The hooks into uvicorn are gateway.uvicorn_internals's.)
    """

    database_url: str = ""  # named in the one line a store that cannot be opened gets
    log = log

    def startup_app(self, app: Any) -> Any:
        return StartupReport(app, self.database_url)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # What the process holds once it serves (modules, the app, the pools) lives
        # as long as it does: out of the collector's sight, every pass is shorter.
        gc.freeze()

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        gw = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if gw is not None:
            gw.closing = True
            if gw.hub is not None:
                gw.hub.close_subscribers(CLOSE_GOING_AWAY, "server shutdown: reconnect elsewhere")
            # Give writers a moment to send the close frames before uvicorn's own pass.
            while gw.hub and gw.hub.connections() and loop.time() < deadline - 1:
                await asyncio.sleep(0.02)


def cannot_start(database_url: str, exc: BaseException) -> str:
    """One line for an operator whose database cannot be opened: what and where
    (``StoreUnavailable`` names the target, without its password), then a hint."""
    if database_url.startswith("sqlite"):
        hint = (
            "DATABASE_URL must name a file in a directory this user may write, "
            "e.g. sqlite:////data/chat-gateway.db (four slashes for an absolute path)"
        )
    else:
        hint = (
            "check that Postgres runs and accepts connections there, that the database "
            "exists (createdb NAME) and the user and password are right; or unset "
            "DATABASE_URL for the embedded SQLite file"
        )
    return f"chat-gateway: {exc}. Hint: {hint}"


class StartupReport:
    """The app, with a store that cannot be opened at start told in one line.

    Starlette reports a failed startup with the whole traceback as the message,
    which uvicorn logs at error level. For ``StoreUnavailable`` (nothing the code
    can fix, the operator can) that message is replaced by :func:`cannot_start`
    on stderr; any other failure keeps its traceback.
    """

    def __init__(self, app: Any, database_url: str) -> None:
        self.app = app
        self.database_url = database_url

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)
        return self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        held: list[dict[str, Any]] = []

        async def hold(message: dict[str, Any]) -> None:
            # Starlette sends the failure, then raises: sent below, once the
            # exception says what it was.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
                return
            await send(message)

        try:
            await self.app(scope, receive, hold)
        except StoreUnavailable as exc:
            if held:
                print(cannot_start(self.database_url, exc), file=sys.stderr, flush=True)
                held = [{"type": "lifespan.startup.failed", "message": ""}]
            raise
        finally:
            for message in held:
                await send(message)


def build_server(settings: Settings) -> GatewayServer:
    from chat_gateway.server.app import create_app
    from chat_gateway.server.uvicorn_internals import DirectProtocol, HttpLimits, HttpProtocol

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # httptools with bounds on heads, bodies and stalled writes (chat_gateway.server.uvicorn_internals)
        http=HttpProtocol.with_limits(
            HttpLimits(
                header_timeout=settings.http_header_timeout,
                body_timeout=settings.http_body_timeout,
                max_header_bytes=settings.http_max_header_bytes,
                write_timeout=settings.sse_send_timeout,
            )
        ),
        # websockets-sansio with direct fan-out writes (chat_gateway.server.uvicorn_internals, chat_gateway.delivery.output).
        ws=DirectProtocol,
        ws_max_size=settings.ws_max_size,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        # permessage-deflate keeps compression state for every socket at uvicorn's
        # settings (README, Performance); chat frames are small, so it is off.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)),
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
        interface="asgi3",  # GatewayApp.__call__ returns the coroutine (chat_gateway.server.app)
    )
    server = GatewayServer(config)
    server.shutdown_timeout = settings.shutdown_timeout
    return server


def main(argv: list[str] | None = None) -> int:
    from chat_gateway.server import usage

    parser = argparse.ArgumentParser(
        prog="chat-gateway",
        description=usage.summary(),
        epilog=usage.environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {usage.version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run one gateway instance",
        description="Run one gateway instance. Configuration is by "
        "environment: chat-gateway --help lists it.",
    )
    serve.add_argument("--host", help="address to listen on (overrides HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides PORT)")
    serve.add_argument("--log-level", help="debug, info, warning or error (overrides LOG_LEVEL)")
    sub.add_parser(
        "migrate",
        help="apply pending schema migrations and exit",
        description="Apply pending schema migrations to DATABASE_URL and exit.",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(
            **{k: getattr(args, k, None) for k in ("host", "port", "log_level")}
        )
    except ConfigError as exc:
        print(f"chat-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    # Before the app is built: its middleware and the spans around store, Redis and
    # frames come from here. Neither imports its SDK unless its variables are set.
    instance = f"{socket.gethostname()}:{os.getpid()}"
    if tracing.configure(request_id=logs.conn_id, release=usage.version()).on:
        tracing.active.instrument(_traced())
        logs.on_request.append(tracing.active.tag_request)
    if reports.configure(
        settings.sentry_dsn, release=usage.version(), instance=instance, request_id=logs.conn_id
    ):
        logs.on_request.append(reports.tag_request)
    server = build_server(settings)
    server.database_url = settings.database_url
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    server.config.loop = loop
    # A post leaves a few hundred container objects behind it for a moment; at
    # the default threshold the young generation is collected every few dozen
    # posts, a share of a busy instance's CPU the README's Performance section
    # gives. Every cycle is still found, a little later.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    server.run()
    return 0 if server.started else 1


async def _migrate(settings: Settings) -> int:
    from chat_gateway.storage import create_store

    store = create_store(settings.database_url)
    try:
        await store.start()
        applied = await store.migrate()
    except StoreUnavailable as exc:
        print(cannot_start(settings.database_url, exc), file=sys.stderr, flush=True)
        return 1
    finally:
        await store.close()
    log.info("migrations applied: %s", ", ".join(applied) if applied else "none pending")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _traced() -> tracing.Targets:
    """What tracing wraps in spans (imported here, at the top: tracing imports
    nothing of the gateway)."""
    from chat_gateway.redisio.pipelined import PipelinedConnection
    from chat_gateway.storage.base import Store
    from chat_gateway.storage.postgres import PostgresStore
    from chat_gateway.storage.sqlite import SQLiteStore
    from chat_gateway.transports.ws import Session

    return tracing.Targets(
        store_interface=Store,
        stores=(PostgresStore, SQLiteStore),
        pipelined=PipelinedConnection,
        session=Session,
    )

"""uvicorn's protocols, made to bound what a peer may hold, and its server's start
and stop: the one place that reaches into uvicorn's internals (its HTTP and
WebSocket protocol classes and its Server).

asyncio's ``transport.close()`` waits for the write buffer to drain, which a
peer that stopped reading never lets happen: the socket, and the kernel
memory behind it, would stay for good. Here

- a WebSocket whose handler has ended, or whose keepalive ping went
  unanswered, is aborted once the close handshake had its chance
  (``close_timeout``);
- an HTTP connection whose writes stay paused (the peer takes nothing) for
  ``write_timeout`` seconds is aborted, and so is one still holding unsent
  bytes ``LINGER`` seconds after its response ended: a never-reading SSE
  client costs nothing after it is dropped;
- a request head must arrive within ``header_timeout`` seconds and be at most
  ``max_header_bytes`` long (408 / 431), and a body must arrive within
  ``body_timeout`` seconds of its head (408): a slow or endless head or body
  cannot hold a connection and its buffers open;
- every answer the server itself gives, before the application runs (a head
  it cannot parse, too large or too slow), is the JSON error body of the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from chat_gateway.delivery.output import EXTENSION
from chat_gateway.delivery.primitives import Flag, Inbox
from chat_gateway.errors import ApiError

log = logging.getLogger("gateway.transport")

# The uvicorn releases this seam is tested with; pyproject pins the same range.
UVICORN_VERSIONS = ">=0.54,<0.55"
# What the seam overrides, calls or reads of uvicorn's protocols: methods of the
# classes, and attributes their instances set up (checked against the installed
# uvicorn by tests/unit/test_uvicorn_internals.py).
WS_METHODS = ("run_asgi", "keepalive_timeout", "send", "handle_connect", "send_500_response")
WS_STATE = (
    "app",
    "loop",
    "logger",
    "transport",
    "queue",
    "writable",
    "handshake_complete",
    "close_sent",
    "disconnected",
    "close_timer",
    "initial_response",
)
HTTP_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "handle_websocket_upgrade",
    "_unsupported_upgrade_warning",
    "on_message_begin",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
    "_start_asgi_task",
    "pause_writing",
    "resume_writing",
    "timeout_keep_alive_handler",
    "shutdown",
)
HTTP_STATE = ("config", "loop", "parser", "tasks", "transport", "flow", "client", "cycle")
SERVER_METHODS = ("startup", "shutdown", "handle_exit", "main_loop", "on_tick")
SERVER_STATE = ("config", "_captured_signals", "should_exit")
SERVER_STARTED_STATE = ("servers",)  # set up by startup()

LINGER = 3.0  # seconds unsent bytes may wait once a response or connection has ended
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops the queue


def reset(transport: asyncio.Transport) -> None:
    """Drop a connection at once, with what the kernel still holds for it.

    ``abort()`` alone closes the descriptor, but the kernel keeps an orphaned
    socket with its unsent bytes (FIN_WAIT1, megabytes for a stalled peer)
    until the peer reads them or the retries run out. With a zero linger the
    close resets the connection and frees them.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


# The websockets protocol's own logger: it writes every frame's text and every
# handshake header (the request line with its query) at DEBUG and "connection open"
# at INFO. None of it goes out: message text is never logged, and the gateway's
# "websocket opened" line is the one line of an open.
_PROTOCOL_LOG = logging.getLogger("gateway.websocket.protocol")
_PROTOCOL_LOG.setLevel(logging.WARNING)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.close_timeout = 3.0  # seconds a close handshake may take before the abort
        self.conn.logger = _PROTOCOL_LOG
        self.conn.debug = False

    def _abort_if_stuck(self) -> None:
        if self.transport.get_write_buffer_size() > 0:
            reset(self.transport)
        elif not self.transport.is_closing():
            self.transport.abort()

    async def run_asgi(self) -> None:
        # uvicorn's own, except that an upgrade refused with an HTTP response (the
        # gateway's JSON error body) is an answer, not an error to log.
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete and self.initial_response is None:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None:
            self.transport.close()
        self.loop.call_later(self.close_timeout + 0.5, self._abort_if_stuck)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if self.transport.get_write_buffer_size() > 0:
            reset(self.transport)


class DirectProtocol(WebSocketProtocol):
    """:class:`WebSocketProtocol` plus a synchronous writer of whole frames, offered to
    the app as the ASGI extension ``chat_gateway.delivery.output.EXTENSION`` (``write`` and
    ``drained``), which :class:`chat_gateway.delivery.output.FrameSink` uses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lighter stand-ins for the asyncio.Queue and asyncio.Event uvicorn makes per
        # socket (chat_gateway.delivery.primitives): what it uses of them, for less memory per connection.
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake is done: its request and response are not read again.
            request = self.request
            self.request = self.response = None  # type: ignore[assignment]
            if request is not None:
                # websockets' parser keeps the request as a local of its generator for
                # the socket's lifetime; its headers (most of its size) are in the
                # scope already, so the parser's copy is emptied.
                request.headers.clear()
            # uvicorn's protocol has more instance attributes than a shared-key dict
            # holds, so its dict grew a table with room to spare; rebuilt at its size
            # it costs less for every idle socket (README, Performance).
            self.__dict__ = dict(self.__dict__)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = {
                "write": self.write_frames,
                "drained": self.writable.wait,
            }

    def write_frames(self, data: bytes) -> int:
        """Write encoded frames now; the bytes still buffered, or -1 if the socket is
        not open for data (before the accept, after a close frame, once lost)."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.transport.is_closing()
        ):
            return -1
        self.transport.write(data)
        return int(self.transport.get_write_buffer_size())


class Server(uvicorn.Server):
    """uvicorn's server, with what the gateway adds to its start and its stop.

    - ``startup_app(app)`` gives the app the lifespan startup runs with (the
      app itself again once started): a start that fails can be told there;
    - on SIGTERM/SIGINT the listening sockets close, then ``drain(deadline)``
      runs (the application's own goodbyes), then uvicorn's shutdown (in-flight
      requests, the lifespan shutdown), all within ``shutdown_timeout`` seconds;
      past that, what is left is cancelled;
    - a completed graceful shutdown exits 0 (uvicorn would re-raise the signal).
    """

    shutdown_timeout: float = 10.0
    tick = 1.0  # seconds between ticks of the main loop
    # The running main loop's event loop and the event a stop signal sets.
    _exit_asked: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
    log = log  # where the shutdown's own lines go

    def startup_app(self, app: Any) -> Any:
        return app

    async def drain(self, deadline: float) -> None:
        """Called on shutdown before uvicorn's own; ``deadline`` in loop time."""

    async def startup(self, sockets: Any = None) -> None:
        # Only the lifespan runs inside super().startup(): only it sees the wrapper.
        app = self.config.loaded_app
        self.config.loaded_app = self.startup_app(app)
        try:
            await super().startup(sockets)
        finally:
            self.config.loaded_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # handled: not re-raised after the shutdown
        if self._exit_asked is not None:  # wake the main loop now (a signal handler: threadsafe)
            self._exit_asked[0].call_soon_threadsafe(self._exit_asked[1].set)

    async def main_loop(self) -> None:
        """uvicorn's loop of ticks, once a second instead of ten times: a tick refreshes
        the Date header (whole seconds) and asks whether to stop, and each wake-up of
        an idle instance costs CPU. A signal wakes the loop at once, so a stop does
        not wait for the tick."""
        exit_asked = asyncio.Event()
        self._exit_asked = (asyncio.get_running_loop(), exit_asked)
        counter = 0  # uvicorn's on_tick refreshes the headers when it is a multiple of 10
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exit_asked.wait(), self.tick)

    async def shutdown(self, sockets: Any = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        self.log.info("shutting down", extra={"timeout_s": self.shutdown_timeout})
        for server in self.servers:
            server.close()
        await self.drain(deadline)
        # uvicorn waits for in-flight requests this long, then runs the lifespan shutdown.
        remaining = max(0.1, deadline - loop.time())
        self.config.timeout_graceful_shutdown = max(0.1, remaining - 1)  # type: ignore[assignment]
        try:
            await asyncio.wait_for(super().shutdown(sockets), remaining)
        except TimeoutError:
            self.log.error("shutdown exceeded SHUTDOWN_TIMEOUT; exiting with work cancelled")
        self.log.info("shut down")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 16 * 1024
    write_timeout: float = 10.0


def error_response(exc: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying ``exc``'s JSON body, closing the connection."""
    body = exc.response().body
    return b"".join(
        [
            STATUS_LINE[exc.status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of :class:`HttpLimits`."""

    limits = HttpLimits()

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[HttpProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None  # head or body timeout
        self._stall: asyncio.TimerHandle | None = None  # writes paused since
        self._in_head = True  # between a message's start and its complete head
        self._head_bytes = 0  # bytes received while in the head (an upper bound)
        self._refused = False

    # -- timers ----------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self, what: str) -> None:
        self._deadline = None
        log.info(
            "dropping a connection: the request %s did not arrive in time",
            what,
            extra={"client": self.client and self.client[0]},
        )
        self._refuse(ApiError("request_timeout", f"the request {what} did not arrive in time"))

    def _refuse(self, exc: ApiError) -> None:
        """Answer ``exc`` and close, whatever the application is doing."""
        self._refused = True
        self._disarm()
        cycle = self.cycle
        answer = not self.transport.is_closing()
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's own answer goes nowhere
            cycle.message_event.set()
            answer = answer and not cycle.response_started  # else a response is half out
        if answer:
            self.transport.write(error_response(exc))
        self._close()

    def _close(self) -> None:
        self.transport.close()
        self.loop.call_later(LINGER, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if self.transport.is_closing() and self.transport.get_write_buffer_size() > 0:
            reset(self.transport)

    # -- uvicorn's protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        was_in_head = self._in_head
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if not self._refused:
                log.info("refusing a request that is not valid HTTP: %s", exc)
                self._refuse(
                    ApiError("invalid_request", "the request is not valid HTTP/1.1", status=400)
                )
            return
        if self._in_head and not self._refused:
            # An unfinished head: count what it holds so far (it may include the
            # tail of a previous pipelined request; that only makes it larger).
            self._head_bytes = (self._head_bytes if was_in_head else 0) + len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._head_too_large()

    def _head_too_large(self) -> None:
        limit = self.limits.max_header_bytes
        log.info("refusing a request whose head exceeds %d bytes", limit)
        self._refuse(
            ApiError(
                "headers_too_large",
                f"the request line and headers exceed {limit} bytes",
                limit=limit,
            )
        )

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._head_too_large()
            raise _Refused  # stops the parser: nothing of this request reaches the app
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._arm(self.limits.body_timeout, "body")

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._refused:
            self._arm(self.limits.header_timeout, "head")  # for the next request

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn's own, plus: a response the application ended without
        # completing is closed by uvicorn; if the peer does not take what is
        # left, it is let go after LINGER seconds.
        if self.config.reset_contextvars:
            task = self.loop.create_task(cycle.run_asgi(app), context=contextvars.Context())
        else:
            task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _: self.loop.call_later(LINGER, self._abort_if_stuck))
        self.tasks.add(task)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _write_stalled(self) -> None:
        self._stall = None
        if self.flow.write_paused:
            log.info(
                "dropping a connection whose peer stopped reading",
                extra={"client": self.client and self.client[0]},
            )
            reset(self.transport)

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self._close()

    def shutdown(self) -> None:
        super().shutdown()
        if self.transport.is_closing():
            self.loop.call_later(LINGER, self._abort_if_stuck)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a refused request."""

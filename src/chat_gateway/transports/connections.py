"""Long-lived client connections (a WebSocket, a room's SSE stream, the stats stream),
set up and torn down one way whatever carries them.

A WebSocket or room stream's caller is identified one way (:func:`connecting`).
A connection is admitted (:meth:`Connection.admit`): refused while the instance
shuts down, counted against the caller's ``connect`` rate bucket, and given a
place in the connection limits (chat_gateway.access.limits). One that carries room events
then attaches its subscriber (:meth:`Connection.attach`): registered with the
hub, counted in the ``chat_connections`` gauge, closed when its token expires.
:meth:`Connection.close` undoes whatever was done, once, however the connection
ends; an event stream does it when its response ends (:class:`ConnectionStream`),
even one that never sent a byte.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import HTTPConnection

from chat_gateway.access.auth import Identity
from chat_gateway.access.ratelimit import CONNECT, Decision
from chat_gateway.api.caller import identify, presence_user
from chat_gateway.core.frames import SSE, WS
from chat_gateway.delivery.hub import Subscriber
from chat_gateway.errors import CLOSE_POLICY_VIOLATION
from chat_gateway.services import Services

log = logging.getLogger("gateway.connections")

# How the log lines name a connection by its transport.
_NAMES = {WS: "websocket", SSE: "sse stream"}
_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


def connecting(conn: HTTPConnection) -> tuple[Identity, str | None]:
    """Who opens a connection: the identity (the bearer header, or ``?token=`` where a
    browser cannot set one) and the name it is present under (chat_gateway.api.caller)."""
    identity = identify(conn, query_token=True)
    return identity, presence_user(conn, identity)


def expire_with_token(sub: Subscriber, identity: Identity) -> None:
    """Close the connection (1008 on WS, end of stream on SSE) when its token expires."""
    if identity.expires_at is not None:
        sub.close_at(
            identity.expires_at,
            CLOSE_POLICY_VIOLATION,
            "the token has expired; reconnect with a new one",
        )


class Connection:
    """One connection of ``caller`` (the identity its limits and rate bucket count)."""

    # Held for as long as the connection is open, and idle sockets are many.
    __slots__ = ("_log_extra", "admitted", "caller", "gw", "peer_code", "sub")

    def __init__(self, gw: Services, caller: str) -> None:
        self.gw = gw
        self.caller = caller
        self.admitted = False
        self.sub: Subscriber | None = None
        self.peer_code: int | None = None  # the close code the client sent, if any
        self._log_extra: Mapping[str, Any] = _NO_EXTRA

    async def admit(self) -> Decision:
        """Refuse the connection (``ApiError``) or take its place; the rate decision
        (its headers go on the answer)."""
        self.gw.shutdown.ensure_open()
        decision = await self.gw.rates.check(CONNECT, self.caller)
        self.gw.limits.acquire(self.caller)
        self.admitted = True
        return decision

    def attach(self, sub: Subscriber, identity: Identity, **log_extra: Any) -> None:
        """Register ``sub`` with the hub and count it; it closes when ``identity``'s
        token expires. ``log_extra`` goes on the opened and closed log lines."""
        self.sub = sub
        if log_extra:
            self._log_extra = log_extra
        self.gw.hub.register(sub)
        self.gw.metrics.connections.labels(sub.transport).inc()
        log.info("%s opened", _NAMES[sub.transport], extra={**log_extra, "sub": sub.id})
        expire_with_token(sub, identity)

    async def close(self) -> None:
        """Undo what was done: the connection leaves the gauge and gives its place in
        the limits back (first, with no wait: a cancelled task still does it), then
        its subscriber leaves the hub, its rooms and its presence. Once; later calls
        do nothing."""
        sub, self.sub = self.sub, None
        if sub is not None:
            self.gw.metrics.connections.labels(sub.transport).dec()
        if self.admitted:
            self.admitted = False
            self.gw.limits.release(self.caller)
        if sub is not None:
            await self.gw.hub.unregister(sub)
            await self.gw.presence.gone(sub.id)
            # Closed by the server (a close code of its own), else by the client
            # (its WebSocket close code; none for a stream it left).
            code = sub.close_code if sub.close_code is not None else self.peer_code
            how: dict[str, Any] = {
                "closed_by": "server" if sub.close_code is not None else "client"
            }
            if code is not None:
                how["close_code"] = code
            log.info(
                "%s closed",
                _NAMES[sub.transport],
                extra={**self._log_extra, "sub": sub.id, **how},
            )

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class ConnectionStream(EventSourceResponse):
    """An event stream that closes its connection when it ends, however it ends
    (also when it never got to send a byte)."""

    def __init__(self, *args: Any, connection: Connection, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = connection

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.connection.close()

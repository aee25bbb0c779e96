"""The Starlette application: HTTP routes, SSE, WebSocket, static pages.

Every resource is opened in the lifespan; routes reach the started parts through
``request.app.state.services`` (``gateway_of``); nothing connects at import time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from chat_gateway import tracing
from chat_gateway.access.auth import Authenticator, bearer
from chat_gateway.access.ratelimit import PUBLISH
from chat_gateway.access.sessions import SessionHook
from chat_gateway.api import chat, moderation, search, state
from chat_gateway.api import server as server_api
from chat_gateway.api import validation as v
from chat_gateway.api.caller import (
    SESSION,
    api_key,
    client_address,
    gateway_of,
    identify,
    key_caller,
    known_user,
    query_user,
    stored_room,
    token_of,
)
from chat_gateway.api.chat import screened
from chat_gateway.api.responses import encoded_json_response, json_response
from chat_gateway.api.webhooks import webhooks_dead, webhooks_enable, webhooks_list, webhooks_replay
from chat_gateway.config import Settings
from chat_gateway.core.frames import SSE
from chat_gateway.delivery.hub import Subscriber
from chat_gateway.delivery.publish_hook import Kind
from chat_gateway.errors import CODES, ApiError, internal, store_unavailable
from chat_gateway.gateway import Gateway
from chat_gateway.ops.logs import RequestContext, conn_id, request_id
from chat_gateway.server import openapi
from chat_gateway.storage import StoreUnavailable
from chat_gateway.transports.connections import Connection, ConnectionStream, connecting
from chat_gateway.transports.stats_stream import stats_events
from chat_gateway.transports.ws import websocket_endpoint

# The package directory, which holds static/ (and, installed, sdk/).
PACKAGE = Path(__file__).resolve().parent.parent

log = logging.getLogger("gateway.http")


# -- messages ----------------------------------------------------------------


async def post_message(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_post(room)
    stored_room(gw, room, "posting a message")
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    key = v.idempotency_key(request.headers.get("idempotency-key"))
    body = await v.json_body(request, gw.settings.max_body_bytes, v.POST_MESSAGE)
    text = v.text(body.get("text"))
    author = v.body_author(body, identity.name if identity.user else None)
    reply_to = v.reply_to(body.get("reply_to", v.ABSENT))
    mentions = v.mentions(body.get("mentions", v.ABSENT))
    decision = await gw.rates.check_post(room, identity.bucket)
    await gw.moderation.check_post(room, author, moderator=identity.may_moderate(room))
    if api_key(request) is None:  # a backend's own post is not put to its hook
        text = await screened(gw, Kind.PUBLISH, room, author, text)
    msg, created = await gw.publisher.post(
        room,
        author,
        text,
        identity=identity,
        transport="http",
        idempotency_key=key,
        reply_to=reply_to,
        mentions=mentions,
    )
    return encoded_json_response(msg.to_json(), 201 if created else 200, decision.headers())


async def list_messages(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_room(room)
    stored_room(gw, room, "reading history")
    q = request.query_params
    v.only_fields(dict(q), v.fields(v.HISTORY_QUERY))
    limit = v.limit_param(q.get("limit"))
    before = v.seq_param(q.get("before"), "before")
    after = v.seq_param(q.get("after"), "after")
    await gw.moderation.check_read(room, known_user(identity))
    page = await gw.history.history(room, limit=limit, before=before, after=after)
    # Built around each message's own JSON (encoded once per message, see Message).
    body = b'{"messages":[%s],"has_more":%s}' % (
        b",".join([m.to_json() for m in page.messages]),
        b"true" if page.has_more else b"false",
    )
    return encoded_json_response(body)


async def messages(request: Request) -> Response:
    """``/v1/rooms/{room}/messages``: one route for both methods, so that a request
    with another method gets 405 with every method of the path in ``Allow``."""
    return await (post_message if request.method == "POST" else list_messages)(request)


async def websocket_over_http(request: Request) -> Response:
    # The query is checked first, as the upgrade checks it: a bad one is a 422
    # whether or not the request upgrades.
    v.only_fields(dict(request.query_params), v.fields(v.WS_QUERY))
    query_user(request)
    raise ApiError(
        "upgrade_required",
        "this route speaks WebSocket only: open it with an Upgrade request",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


async def room_events(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity, user = connecting(request)
    identity.check_room(room)
    v.only_fields(dict(request.query_params), v.fields(v.EVENTS_QUERY))
    # Both are checked; the header (a browser's own resume) wins.
    since = v.seq_param(request.headers.get("last-event-id"), "Last-Event-ID")
    since_query = v.seq_param(request.query_params.get("since"), "since")
    if since is None:
        since = since_query
    changes_since = v.seq_param(request.query_params.get("changes_since"), "changes_since")
    conflate = v.conflate_ms(request.query_params.get("conflate_ms"))
    await gw.moderation.check_subscribe(room, user)
    connection = Connection(gw, identity.bucket)
    decision = await connection.admit()
    sub = Subscriber(
        SSE,
        identity=identity.name,
        max_messages=gw.settings.queue_max_messages,
        max_bytes=gw.settings.queue_max_bytes,
        user=user,
    )
    connection.attach(sub, identity, room=room)
    try:
        await gw.hub.subscribe(sub, room, since, changes_since, conflate)
    except BaseException:
        await connection.close()
        raise
    await gw.presence.joined(sub.id, user, room)

    async def stream() -> AsyncIterator[bytes]:
        async for batch in sub.batches():
            yield b"".join(batch)
        if sub.farewell is not None:  # ended by the server API: say why
            yield sub.farewell

    # A reader that stopped reading is aborted by the server's protocol after
    # SSE_SEND_TIMEOUT (chat_gateway.server.uvicorn_internals); send_timeout is the backstop under
    # another server, where the socket may stay until the peer leaves.
    return ConnectionStream(
        stream(),
        ping=gw.settings.sse_ping,
        sep="\n",
        send_timeout=2 * gw.settings.sse_send_timeout,
        connection=connection,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **decision.headers()},
    )


async def publish(request: Request) -> Response:
    gw = gateway_of(request)
    gw.auth.check_api_key(bearer(request.headers))
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await v.json_body(request, gw.settings.max_body_bytes, v.PUBLISH)
    room = v.room_name(body.get("room"))
    event = v.event_name(body.get("event"))
    data = v.event_data(body.get("data", v.ABSENT))
    decision = await gw.rates.check(PUBLISH, key_caller(request, bearer(request.headers)))
    await gw.publisher.publish_event(room, event, data)
    return json_response(
        {"status": "accepted", "room": room, "event": event}, 202, decision.headers()
    )


async def room_presence(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identify(request).check_room(room)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    try:
        users = await gw.presence.members(room)
    except Exception as exc:
        log.warning("presence read failed: %r", exc)
        raise ApiError("unavailable", "presence is unavailable; retry later") from None
    return json_response({"room": room, "users": users})


# -- operations ----------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    ok, checks = await gateway_of(request).readiness.check()
    return json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
    )


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


async def metrics(request: Request) -> Response:
    gw = gateway_of(request)
    gw.auth.check_metrics_key(bearer(request.headers))
    await gw.readiness.recent()  # chat_ready: a probe round at most a second old
    body, content_type = gw.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


# -- errors ------------------------------------------------------------------


async def api_error(conn: HTTPConnection, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def store_unavailable_error(conn: HTTPConnection, exc: Exception) -> Response:
    assert isinstance(exc, StoreUnavailable)
    return store_unavailable(exc, conn.url.path).response()


async def http_error(conn: HTTPConnection, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
        exc.status_code, "invalid_request" if exc.status_code < 500 else "internal"
    )
    return ApiError(
        code, exc.detail or CODES[code][1], status=exc.status_code, headers=dict(exc.headers or {})
    ).response()


async def internal_error(conn: HTTPConnection, exc: Exception) -> Response:
    log.exception("unhandled error on %s", conn.url.path, exc_info=exc)
    return internal().response()


# -- the app -------------------------------------------------------------------


class GatewayApp(Starlette):
    """Starlette, with ``/v1/ws`` dispatched before the router.

    An idle WebSocket keeps every frame of the call chain that leads to its
    handler alive for as long as it is open. ``/v1/ws`` skips the middleware
    and the router and goes through what of them it needs: Starlette's own
    ``ExceptionMiddleware`` with the app's exception handlers, and the
    connection id :class:`RequestContext` would set. Every other request goes
    through Starlette. (``python -m bench idle`` measures the memory per
    connection; the figures are in the README.)

    With a JWKS, a request whose token names a key the cache lacks first waits
    for the key set's next fetch (``Authenticator.await_key``, bounded and
    shared), so that every route verifies tokens synchronously from the cache.
    """

    WS_PATH = "/v1/ws"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._websocket: ExceptionMiddleware | None = None  # built on first use, as the stack
        self.jwks_auth: Authenticator | None = None  # set by the lifespan when AUTH_JWKS_URL is
        self.sessions: SessionHook | None = None  # set by the lifespan when AUTH_HOOK_URL is
        self.trusted_proxies: tuple[str, ...] = ()

    @staticmethod
    def _session_cookie(scope: Any) -> str | None:
        """The cookie of a /v1/ request with no token (the session hook's question)."""
        if not scope["path"].startswith("/v1/"):
            return None
        conn = HTTPConnection(scope)
        if token_of(conn, query_token=True) is not None:
            return None
        return conn.headers.get("cookie") or None

    def __call__(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if scope["type"] == "lifespan":
            return self._route(scope, receive, send)
        sessions = self.sessions
        if sessions is not None and (cookie := self._session_cookie(scope)) is not None:
            return self._with_session(sessions, cookie, scope, receive, send)
        auth = self.jwks_auth
        if auth is not None:
            token = token_of(HTTPConnection(scope), query_token=True)
            if auth.unknown_kid(token) is not None:
                return self._with_key(auth, token, scope, receive, send)
        return self._route(scope, receive, send)

    async def _with_key(
        self, auth: Authenticator, token: str | None, scope: Any, receive: Any, send: Any
    ) -> None:
        await auth.await_key(token)
        await self._route(scope, receive, send)

    async def _with_session(
        self, sessions: SessionHook, cookie: str, scope: Any, receive: Any, send: Any
    ) -> None:
        """Ask the session hook first; the routes find its answer where ``identify``
        looks (an API-key route never asks for it)."""
        address = client_address(HTTPConnection(scope), self.trusted_proxies)
        try:
            scope[SESSION] = await sessions.identify(cookie, address, scope["path"])
        except ApiError as exc:
            scope[SESSION] = exc
        await self._route(scope, receive, send)

    def _route(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if scope["type"] == "websocket" and scope["path"] == self.WS_PATH:
            scope["app"] = self
            if self._websocket is None:
                # The app's exception handlers but the catch-all one, which belongs to
                # the server-error middleware (an HTTP 500 only), as Starlette splits them.
                self._websocket = ExceptionMiddleware(
                    _websocket,
                    handlers={
                        k: h
                        for k, h in self.exception_handlers.items()
                        if k not in (500, Exception)
                    },
                )
            return self._websocket(scope, receive, send)
        return super().__call__(scope, receive, send)


def _websocket(scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
    """``/v1/ws`` with its connection id, as RequestContext gives it. The connection
    runs in a task of its own, whose context ends with it: nothing to reset."""
    conn_id.set(request_id(scope))
    return websocket_endpoint(WebSocket(scope, receive=receive, send=send))


SDK_PATH = "/sdk/chat-gateway.js"
# The rest of the client, from the same folder: the SharedWorker script of the
# one-socket-per-browser mode (``sharedClient()``), which a browser only runs from the
# page's own origin, and the module it imports as ``./index.js``.
SDK_FILES = {SDK_PATH: "index.js", "/sdk/index.js": "index.js", "/sdk/worker.js": "worker.js"}

# The pages load their scripts and stylesheet from /static/ and talk to this origin
# only; nothing may frame them (clickjacking) or learn their address from a link.
# Every file under /static/ (the pages are there too) and the SDK get the same.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PageFiles(StaticFiles):
    """``/static/``: Starlette's static files, each sent with :data:`PAGE_HEADERS`,
    so a page reached by its file name cannot be framed either."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def static_dir(settings: Settings) -> Path:
    if settings.static_dir:
        return Path(settings.static_dir)
    return PACKAGE / "static"


def sdk_file(name: str = "index.js") -> Path:
    """A file of the JavaScript client (clients/js/src/), which the chat page imports.

    An installed package carries them in ``chat_gateway/sdk/`` (pyproject maps
    clients/js/src there); a source checkout serves the files themselves.
    """
    installed = PACKAGE / "sdk" / name
    if installed.exists():
        return installed
    return PACKAGE.parent.parent / "clients" / "js" / "src" / name


def create_app(settings: Settings | None = None, *, gateway: Gateway | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    static = static_dir(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gw = gateway or Gateway(settings)
        await gw.start()
        app.state.gateway = gw  # the process' own (chat_gateway.server.cli's drain)
        app.state.services = gw.services  # what routes reach (chat_gateway.api.caller)
        if isinstance(app, GatewayApp) and gw.auth.jwks is not None:
            app.jwks_auth = gw.auth
        if isinstance(app, GatewayApp):
            app.sessions = gw.sessions
            app.trusted_proxies = settings.trusted_proxies
        try:
            yield
        finally:
            await gw.close()

    def page(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return FileResponse(
                static / name, headers={"Cache-Control": "no-cache", **PAGE_HEADERS}
            )

        return endpoint

    def sdk_module(name: str) -> Any:
        path = sdk_file(name)

        async def endpoint(request: Request) -> Response:
            # an ES module: served as JavaScript, with the pages' headers, revalidated
            # like them
            return FileResponse(
                path,
                media_type="text/javascript; charset=utf-8",
                headers={"Cache-Control": "no-cache", **PAGE_HEADERS},
            )

        return endpoint

    routes = [
        Route("/v1/rooms/{room}/messages", messages, methods=["GET", "POST"]),
        Route("/v1/rooms/{room}/events", room_events, methods=["GET"]),
        Route("/v1/rooms/{room}/presence", room_presence, methods=["GET"]),
        Route("/v1/rooms/{room}/messages/{seq}", chat.message, methods=["PATCH", "DELETE"]),
        Route("/v1/rooms/{room}/messages/{seq}/reactions", chat.react, methods=["POST"]),
        Route("/v1/rooms/{room}/messages/{seq}/replies", chat.replies, methods=["GET"]),
        Route("/v1/rooms/{room}/messages/{seq}/versions", chat.versions, methods=["GET"]),
        Route(
            "/v1/rooms/{room}/messages/{seq}/reactions/{reaction}", chat.react, methods=["DELETE"]
        ),
        Route("/v1/rooms/{room}/read", chat.read, methods=["GET", "POST"]),
        Route("/v1/read", chat.read_positions, methods=["GET"]),
        Route("/v1/search", search.search, methods=["GET"]),
        Route("/v1/rooms/{room}/bans", moderation.bans, methods=["GET", "POST"]),
        Route("/v1/rooms/{room}/bans/{user:path}", moderation.lift, methods=["DELETE"]),
        Route("/v1/rooms/{room}/mutes", moderation.bans, methods=["GET", "POST"]),
        Route("/v1/rooms/{room}/mutes/{user:path}", moderation.lift, methods=["DELETE"]),
        Route("/v1/rooms/{room}/settings", moderation.settings, methods=["GET", "PUT"]),
        Route("/v1/rooms/{room}/moderation", moderation.moderation_log, methods=["GET"]),
        Route("/v1/rooms/{room}/state", state.state, methods=["GET", "PATCH"]),
        Route("/v1/rooms/{room}/state/{key}", state.state_key, methods=["PUT", "DELETE"]),
        # Served by GatewayApp before routing; listed so the routing table is whole.
        WebSocketRoute(GatewayApp.WS_PATH, websocket_endpoint),
        Route(GatewayApp.WS_PATH, websocket_over_http, methods=["GET"]),
        Route("/v1/publish", publish, methods=["POST"]),
        Route("/v1/server/disconnect", server_api.disconnect, methods=["POST"]),
        Route("/v1/server/unsubscribe", server_api.unsubscribe, methods=["POST"]),
        Route("/v1/server/rooms", server_api.list_rooms, methods=["GET"]),
        Route("/v1/server/rooms/{room}", server_api.room_info, methods=["GET"]),
        Route("/v1/server/rooms/{room}/messages", server_api.purge_messages, methods=["DELETE"]),
        Route("/v1/server/broadcast", server_api.broadcast, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/stats/events", stats_events, methods=["GET"]),
        Route("/v1/admin/webhooks", webhooks_list, methods=["GET"]),
        Route("/v1/admin/webhooks/dead", webhooks_dead, methods=["GET"]),
        Route("/v1/admin/webhooks/replay", webhooks_replay, methods=["POST"]),
        Route("/v1/admin/webhooks/enable", webhooks_enable, methods=["POST"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/", page("index.html"), methods=["GET"]),
        Route("/dashboard", page("dashboard.html"), methods=["GET"]),
        *(Route(route, sdk_module(name), methods=["GET"]) for route, name in SDK_FILES.items()),
        Mount("/static", PageFiles(directory=static, check_dir=False), name="static"),
    ]
    app = GatewayApp(
        routes=routes,
        lifespan=lifespan,
        # tracing's middleware (none when off) outside: the request's span is current
        # in RequestContext, which tags it and times the request
        middleware=[*tracing.active.middleware(), Middleware(RequestContext)],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            StoreUnavailable: store_unavailable_error,
            Exception: internal_error,
        },
    )
    # A path with or without its trailing slash is one route or a 404, never a
    # redirect built from the request's Host header.
    app.router.redirect_slashes = False
    open_mode = not (
        (settings.auth_secret or "").split() or settings.auth_jwks_url or settings.auth_public_key
    )
    app.state.openapi = orjson.dumps(openapi.document(open_mode))
    return app

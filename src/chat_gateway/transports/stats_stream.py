"""``GET /v1/stats/events``: live figures as Server-Sent Events.

Every ``interval`` seconds (default 1) the stream sends one ``event: stats``
whose data is a JSON snapshot of the figures (chat_gateway.ops.figures). The stream ends
when the instance shuts down.

With ``scope=cluster`` the figures are the sum over every instance sharing the
Redis (chat_gateway.ops.shared_figures). Without Redis (``memory://``) the cluster is
this instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import bearer
from chat_gateway.api import validation as v
from chat_gateway.api.caller import client_address, gateway_of, key_caller
from chat_gateway.core.frames import sse_event
from chat_gateway.errors import ApiError
from chat_gateway.services import Services
from chat_gateway.transports.connections import Connection, ConnectionStream


def stats_caller(request: Request, gw: Services) -> str:
    """Who the stream is counted against. In auth mode the figures (room names and
    who is in them) need an API key, from ``Authorization: Bearer`` or ``?key=``;
    with no key configured they are refused. In open mode: the client address."""
    if gw.auth.open_mode:
        return client_address(request, gw.settings.trusted_proxies)
    key = bearer(request.headers) or request.query_params.get("key")
    if not gw.auth.keys_required:
        raise ApiError(
            "unauthorized", "the live figures need an API key and none is configured (API_KEYS)"
        )
    if not key:
        raise ApiError("unauthorized", "an API key is required: Authorization: Bearer <key>")
    gw.auth.check_api_key(key)
    return key_caller(request, key)


async def stats_events(request: Request) -> Response:
    gw = gateway_of(request)
    v.only_fields(dict(request.query_params), v.fields(v.STATS_QUERY))
    interval = v.interval(request.query_params.get("interval"))
    scope = v.choice(request.query_params.get("scope"), "scope", v.SCOPE)
    connection = Connection(gw, stats_caller(request, gw))
    await connection.admit()
    sampler = gw.figures.sampler(cluster=scope == "cluster")

    async def stream() -> AsyncIterator[bytes]:
        while not gw.shutdown.closing:
            snapshot = sampler.snapshot(await sampler.reading())
            yield sse_event(b"stats", orjson.dumps(snapshot))
            await asyncio.sleep(interval)

    # A reader that stopped reading is dropped as on room streams (chat_gateway.server.app).
    return ConnectionStream(
        stream(),
        ping=15,
        sep="\n",
        send_timeout=2 * gw.settings.sse_send_timeout,
        connection=connection,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

"""``GET /v1/search``: full-text search over the rooms the caller may read.

The query language, the room scope, the cursor and the highlights are
``chat_gateway.storage.search``; the stores run the query. Which rooms: those
named by ``room`` (each must be readable, else 403), or else every room the
token's ``rooms`` / ``read_rooms`` claims grant (every room in open mode). The
scope is a condition of the store's query, never a filter of its answer. Each
search takes a token from the ``search`` bucket (``SEARCH_RATE_LIMIT``).
"""

from __future__ import annotations

from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import Identity
from chat_gateway.access.ratelimit import SEARCH
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of, identify, known_user
from chat_gateway.api.responses import json_response
from chat_gateway.errors import ApiError
from chat_gateway.storage.search import (
    MAX_ROOMS,
    BadQuery,
    Cursor,
    NothingToFind,
    Query,
    RoomScope,
    SearchTimeout,
    hits,
    parse_query,
)


def scope_of(identity: Identity, rooms: list[str]) -> RoomScope:
    """The rooms to search: those asked for, each readable (403 otherwise), or every
    room the identity may read."""
    if rooms:
        for room in rooms:
            identity.check_room(room)
        return RoomScope(names=tuple(dict.fromkeys(rooms)))
    if identity.unrestricted:
        return RoomScope(everything=True)
    return RoomScope.of_patterns(identity.rooms, identity.read_rooms)


async def search(request: Request) -> Response:
    gw = gateway_of(request)
    params = request.query_params
    v.only_fields(dict(params), v.fields(v.SEARCH_QUERY))
    for name in ("q", "limit", "cursor"):
        if len(params.getlist(name)) > 1:
            raise ApiError("invalid_request", f"{name} must be given once", field=name)
    rooms = [v.room_name(r) for r in params.getlist("room")]
    if len(rooms) > MAX_ROOMS:
        raise ApiError(
            "invalid_request", f"room may be given at most {MAX_ROOMS} times", field="room"
        )
    limit = v.query_limit(params.get("limit"), v.SEARCH_QUERY)
    query: Query | None
    try:
        query = parse_query(params.get("q", ""))
    except NothingToFind:
        query = None  # matches no message: an empty page, once the rest is checked
    except BadQuery as exc:
        raise ApiError("invalid_request", str(exc), field="q") from None
    raw_cursor = params.get("cursor")
    try:
        cursor = None if raw_cursor is None else Cursor.decode(raw_cursor)
    except BadQuery as exc:
        raise ApiError("invalid_request", str(exc), field="cursor") from None
    identity = identify(request)
    scope = scope_of(identity, rooms)
    barred = await gw.moderation.excluded(known_user(identity))
    if barred:  # rooms the caller is banned from: no hits there
        scope = replace(scope, excluded=(*scope.excluded, *barred))
    decision = await gw.rates.check(SEARCH, identity.bucket)
    if query is None or scope.empty:
        return json_response({"results": [], "next_cursor": None}, 200, decision.headers())
    timeout = gw.settings.search_timeout
    try:
        page = await gw.store.search(query, scope, limit=limit, cursor=cursor, timeout=timeout)
    except SearchTimeout:
        raise ApiError(
            "unavailable",
            f"the search took longer than {timeout:g} s and was stopped; "
            "search with fewer, longer or more distinctive words",
        ) from None
    next_cursor = Cursor.after(page.messages[-1]).encode() if page.has_more else None
    body = {
        "results": [h.to_dict() for h in hits(page.messages, query)],
        "next_cursor": next_cursor,
    }
    return json_response(body, 200, decision.headers())

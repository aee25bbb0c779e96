"""Admin routes for webhooks (API key): receivers, dead letters, replay, enable.

``GET /v1/admin/webhooks`` shows each receiver with its breaker as the
answering instance sees it (breakers are per instance; ``disabled`` is shared
by all) and its backlog as the database has it now.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import bearer
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of
from chat_gateway.api.responses import json_response
from chat_gateway.errors import ApiError
from chat_gateway.services import Services
from chat_gateway.storage.base import format_ts
from chat_gateway.storage.outbox import DeadLetter
from chat_gateway.webhooks import Webhooks
from chat_gateway.webhooks.dispatcher import Receiver

MAX_REPLAY_IDS = 1000

TIMESTAMP: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 with a time zone, e.g. 2026-11-28T06:00:00Z",
}
URL: dict[str, Any] = {"type": "string", "description": "a receiver URL as in WEBHOOK_URLS"}
DEAD_QUERY = v.object_schema(
    [],
    limit=v.LIMIT,
    before={
        "type": "integer",
        "minimum": 1,
        "maximum": v.MAX_SEQ,
        "description": "the next cursor",
    },
    endpoint=URL,
)
REPLAY = {
    "oneOf": [
        v.object_schema(
            ["ids"],
            ids={
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_REPLAY_IDS,
                "items": {"type": "integer", "minimum": 1},
            },
            endpoint=URL,
        ),
        v.object_schema(["from"], **{"from": TIMESTAMP, "to": TIMESTAMP, "endpoint": URL}),
    ],
    "description": "dead letters by id, or every delivered or dead event committed in "
    "[from, to) (to defaults to now)",
}
ENABLE = v.object_schema(["url"], url=URL)
ENDPOINT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "url", "state", "backlog", "oldest_pending_s"],
    "properties": {
        "id": {"type": "integer"},
        "url": URL,
        "state": {"enum": ["closed", "open", "half_open", "disabled"]},
        "backlog": {"type": "integer", "description": "pending events"},
        "oldest_pending_s": {
            "type": ["number", "null"],
            "description": "age of the oldest pending event, seconds",
        },
        "consecutive_failures": {"type": "integer"},
        "disabled_reason": {"type": ["string", "null"]},
    },
}
DEAD_LETTER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "description": "the dead letter's id, for replay"},
        "event_id": {"type": "string", "description": "the webhook-id header"},
        "type": {"type": "string"},
        "endpoint": URL,
        "room": v.ROOM,
        "seq": {"type": "integer"},
        "attempts": {"type": "integer"},
        "last_status": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "created_at": TIMESTAMP,
        "dead_at": TIMESTAMP,
        "payload": {"type": "object", "description": "the request body that was sent"},
    },
}


def _admin(request: Request) -> Services:
    """The gateway, once the caller showed an API key (open mode with no API_KEYS:
    no key needed, as on /v1/publish; auth mode with no API_KEYS: refused)."""
    gw = gateway_of(request)
    if not gw.auth.keys_required and not gw.auth.open_mode:
        raise ApiError("unauthorized", "admin routes need an API key, and API_KEYS is not set")
    gw.auth.check_api_key(bearer(request.headers))
    return gw


def _hooks(gw: Services) -> Webhooks:
    if gw.webhooks is None:
        raise ApiError("not_found", "webhooks are off: WEBHOOK_URLS is not set")
    return gw.webhooks


def _receiver(hooks: Webhooks, url: Any) -> Receiver:
    if not isinstance(url, str):
        raise ApiError("invalid_request", "endpoint must be a receiver URL", field="endpoint")
    receiver = hooks.by_url(url)
    if receiver is None:
        raise ApiError("not_found", f"no receiver {url!r} in WEBHOOK_URLS")
    return receiver


def _timestamp(value: Any, name: str) -> int:
    if not isinstance(value, str):
        raise ApiError("invalid_request", f"{name} must be an ISO 8601 timestamp", field=name)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            "invalid_request", f"{name} must be an ISO 8601 timestamp", field=name
        ) from None
    if when.tzinfo is None:
        raise ApiError("invalid_request", f"{name} needs a time zone (e.g. Z)", field=name)
    return int(when.astimezone(UTC).timestamp() * 1000)


async def webhooks_list(request: Request) -> Response:
    gw = _admin(request)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    hooks = gw.webhooks
    if hooks is None:
        return json_response({"endpoints": []})
    await hooks.refresh()
    return json_response({"endpoints": [hooks.describe(r) for r in hooks.receivers.values()]})


def _dead(hooks: Webhooks, d: DeadLetter) -> dict[str, Any]:
    receiver = hooks.receivers.get(d.endpoint_id)
    return {
        "id": d.id,
        "event_id": d.event_id,
        "type": d.type,
        "endpoint": receiver.endpoint.url if receiver else None,
        "room": d.room,
        "seq": d.seq,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": format_ts(d.created_ms),
        "dead_at": format_ts(d.dead_ms),
        "payload": {
            "type": d.type,
            "timestamp": format_ts(d.created_ms),
            "data": orjson.loads(d.data),
        },
    }


async def webhooks_dead(request: Request) -> Response:
    gw = _admin(request)
    q = request.query_params
    v.only_fields(dict(q), v.fields(DEAD_QUERY))
    limit = v.limit_param(q.get("limit"))
    before = v.seq_param(q.get("before"), "before")
    hooks = _hooks(gw)
    endpoint_id = None
    if q.get("endpoint") is not None:
        endpoint_id = _receiver(hooks, q.get("endpoint")).endpoint.id
    rows = await hooks.outbox.dead_letters(limit=limit + 1, before=before, endpoint_id=endpoint_id)
    page = rows[:limit]
    return json_response(
        {
            "dead": [_dead(hooks, d) for d in page],
            "next": page[-1].id if len(rows) > limit else None,
        }
    )


async def webhooks_replay(request: Request) -> Response:
    gw = _admin(request)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await v.json_body(request, gw.settings.max_body_bytes, None)  # one of two shapes
    hooks = _hooks(gw)
    endpoint_id = None
    if "endpoint" in body:
        endpoint_id = _receiver(hooks, body["endpoint"]).endpoint.id
    if "ids" in body:
        v.only_fields(body, {"ids", "endpoint"})
        ids = body["ids"]
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= MAX_REPLAY_IDS
            or not all(
                isinstance(i, int) and not isinstance(i, bool) and 1 <= i < 2**63 for i in ids
            )
        ):
            raise ApiError(
                "invalid_request",
                f"ids must be a list of 1..{MAX_REPLAY_IDS} dead letter ids",
                field="ids",
            )
        count = await hooks.outbox.replay(ids=ids, endpoint_id=endpoint_id)
    elif "from" in body:
        v.only_fields(body, {"from", "to", "endpoint"})
        since = _timestamp(body["from"], "from")
        until = _timestamp(body["to"], "to") if "to" in body else None
        if until is not None and until <= since:
            raise ApiError("invalid_request", "to must be after from", field="to")
        count = await hooks.outbox.replay(since_ms=since, until_ms=until, endpoint_id=endpoint_id)
    else:
        raise ApiError(
            "invalid_request", "give ids (dead letters) or from (and to): a time range of events"
        )
    hooks.poke()
    return json_response({"status": "accepted", "replayed": count}, 202)


async def webhooks_enable(request: Request) -> Response:
    gw = _admin(request)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await v.json_body(request, gw.settings.max_body_bytes, ENABLE)
    hooks = _hooks(gw)
    if "url" not in body:
        raise ApiError("invalid_request", "url is required", field="url")
    receiver = _receiver(hooks, body["url"])
    await hooks.enable(receiver)
    await hooks.refresh()
    return json_response(hooks.describe(receiver))

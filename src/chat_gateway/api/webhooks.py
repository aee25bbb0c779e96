"""Admin routes for webhooks (API key): receivers, dead letters, replay, enable.

``GET /v1/admin/webhooks`` shows each receiver with its breaker as the
answering instance sees it (breakers are per instance; ``disabled`` is shared
by all) and its backlog as the database has it now.
"""

from __future__ import annotations

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

ENDPOINT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "url", "state", "backlog", "oldest_pending_s"],
    "properties": {
        "id": {"type": "integer"},
        "url": v.RECEIVER_URL,
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
        "endpoint": v.RECEIVER_URL,
        "room": v.ROOM,
        "seq": {"type": "integer"},
        "attempts": {"type": "integer"},
        "last_status": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "created_at": v.TIMESTAMP,
        "dead_at": v.TIMESTAMP,
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
    v.only_fields(dict(q), v.fields(v.DEAD_QUERY))
    limit = v.query_limit(q.get("limit"), v.DEAD_QUERY)
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
        v.only_fields(body, v.fields(v.REPLAY_IDS))
        ids = v.dead_letter_ids(body["ids"])
        count = await hooks.outbox.replay(ids=ids, endpoint_id=endpoint_id)
    elif "from" in body:
        v.only_fields(body, v.fields(v.REPLAY_RANGE))
        since = v.timestamp(body["from"], "from")
        until = v.timestamp(body["to"], "to") if "to" in body else None
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
    body = await v.json_body(request, gw.settings.max_body_bytes, v.ENABLE)
    hooks = _hooks(gw)
    if "url" not in body:
        raise ApiError("invalid_request", "url is required", field="url")
    receiver = _receiver(hooks, body["url"])
    await hooks.enable(receiver)
    await hooks.refresh()
    return json_response(hooks.describe(receiver))

"""The OpenAPI 3.1 document served at ``/openapi.json``.

Built from the shapes declared in ``gateway.validation`` and the error
catalogue in ``gateway.errors``, so the published contract and the checks
that enforce it cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from gateway import stats
from gateway import validation as v
from gateway.errors import CODES

_REF = "#/components/schemas/"

MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "room", "seq", "author", "text", "created_at"],
    "properties": {
        "id": {"type": "string", "description": "unique across rooms"},
        "room": v.ROOM,
        "seq": {"type": "integer", "minimum": 1,
                "description": "per room, from 1, strictly increasing by 1"},
        "author": {"type": "string"},
        "text": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
    },
}

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "enum": sorted(CODES)},
            "message": {"type": "string"},
            "retry_after": {"type": "number", "description": "seconds, on rate_limited"},
        },
    }},
}

_INT_HEADER = {"schema": {"type": "integer"}}
RATE_HEADERS = {
    "RateLimit-Limit": {"description": "the bucket's capacity", **_INT_HEADER},
    "RateLimit-Remaining": {"description": "tokens left", **_INT_HEADER},
    "RateLimit-Reset": {"description": "seconds until the bucket is full", **_INT_HEADER},
}


# One event of a stream (before OpenAPI 3.2, an event stream's schema describes
# each event): its fields as the SSE format has them, data being text.
def _event(name: dict[str, Any], data: str, with_id: bool) -> dict[str, Any]:
    props: dict[str, Any] = {"event": name, "data": {
        "type": "string", "contentMediaType": "application/json", "description": data}}
    if with_id:
        props["id"] = {"type": "string", "pattern": "^[0-9]+$",
                       "description": "the message's seq, on message events"}
    props["retry"] = {"type": "integer", "minimum": 0}
    return {"type": "object", "required": ["data"], "properties": props,
            "additionalProperties": False}


ROOM_EVENT = _event({"type": "string", "description": "message, presence, or a name given "
                     "to /v1/publish"}, "a message, presence change or ephemeral event",
                    with_id=True)
STATS_EVENT = _event({"const": "stats"}, "a snapshot of the figures (docs/API.md)",
                     with_id=False)


def _json(schema: dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _errors(*codes: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        status, meaning = CODES[code]
        entry = out.setdefault(str(status), _json({"$ref": _REF + "Error"}, ""))
        entry["description"] = "; ".join(filter(None, [entry["description"], f"{code}: {meaning}"]))
        if code == "rate_limited":
            entry["headers"] = {**RATE_HEADERS, "Retry-After": {
                "description": "whole seconds, at least 1", **_INT_HEADER}}
    return out


def _query(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema["properties"].items()]


ROOM_PARAM = {"name": "room", "in": "path", "required": True, "schema": v.ROOM}
USER: list[dict[str, list[str]]] = [{"userToken": []}, {}]


def document() -> dict[str, Any]:
    ok_message = _json({"$ref": _REF + "Message"}, "", RATE_HEADERS)
    paths: dict[str, Any] = {
        "/v1/rooms/{room}/messages": {
            "post": {
                "summary": "Post a message",
                "security": USER,
                "parameters": [ROOM_PARAM, {
                    "name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {"type": "string", "minLength": 1,
                               "maxLength": v.MAX_IDEMPOTENCY_KEY}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": _REF + "PostMessage"}}}},
                "responses": {
                    "201": {**ok_message, "description": "stored"},
                    "200": {**ok_message, "description": "a repeat of an Idempotency-Key: "
                                                         "the first message"},
                    **_errors("invalid_json", "invalid_request", "unauthorized", "forbidden",
                              "too_large", "rate_limited", "unavailable"),
                },
            },
            "get": {
                "summary": "Read history, ascending by seq",
                "security": USER,
                "parameters": [ROOM_PARAM, *_query(v.HISTORY_QUERY)],
                "responses": {
                    "200": _json({"type": "object", "required": ["messages", "has_more"],
                                  "properties": {
                                      "messages": {"type": "array",
                                                   "items": {"$ref": _REF + "Message"}},
                                      "has_more": {"type": "boolean"}}}, "a page"),
                    **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
                },
            },
        },
        "/v1/rooms/{room}/events": {"get": {
            "summary": "Server-Sent Events of a room; resume with Last-Event-ID or since",
            "security": USER,
            "parameters": [ROOM_PARAM, *_query(v.EVENTS_QUERY), {
                "name": "Last-Event-ID", "in": "header", "required": False, "schema": v.SEQ}],
            "responses": {
                "200": {"description": "the event stream", "headers": RATE_HEADERS,
                        "content": {"text/event-stream": {"schema": {
                            "$ref": _REF + "RoomEvent"}}}},
                **_errors("invalid_request", "unauthorized", "forbidden", "rate_limited",
                          "too_many_connections", "unavailable"),
            },
        }},
        "/v1/rooms/{room}/presence": {"get": {
            "summary": "who is in the room, on any instance",
            "security": USER,
            "parameters": [ROOM_PARAM],
            "responses": {
                "200": _json({"type": "object", "required": ["room", "users"], "properties": {
                    "room": v.ROOM, "users": {"type": "array", "items": {"type": "string"}}}},
                    "the users, sorted"),
                **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
            },
        }},
        "/v1/ws": {"get": {
            "summary": "WebSocket upgrade; JSON text frames, see x-frames",
            "security": USER,
            "parameters": _query(v.WS_QUERY),
            "responses": {
                "101": {"description": "switching protocols", "headers": RATE_HEADERS},
                **_errors("invalid_request", "unauthorized", "rate_limited",
                          "too_many_connections", "upgrade_required", "unavailable"),
            },
            "x-frames": {kind: {"$ref": _REF + f"Frame.{kind}"} for kind in v.FRAMES},
        }},
        "/v1/publish": {"post": {
            "summary": "Fan out an ephemeral event (not stored, no seq)",
            "security": [{"apiKey": []}, {}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF + "Publish"}}}},
            "responses": {
                "202": _json({"type": "object"}, "accepted", RATE_HEADERS),
                **_errors("invalid_json", "invalid_request", "unauthorized", "too_large",
                          "rate_limited", "unavailable"),
            },
        }},
        "/v1/stats/events": {"get": {
            "summary": "live figures as SSE, one `stats` event per interval: this "
                       "instance's, or with scope=cluster the sum over every instance; "
                       "in auth mode an API key (Bearer or ?key=) is required",
            "security": [{"apiKey": []}, {}],
            "parameters": _query(stats.QUERY),
            "responses": {
                "200": {"description": "the event stream", "content": {
                    "text/event-stream": {"schema": {"$ref": _REF + "StatsEvent"}}}},
                **_errors("invalid_request", "unauthorized", "rate_limited",
                          "too_many_connections", "unavailable"),
            },
        }},
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": _json(
            {"type": "object"}, "alive")}}},
        "/readyz": {"get": {"summary": "readiness per dependency", "responses": {
            "200": _json({"type": "object"}, "ready"),
            "503": _json({"type": "object"}, "a dependency is down")}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {
                "schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3.1")}}},
    }
    schemas: dict[str, Any] = {"Message": MESSAGE, "Error": ERROR,
                               "RoomEvent": ROOM_EVENT, "StatsEvent": STATS_EVENT,
                               "PostMessage": v.POST_MESSAGE, "Publish": v.PUBLISH}
    schemas.update({f"Frame.{kind}": schema for kind, schema in v.FRAMES.items()})
    return {
        "openapi": "3.1.0",
        "info": {"title": "chat-gateway", "version": "1",
                 "description": "Realtime chat: HTTP, WebSocket and SSE. Errors are "
                                "{\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                              "description": "HS256, claims sub, exp and optional rooms; "
                                             "on /v1/ws and SSE also ?token="},
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "one of API_KEYS"},
            },
        },
    }

"""The OpenAPI 3.1 document served at ``/openapi.json``.

Built from the shapes declared in ``chat_gateway.api.validation`` and the error
catalogue in ``chat_gateway.errors``, so the published contract and the checks
that enforce it cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from chat_gateway.api import validation as v
from chat_gateway.api import webhooks as wh
from chat_gateway.core.namespaces import SUPPORTED
from chat_gateway.errors import CODES

_REF = "#/components/schemas/"

MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "room", "seq", "author", "text", "created_at"],
    "properties": {
        "id": {"type": "string", "description": "unique across rooms"},
        "room": v.ROOM,
        "seq": {
            "type": "integer",
            "minimum": 1,
            "description": "per room, from 1, strictly increasing by 1",
        },
        "author": {"type": "string"},
        "text": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "version": {
            "type": "integer",
            "minimum": 2,
            "description": "present once edited or deleted (never null): 1 + the changes made",
        },
        "edited_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "present once changed: the last edit, or null",
        },
        "deleted_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "present once changed: set on a tombstone (text empty), else null",
        },
        "reactions": {"$ref": _REF + "Reactions"},
        "reply_to": {
            "type": "integer",
            "minimum": 1,
            "description": "present on a reply: the seq of the message it replies to",
        },
        "mentions": {
            "type": "array",
            "items": {"type": "string"},
            "maxItems": v.MAX_MENTIONS,
            "description": "present when the message mentions users: their ids, each once",
        },
        "thread": {"$ref": _REF + "Thread"},
    },
}

# A parent's thread summary (chat_gateway.storage.records.thread_summary).
THREAD: dict[str, Any] = {
    "type": "object",
    "description": "present once the message has a reply: how many (a deleted reply's "
    "tombstone still counts), the last one's seq and time",
    "required": ["replies", "last_seq", "last_at"],
    "properties": {
        "replies": {"type": "integer", "minimum": 1},
        "last_seq": {"type": "integer", "minimum": 1},
        "last_at": {"type": "string", "format": "date-time"},
    },
}

# A message's reactions summary (chat_gateway.storage.base.summarize).
REACTIONS: dict[str, Any] = {
    "type": "object",
    "description": "present when the message has reactions: by reaction, in order of "
    "first use, how many users reacted and the first ten of them",
    "additionalProperties": {
        "type": "object",
        "required": ["count", "users"],
        "properties": {
            "count": {"type": "integer", "minimum": 1},
            "users": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        },
    },
}


def _server_frame(kind: str, required: list[str], /, **props: Any) -> dict[str, Any]:
    """A frame the server sends on ``/v1/ws``. ``required`` lists the fields every such
    frame has; the others appear only sometimes, and none is ever null unless its
    schema says so. Fields may be added (a client ignores what it does not know)."""
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {"type": {"const": kind}, **props},
    }


_MESSAGE_REF: dict[str, Any] = {"$ref": "#/components/schemas/Message"}
_CHANGE: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "description": "the room's change number (edits, deletes, reactions), from 1",
}
_SEQ: dict[str, Any] = {"type": "integer", "minimum": 0}
_REF_ECHO: dict[str, Any] = {"description": "the ref of the frame answered, as sent"}
_READ_POSITION: dict[str, Any] = {
    "type": "object",
    "required": ["room", "seq", "unread", "mentions"],
    "properties": {
        "room": v.ROOM,
        "seq": _SEQ,
        "unread": {"type": "integer", "minimum": 0},
        "mentions": {"type": "integer", "minimum": 0},
    },
}

# Server -> client frames of /v1/ws (docs/API.md, "WebSocket"), under x-server-frames.
# The client libraries' types are checked against these (clients/python/tests/
# test_wire_types.py), and the frames a gateway sends against them.
SERVER_FRAMES: dict[str, dict[str, Any]] = {
    "message": _server_frame("message", ["room", "message"], room=v.ROOM, message=_MESSAGE_REF),
    "subscribed": _server_frame(
        "subscribed",
        ["room", "seq", "change", "kind"],
        room=v.ROOM,
        seq={**_SEQ, "description": "the room's latest seq"},
        change={**_CHANGE, "description": "the room's last change number (0: none yet)"},
        kind={
            "type": "string",
            "enum": ["stored", "ephemeral", "state"],
            "description": "the room's kind, from its namespace",
        },
    ),
    "unsubscribed": _server_frame(
        "unsubscribed",
        ["room"],
        room=v.ROOM,
        reason={"type": "string", "description": "present when the server ended it"},
    ),
    "ack": _server_frame(
        "ack",
        ["ref"],
        ref=_REF_ECHO,
        message={
            **_MESSAGE_REF,
            "description": "publish, edit, delete, react, unreact: the message",
        },
        read={**_READ_POSITION, "description": "read: the position now"},
        # emit: ref alone
    ),
    "error": _server_frame(
        "error",
        ["code", "message"],
        code={"type": "string", "enum": sorted(CODES)},
        message={"type": "string"},
        ref=_REF_ECHO,
        retry_after={"type": "number", "description": "seconds, on rate_limited"},
        field={"type": "string", "description": "the frame's field at fault"},
        limit={"type": "integer"},
        room={**v.ROOM, "description": "wrong_room_kind: the room"},
        kind={
            "enum": [kind.value for kind in SUPPORTED],
            "description": "wrong_room_kind: the kind of the room's namespace",
        },
    ),
    "pong": _server_frame("pong", [], ref=_REF_ECHO),
    "refreshed": _server_frame("refreshed", ["exp"], exp={"type": "number"}, ref=_REF_ECHO),
    "event": _server_frame(
        "event",
        ["room", "event", "data"],
        room=v.ROOM,
        event={"type": "string"},
        data={"type": "object"},
    ),
    "presence": _server_frame(
        "presence",
        ["room", "action", "user"],
        room=v.ROOM,
        action={"enum": ["join", "leave"]},
        user={"type": "string"},
    ),
    **{
        kind: _server_frame(
            kind, ["room", "change", "message"], room=v.ROOM, change=_CHANGE, message=_MESSAGE_REF
        )
        for kind in ("message_updated", "message_deleted")
    },
    "reactions_updated": _server_frame(
        "reactions_updated",
        ["room", "change", "seq", "reactions"],
        room=v.ROOM,
        change=_CHANGE,
        seq={**_SEQ, "description": "the message reacted to"},
        reactions={**REACTIONS, "description": "the message's summary now ({}: none left)"},
    ),
    "thread_updated": _server_frame(
        "thread_updated",
        ["room", "change", "seq", "thread"],
        room=v.ROOM,
        change=_CHANGE,
        seq={**_SEQ, "description": "the message replied to"},
        thread={**THREAD, "description": "the message's thread summary now"},
    ),
    "typing": _server_frame("typing", ["room", "user"], room=v.ROOM, user={"type": "string"}),
    "read": _server_frame(
        "read", ["room", "user", "seq"], room=v.ROOM, user={"type": "string"}, seq=_SEQ
    ),
    "history_purged": _server_frame("history_purged", ["room"], room=v.ROOM),
    # State rooms (chat_gateway.api.state): every live key at seq, then each write.
    "snapshot": _server_frame(
        "snapshot",
        ["room", "seq", "values"],
        room=v.ROOM,
        seq={**_SEQ, "description": "the room's position the values are at"},
        values={"$ref": _REF + "StateValues"},
    ),
    "state": _server_frame(
        "state",
        ["room", "seq", "key", "updated_at"],
        room=v.ROOM,
        seq={**_SEQ, "description": "the seq the write took"},
        key=v.STATE_KEY,
        value={"description": "the key's value (absent when deleted)"},
        deleted={"const": True, "description": "present when the key was deleted"},
        updated_at={"type": "string", "format": "date-time"},
    ),
}

# A state room's live keys (a snapshot's and GET …/state's values).
STATE_VALUES: dict[str, Any] = {
    "type": "object",
    "propertyNames": v.STATE_KEY,
    "additionalProperties": {
        "type": "object",
        "required": ["value", "seq", "updated_at"],
        "properties": {
            "value": {"description": "the key's JSON value"},
            "seq": {**_SEQ, "description": "the seq of the key's last write"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
}
# A write's answer, and each entry of a PATCH's.
STATE_WRITE: dict[str, Any] = {
    "type": "object",
    "required": ["seq", "key", "updated_at"],
    "properties": {
        "room": v.ROOM,
        "seq": {"type": "integer", "minimum": 1, "description": "the seq the write took"},
        "key": v.STATE_KEY,
        "value": {"description": "the value set (absent when deleted)"},
        "deleted": {"const": True, "description": "present when the key was deleted"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}


ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(CODES)},
                "message": {"type": "string"},
                "retry_after": {
                    "type": "number",
                    "description": "seconds, on rate_limited and slow_mode",
                },
                "expires_in": {
                    "type": "number",
                    "description": "seconds until a ban or mute ends, on banned and muted "
                    "(absent: until lifted)",
                },
                "slow_mode": {"type": "integer", "description": "the room's setting, on slow_mode"},
                "room": {**v.ROOM, "description": "on wrong_room_kind: the room"},
                "kind": {
                    "enum": [kind.value for kind in SUPPORTED],
                    "description": "on wrong_room_kind: the kind of the room's namespace "
                    "(NAMESPACES_FILE)",
                },
                "outcome": {
                    "type": "string",
                    "enum": ["unknown"],
                    "description": "on a 503 unavailable whose write was sent without an "
                    "answer: it may have been stored (retry with the same Idempotency-Key)",
                },
            },
        }
    },
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
    props: dict[str, Any] = {
        "event": name,
        "data": {"type": "string", "contentMediaType": "application/json", "description": data},
    }
    if with_id:
        props["id"] = {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "the seq: of a message, or of a state room's snapshot or write",
        }
    props["retry"] = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "required": ["data"],
        "properties": props,
        "additionalProperties": False,
    }


ROOM_EVENT = _event(
    {
        "type": "string",
        "description": "message, presence, or a name given to /v1/publish; in a state "
        "room snapshot, then state",
    },
    "a message, presence change or ephemeral event; in a state room a snapshot "
    '{"room", "seq", "values"} or a write {"room", "seq", "key", "value" | "deleted", '
    '"updated_at"}',
    with_id=True,
)
STATS_EVENT = _event({"const": "stats"}, "a snapshot of the figures (docs/API.md)", with_id=False)


def _json(
    schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = headers
    return out


def _errors(*codes: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        status, meaning = CODES[code]
        entry = out.setdefault(str(status), _json({"$ref": _REF + "Error"}, ""))
        entry["description"] = "; ".join(filter(None, [entry["description"], f"{code}: {meaning}"]))
        if code in ("rate_limited", "slow_mode"):
            entry["headers"] = {
                **RATE_HEADERS,
                "Retry-After": {"description": "whole seconds, at least 1", **_INT_HEADER},
            }
    return out


def _add_errors(operation: dict[str, Any], *codes: str) -> None:
    """More error codes on an operation's responses, merged into its entries."""
    responses = operation["responses"]
    for status, entry in _errors(*codes).items():
        if status in responses:
            # A copy: operations may share one entry (PATCH and DELETE of a message do).
            held = responses[status] = dict(responses[status])
            held["description"] = "; ".join(
                filter(None, [held["description"], entry["description"]])
            )
            if "headers" in entry:
                held.setdefault("headers", entry["headers"])
        else:
            responses[status] = entry


# The routes moderation refuses on (chat_gateway.delivery.moderation), and with what.
MODERATED: dict[tuple[str, str], tuple[str, ...]] = {
    ("/v1/rooms/{room}/messages", "post"): ("banned", "muted", "slow_mode"),
    ("/v1/rooms/{room}/messages", "get"): ("banned",),
    ("/v1/rooms/{room}/events", "get"): ("banned",),
    ("/v1/rooms/{room}/read", "get"): ("banned",),
    ("/v1/rooms/{room}/read", "post"): ("banned",),
    ("/v1/rooms/{room}/messages/{seq}", "patch"): ("banned", "muted"),
    ("/v1/rooms/{room}/messages/{seq}", "delete"): ("banned",),
    ("/v1/rooms/{room}/messages/{seq}/reactions", "post"): ("banned", "muted"),
    ("/v1/rooms/{room}/messages/{seq}/reactions/{reaction}", "delete"): ("banned", "muted"),
    ("/v1/rooms/{room}/messages/{seq}/replies", "get"): ("banned",),
    ("/v1/rooms/{room}/messages/{seq}/versions", "get"): ("banned",),
}

# The routes the publish hook (PUBLISH_HOOK_URL, chat_gateway.delivery.publish_hook)
# may refuse on: a user's post or edit.
HOOKED: tuple[tuple[str, str], ...] = (
    ("/v1/rooms/{room}/messages", "post"),
    ("/v1/rooms/{room}/messages/{seq}", "patch"),
)


def state_paths() -> dict[str, Any]:
    """State rooms (chat_gateway.api.state): an API key, or a user where the
    namespace's client_publish is true; every route answers 409 wrong_room_kind
    outside state rooms."""
    either: list[dict[str, list[str]]] = [{"apiKey": []}, {"userToken": []}, {}]
    key_param = {"name": "key", "in": "path", "required": True, "schema": v.STATE_KEY}
    write_errors = _errors(
        "invalid_json",
        "invalid_request",
        "unauthorized",
        "forbidden",
        "banned",
        "muted",
        "slow_mode",
        "wrong_room_kind",
        "too_large",
        "rate_limited",
        "unavailable",
    )
    written = _json({"$ref": _REF + "StateWrite"}, "written: the seq it took", RATE_HEADERS)
    return {
        "/v1/rooms/{room}/state": {
            "get": {
                "summary": "Every live key of a state room, at the room's seq",
                "security": either,
                "parameters": [ROOM_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "seq", "values"],
                            "properties": {
                                "room": v.ROOM,
                                "seq": _SEQ,
                                "values": {"$ref": _REF + "StateValues"},
                            },
                        },
                        "the values",
                    ),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "banned",
                        "wrong_room_kind",
                        "unavailable",
                    ),
                },
            },
            "patch": {
                "summary": "Set and delete keys in one transaction, contiguous seqs (set "
                "first, in order, then delete); a bad entry writes nothing",
                "security": either,
                "parameters": [ROOM_PARAM],
                "requestBody": _body("PatchState"),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "seq", "writes"],
                            "properties": {
                                "room": v.ROOM,
                                "seq": {"type": "integer", "description": "the last write's"},
                                "writes": {"type": "array", "items": {"$ref": _REF + "StateWrite"}},
                            },
                        },
                        "written",
                        RATE_HEADERS,
                    ),
                    **write_errors,
                },
            },
        },
        "/v1/rooms/{room}/state/{key}": {
            "put": {
                "summary": "Set a key of a state room; the write takes the room's next seq",
                "security": either,
                "parameters": [ROOM_PARAM, key_param],
                "requestBody": _body("PutState"),
                "responses": {"200": written, **write_errors},
            },
            "delete": {
                "summary": "Delete a key (a tombstone subscribers resuming learn of)",
                "security": either,
                "parameters": [ROOM_PARAM, key_param],
                "responses": {"200": written, **write_errors},
            },
        },
    }


def moderation_paths() -> dict[str, Any]:
    """Bans, mutes, slow mode, the log (chat_gateway.api.moderation): an API key or
    a token whose ``moderate`` claim grants the room."""
    by: list[dict[str, list[str]]] = [{"apiKey": []}, {"userToken": []}]
    restriction = {
        "type": "object",
        "required": ["user", "reason", "by", "created_at", "expires_at"],
        "properties": {
            "user": {"type": "string"},
            "reason": {"type": "string"},
            "by": {"type": "string", "description": "the moderator's sub, or api_key"},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    entry = {"$ref": _REF + "ModerationAction"}
    user_param = {"name": "user", "in": "path", "required": True, "schema": v.MODERATED_USER}
    refusals = ("invalid_json", "invalid_request", "unauthorized", "forbidden", "too_large")
    paths: dict[str, Any] = {}
    for name, what in (("bans", "ban"), ("mutes", "mute")):
        paths[f"/v1/rooms/{{room}}/{name}"] = {
            "post": {
                "summary": f"{what} a user in the room (duration seconds; absent: until lifted)",
                "security": by,
                "parameters": [ROOM_PARAM],
                "requestBody": _body("Restriction"),
                "responses": {
                    "201": _json(entry, "in force on every instance"),
                    **_errors(*refusals, "unavailable"),
                },
            },
            "get": {
                "summary": f"the room's active {name}, by user",
                "security": by,
                "parameters": [ROOM_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "room": v.ROOM,
                                name: {"type": "array", "items": restriction},
                            },
                        },
                        "",
                    ),
                    **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
                },
            },
        }
        paths[f"/v1/rooms/{{room}}/{name}/{{user}}"] = {
            "delete": {
                "summary": f"lift a user's {what} in the room",
                "security": by,
                "parameters": [ROOM_PARAM, user_param],
                "responses": {
                    "200": _json(entry, "lifted on every instance"),
                    **_errors(
                        "invalid_request", "unauthorized", "forbidden", "not_found", "unavailable"
                    ),
                },
            }
        }
    settings = _json(
        {"type": "object", "properties": {"room": v.ROOM, "slow_mode": {"type": "integer"}}}, ""
    )
    paths["/v1/rooms/{room}/settings"] = {
        "put": {
            "summary": "set the room's slow mode (seconds between two posts of a user; 0: off)",
            "security": by,
            "parameters": [ROOM_PARAM],
            "requestBody": _body("RoomSettings"),
            "responses": {"200": settings, **_errors(*refusals, "unavailable")},
        },
        "get": {
            "summary": "the room's settings (whoever may read the room)",
            "security": USER,
            "parameters": [ROOM_PARAM],
            "responses": {
                "200": settings,
                **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
            },
        },
    }
    paths["/v1/rooms/{room}/moderation"] = {
        "get": {
            "summary": "the room's moderation log, newest first",
            "security": by,
            "parameters": [ROOM_PARAM, *_query(v.MODERATION_LOG_QUERY)],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["room", "actions", "next_cursor"],
                        "properties": {
                            "room": v.ROOM,
                            "actions": {"type": "array", "items": entry},
                            "next_cursor": {"type": ["string", "null"]},
                        },
                    },
                    "a page",
                ),
                **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
            },
        }
    }
    return paths


MODERATION_ACTION: dict[str, Any] = {
    "type": "object",
    "required": ["id", "room", "action", "by", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "room": v.ROOM,
        "action": {
            "type": "string",
            "enum": ["banned", "unbanned", "muted", "unmuted", "slow_mode"],
        },
        "user": {"type": "string", "description": "all but slow_mode"},
        "reason": {"type": "string", "description": "all but slow_mode"},
        "expires_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "banned and muted: null until lifted",
        },
        "slow_mode": {"type": "integer", "description": "slow_mode: the new setting"},
        "by": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
    },
}


def _query(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema["properties"].items()
    ]


ROOM_PARAM = {"name": "room", "in": "path", "required": True, "schema": v.ROOM}
USER: list[dict[str, list[str]]] = [{"userToken": []}, {}]
# As on /v1/publish: in open mode with API_KEYS unset, no key is asked for.
ADMIN: list[dict[str, list[str]]] = [{"apiKey": []}, {}]


KEY_ONLY: list[dict[str, list[str]]] = [{"apiKey": []}]


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": _REF + name}}}}


def server_paths() -> dict[str, Any]:
    """The server API (chat_gateway.api.server): an API key always, every instance acts."""
    accepted = _json({"type": "object"}, "sent to every instance")
    rooms_item = {
        "type": "object",
        "required": ["room", "subscribers", "latest_seq"],
        "properties": {
            "room": v.ROOM,
            "subscribers": {"type": "integer"},
            "latest_seq": {"type": "integer"},
        },
    }
    return {
        "/v1/server/disconnect": {
            "post": {
                "summary": "close every connection of a user on every instance (WS 4001)",
                "security": KEY_ONLY,
                "requestBody": _body("ServerDisconnect"),
                "responses": {
                    "202": accepted,
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "too_large",
                        "unavailable",
                    ),
                },
            }
        },
        "/v1/server/unsubscribe": {
            "post": {
                "summary": "end a user's subscriptions to a room on every instance",
                "security": KEY_ONLY,
                "requestBody": _body("ServerUnsubscribe"),
                "responses": {
                    "202": accepted,
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "too_large",
                        "unavailable",
                    ),
                },
            }
        },
        "/v1/server/rooms": {
            "get": {
                "summary": "rooms with subscribers on any instance, by name, paged",
                "security": KEY_ONLY,
                "parameters": _query(v.ROOMS_QUERY),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["rooms", "next"],
                            "properties": {
                                "rooms": {"type": "array", "items": rooms_item},
                                "next": {
                                    "type": ["string", "null"],
                                    "description": "the cursor of the next page; null: last",
                                },
                            },
                        },
                        "a page of rooms",
                    ),
                    **_errors("invalid_request", "unauthorized", "unavailable"),
                },
            }
        },
        "/v1/server/rooms/{room}": {
            "get": {
                "summary": "a room across instances: subscribers, present users, latest seq",
                "security": KEY_ONLY,
                "parameters": [ROOM_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "subscribers", "presence", "latest_seq"],
                            "properties": {
                                "room": v.ROOM,
                                "subscribers": {"type": "integer"},
                                "presence": {"type": "integer"},
                                "latest_seq": {"type": "integer"},
                            },
                        },
                        "the room",
                    ),
                    **_errors("invalid_request", "unauthorized", "unavailable"),
                },
            }
        },
        "/v1/server/rooms/{room}/messages": {
            "delete": {
                "summary": "purge the room's history; seqs are never reused",
                "security": KEY_ONLY,
                "parameters": [ROOM_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "removed"],
                            "properties": {"room": v.ROOM, "removed": {"type": "integer"}},
                        },
                        "purged; every instance told",
                    ),
                    **_errors("invalid_request", "unauthorized", "unavailable"),
                },
            }
        },
        "/v1/server/broadcast": {
            "post": {
                "summary": f"one ephemeral event to 1..{v.MAX_BROADCAST_ROOMS} rooms",
                "security": KEY_ONLY,
                "requestBody": _body("ServerBroadcast"),
                "responses": {
                    "202": _json({"type": "object"}, "published", RATE_HEADERS),
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "too_large",
                        "rate_limited",
                        "unavailable",
                    ),
                },
            }
        },
    }


def _reader_query(open_mode: bool) -> list[dict[str, Any]]:
    """``?user=`` of the read routes: whose position, required in open mode only."""
    return [{**p, "required": open_mode} for p in _query(v.READ_QUERY)]


def chat_paths(open_mode: bool) -> dict[str, Any]:
    """Edits, deletes and read positions (chat_gateway.api.chat)."""
    seq_param = {"name": "seq", "in": "path", "required": True, "schema": v.MESSAGE_SEQ}
    changed = _json({"$ref": _REF + "Message"}, "", RATE_HEADERS)
    either: list[dict[str, list[str]]] = [{"userToken": []}, {"apiKey": []}, {}]
    position = {
        "type": "object",
        "required": ["room", "seq", "unread", "mentions"],
        "properties": {
            "room": v.ROOM,
            "seq": {"type": "integer"},
            "unread": {"type": "integer", "description": "messages after seq, tombstones included"},
            "mentions": {
                "type": "integer",
                "minimum": 0,
                "description": "unread messages mentioning the user (after seq, not "
                "deleted, not the user's own)",
            },
        },
    }
    change_errors = _errors(
        "invalid_json",
        "invalid_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "wrong_room_kind",
        "too_large",
        "rate_limited",
        "unavailable",
    )
    reaction_errors = _errors(
        "invalid_json",
        "invalid_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "message_deleted",
        "wrong_room_kind",
        "too_large",
        "rate_limited",
        "unavailable",
    )
    return {
        "/v1/rooms/{room}/messages/{seq}": {
            "patch": {
                "summary": "Edit a message: its author, or an API key for any",
                "security": either,
                "parameters": [ROOM_PARAM, seq_param],
                "requestBody": _body("EditMessage"),
                "responses": {
                    "200": {
                        **changed,
                        "description": "the message as edited (the same text: unchanged)",
                    },
                    **change_errors,
                },
            },
            "delete": {
                "summary": "Delete a message, keeping a tombstone at its seq",
                "security": either,
                "parameters": [ROOM_PARAM, seq_param],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"$ref": _REF + "DeleteMessage"}}},
                },
                "responses": {
                    "200": {
                        **changed,
                        "description": "the tombstone (a repeat: the same tombstone)",
                    },
                    **change_errors,
                },
            },
        },
        "/v1/rooms/{room}/messages/{seq}/reactions": {
            "post": {
                "summary": "Add the caller's reaction to a message (once per user)",
                "security": USER,
                "parameters": [ROOM_PARAM, seq_param],
                "requestBody": _body("React"),
                "responses": {
                    "200": {**changed, "description": "the message with its reactions"},
                    **reaction_errors,
                },
            },
        },
        "/v1/rooms/{room}/messages/{seq}/reactions/{reaction}": {
            "delete": {
                "summary": "Remove the caller's reaction from a message",
                "security": USER,
                "parameters": [
                    ROOM_PARAM,
                    seq_param,
                    {"name": "reaction", "in": "path", "required": True, "schema": v.REACTION},
                    *[{**p, "required": open_mode} for p in _query(v.REACT_QUERY)],
                ],
                "responses": {
                    "200": {**changed, "description": "the message with its reactions"},
                    **reaction_errors,
                },
            },
        },
        "/v1/rooms/{room}/messages/{seq}/replies": {
            "get": {
                "summary": "The replies to a message, ascending by seq",
                "description": "Read as history is (the same grants). A deleted message's "
                "replies answer 404, as the message is gone; a deleted reply is its "
                "tombstone.",
                "security": USER,
                "parameters": [ROOM_PARAM, seq_param, *_query(v.REPLIES_QUERY)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["messages", "has_more", "next"],
                            "properties": {
                                "messages": {"type": "array", "items": {"$ref": _REF + "Message"}},
                                "has_more": {"type": "boolean"},
                                "next": {
                                    "type": ["integer", "null"],
                                    "description": "pass as after for the next page; null: no more",
                                },
                            },
                        },
                        "a page of replies",
                    ),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "not_found",
                        "wrong_room_kind",
                        "unavailable",
                    ),
                },
            },
        },
        "/v1/rooms/{room}/messages/{seq}/versions": {
            "get": {
                "summary": "The earlier texts of an edited message",
                "description": "For the message's author, a moderator of the room or an "
                "API key; others get 403. A deleted message has none left (404).",
                "security": either,
                "parameters": [ROOM_PARAM, seq_param, *_reader_query(open_mode)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "seq", "version", "versions"],
                            "properties": {
                                "room": v.ROOM,
                                "seq": {"type": "integer", "minimum": 1},
                                "version": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "description": "the message's version now",
                                },
                                "versions": {
                                    "type": "array",
                                    "items": {"$ref": _REF + "Version"},
                                    "description": "oldest first; empty: never edited",
                                },
                            },
                        },
                        "the earlier texts",
                    ),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "not_found",
                        "wrong_room_kind",
                        "unavailable",
                    ),
                },
            },
        },
        "/v1/rooms/{room}/read": {
            "post": {
                "summary": "Mark the room read up to seq; the position never moves back",
                "security": USER,
                "parameters": [ROOM_PARAM],
                "requestBody": _body("MarkRead"),
                "responses": {
                    "200": _json(position, "the position now"),
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "wrong_room_kind",
                        "too_large",
                        "rate_limited",
                        "unavailable",
                    ),
                },
            },
            "get": {
                "summary": "The caller's read position and unread count in the room",
                "security": USER,
                "parameters": [ROOM_PARAM, *_reader_query(open_mode)],
                "responses": {
                    "200": _json(position, "the position"),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "wrong_room_kind",
                        "unavailable",
                    ),
                },
            },
        },
        "/v1/search": {
            "get": {
                "summary": "Full-text search, newest first, in the rooms the caller may read",
                "description": "Highlights are [start, end) offsets into the message's "
                "text counted in code points (Python str indices), never markup. A "
                "deleted message is never found, an edited one only by its current text.",
                "security": USER,
                "parameters": [
                    {**p, "required": p["name"] == "q"}
                    | ({"style": "form", "explode": True} if p["name"] == "room" else {})
                    for p in _query(v.SEARCH_QUERY)
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["results", "next_cursor"],
                            "properties": {
                                "results": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["message", "highlights"],
                                        "properties": {
                                            "message": {"$ref": _REF + "Message"},
                                            "highlights": {
                                                "type": "array",
                                                "items": {
                                                    "type": "array",
                                                    "items": {"type": "integer", "minimum": 0},
                                                    "minItems": 2,
                                                    "maxItems": 2,
                                                },
                                            },
                                        },
                                    },
                                },
                                "next_cursor": {
                                    "type": ["string", "null"],
                                    "description": "pass as cursor for the next page; "
                                    "null: no more",
                                },
                            },
                        },
                        "a page of matches",
                        RATE_HEADERS,
                    ),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "rate_limited",
                        "unavailable",
                        # many long room names can pass the request line's limit
                        "headers_too_large",
                    ),
                },
            }
        },
        "/v1/read": {
            "get": {
                "summary": (
                    "Every room the caller has a read position or unread mentions in,"
                    " with unread counts"
                ),
                "security": USER,
                "parameters": _reader_query(open_mode),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["rooms"],
                            "properties": {"rooms": {"type": "array", "items": position}},
                        },
                        "by room name",
                    ),
                    **_errors("invalid_request", "unauthorized", "unavailable"),
                },
            }
        },
    }


def document(open_mode: bool = False) -> dict[str, Any]:
    """The document; ``open_mode``: as served by an instance without user tokens,
    where a read position's ``user`` is required."""
    ok_message = _json({"$ref": _REF + "Message"}, "", RATE_HEADERS)
    paths: dict[str, Any] = {
        "/v1/rooms/{room}/messages": {
            "post": {
                "summary": "Post a message",
                "security": USER,
                "parameters": [
                    ROOM_PARAM,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": v.MAX_IDEMPOTENCY_KEY,
                        },
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "PostMessage"}}},
                },
                "responses": {
                    "201": {**ok_message, "description": "stored"},
                    "200": {
                        **ok_message,
                        "description": "a repeat of an Idempotency-Key "
                        "by the same identity with the same "
                        "body: the first message",
                    },
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "not_found",
                        "message_deleted",
                        "idempotency_conflict",
                        "wrong_room_kind",
                        "too_large",
                        "rate_limited",
                        "unavailable",
                    ),
                },
            },
            "get": {
                "summary": "Read history, ascending by seq",
                "security": USER,
                "parameters": [ROOM_PARAM, *_query(v.HISTORY_QUERY)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["messages", "has_more"],
                            "properties": {
                                "messages": {"type": "array", "items": {"$ref": _REF + "Message"}},
                                "has_more": {"type": "boolean"},
                            },
                        },
                        "a page",
                    ),
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "wrong_room_kind",
                        "unavailable",
                    ),
                },
            },
        },
        "/v1/rooms/{room}/events": {
            "get": {
                "summary": "Server-Sent Events of a room; resume with Last-Event-ID or since",
                "security": USER,
                "parameters": [
                    ROOM_PARAM,
                    *_query(v.EVENTS_QUERY),
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": v.SEQ},
                ],
                "responses": {
                    "200": {
                        "description": "the event stream",
                        "headers": RATE_HEADERS,
                        "content": {"text/event-stream": {"schema": {"$ref": _REF + "RoomEvent"}}},
                    },
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "forbidden",
                        "rate_limited",
                        "too_many_connections",
                        "unavailable",
                    ),
                },
            }
        },
        "/v1/rooms/{room}/presence": {
            "get": {
                "summary": "who is in the room, on any instance",
                "security": USER,
                "parameters": [ROOM_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["room", "users"],
                            "properties": {
                                "room": v.ROOM,
                                "users": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "the users, sorted",
                    ),
                    **_errors("invalid_request", "unauthorized", "forbidden", "unavailable"),
                },
            }
        },
        "/v1/ws": {
            "get": {
                "summary": "WebSocket upgrade; JSON text frames, see x-frames",
                "security": USER,
                "parameters": _query(v.WS_QUERY),
                "responses": {
                    "101": {"description": "switching protocols", "headers": RATE_HEADERS},
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "rate_limited",
                        "too_many_connections",
                        "upgrade_required",
                        "unavailable",
                    ),
                },
                "x-frames": {kind: {"$ref": _REF + f"Frame.{kind}"} for kind in v.FRAMES},
                "x-server-frames": {
                    kind: {"$ref": _REF + f"ServerFrame.{kind}"} for kind in SERVER_FRAMES
                },
            }
        },
        "/v1/publish": {
            "post": {
                "summary": "Fan out an ephemeral event (not stored, no seq)",
                "security": [{"apiKey": []}, {}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "Publish"}}},
                },
                "responses": {
                    "202": _json({"type": "object"}, "accepted", RATE_HEADERS),
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "too_large",
                        "rate_limited",
                        "unavailable",
                    ),
                },
            }
        },
        "/v1/stats/events": {
            "get": {
                "summary": "live figures as SSE, one `stats` event per interval: this "
                "instance's, or with scope=cluster the sum over every instance; "
                "in auth mode an API key (Bearer or ?key=) is required",
                "security": [{"apiKey": []}, {}],
                "parameters": _query(v.STATS_QUERY),
                "responses": {
                    "200": {
                        "description": "the event stream",
                        "content": {"text/event-stream": {"schema": {"$ref": _REF + "StatsEvent"}}},
                    },
                    **_errors(
                        "invalid_request",
                        "unauthorized",
                        "rate_limited",
                        "too_many_connections",
                        "unavailable",
                    ),
                },
            }
        },
        **server_paths(),
        "/v1/admin/webhooks": {
            "get": {
                "summary": "webhook receivers: breaker state (this instance), backlog",
                "security": ADMIN,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["endpoints"],
                            "properties": {
                                "endpoints": {
                                    "type": "array",
                                    "items": {"$ref": _REF + "WebhookEndpoint"},
                                }
                            },
                        },
                        "the receivers in WEBHOOK_URLS order",
                    ),
                    **_errors("invalid_request", "unauthorized", "unavailable"),
                },
            }
        },
        "/v1/admin/webhooks/dead": {
            "get": {
                "summary": "dead-lettered webhook events, newest first, paged by `next`",
                "security": ADMIN,
                "parameters": _query(v.DEAD_QUERY),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["dead", "next"],
                            "properties": {
                                "dead": {
                                    "type": "array",
                                    "items": {"$ref": _REF + "WebhookDeadLetter"},
                                },
                                "next": {
                                    "type": ["integer", "null"],
                                    "description": "pass as before= for the next page",
                                },
                            },
                        },
                        "a page",
                    ),
                    **_errors("invalid_request", "unauthorized", "not_found", "unavailable"),
                },
            }
        },
        "/v1/admin/webhooks/replay": {
            "post": {
                "summary": "send events again: dead letters by id, or every event of a time range",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "WebhookReplay"}}},
                },
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "required": ["replayed"],
                            "properties": {"replayed": {"type": "integer"}},
                        },
                        "pending again, due now",
                    ),
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "not_found",
                        "too_large",
                        "unavailable",
                    ),
                },
            }
        },
        "/v1/admin/webhooks/enable": {
            "post": {
                "summary": "enable a receiver disabled by a 410 Gone; its backlog drains in order",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "WebhookEnable"}}},
                },
                "responses": {
                    "200": _json({"$ref": _REF + "WebhookEndpoint"}, "enabled"),
                    **_errors(
                        "invalid_json",
                        "invalid_request",
                        "unauthorized",
                        "not_found",
                        "too_large",
                        "unavailable",
                    ),
                },
            }
        },
        **chat_paths(open_mode),
        **moderation_paths(),
        **state_paths(),
        "/healthz": {
            "get": {"summary": "liveness", "responses": {"200": _json({"type": "object"}, "alive")}}
        },
        "/readyz": {
            "get": {
                "summary": "readiness per dependency",
                "responses": {
                    "200": _json({"type": "object"}, "ready"),
                    "503": _json({"type": "object"}, "a dependency is down"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition; METRICS_KEY or an API key when "
                "METRICS_KEY is set or auth is on",
                "security": ADMIN,
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("unauthorized"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
    }
    for (path, method), codes in MODERATED.items():
        _add_errors(paths[path][method], *codes)
    for path, method in HOOKED:
        _add_errors(paths[path][method], "rejected")
    schemas: dict[str, Any] = {
        "Restriction": v.RESTRICTION_BODY,
        "RoomSettings": v.SETTINGS_BODY,
        "ModerationAction": MODERATION_ACTION,
        "Message": MESSAGE,
        "Reactions": REACTIONS,
        "Thread": THREAD,
        "Version": {
            "type": "object",
            "required": ["version", "text", "edited_at"],
            "properties": {
                "version": {"type": "integer", "minimum": 1, "description": "1: as posted"},
                "text": {"type": "string"},
                "edited_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "when the edit that replaced this text was made",
                },
            },
        },
        "Error": ERROR,
        "RoomEvent": ROOM_EVENT,
        "StatsEvent": STATS_EVENT,
        "PostMessage": v.POST_MESSAGE,
        "Publish": v.PUBLISH,
        "PutState": v.PUT_STATE,
        "PatchState": v.PATCH_STATE,
        "StateValues": STATE_VALUES,
        "StateWrite": STATE_WRITE,
    }
    schemas.update(
        {
            "ServerDisconnect": v.DISCONNECT,
            "ServerUnsubscribe": v.UNSUBSCRIBE,
            "ServerBroadcast": v.BROADCAST,
        }
    )
    schemas.update(
        {
            "EditMessage": v.EDIT_MESSAGE,
            "DeleteMessage": v.DELETE_MESSAGE,
            "React": {**v.REACT, "required": ["reaction", "user"]} if open_mode else v.REACT,
            "MarkRead": (
                {**v.MARK_READ, "required": ["seq", "user"]} if open_mode else v.MARK_READ
            ),
        }
    )
    schemas.update({f"Frame.{kind}": schema for kind, schema in v.FRAMES.items()})
    schemas.update({f"ServerFrame.{kind}": schema for kind, schema in SERVER_FRAMES.items()})
    schemas.update(
        {
            "WebhookEndpoint": wh.ENDPOINT,
            "WebhookDeadLetter": wh.DEAD_LETTER,
            "WebhookReplay": v.REPLAY,
            "WebhookEnable": v.ENABLE,
        }
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chat-gateway",
            "version": "1",
            "description": "Realtime chat: HTTP, WebSocket and SSE. Errors are "
            '{"error": {"code", "message"}}.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "userToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "HS256 (AUTH_SECRET) or RS256/384/512, ES256/384, "
                    "EdDSA (AUTH_JWKS_URL, AUTH_PUBLIC_KEY); claims "
                    "sub, exp (numeric), optional rooms and "
                    "read_rooms, iss/aud when configured; on /v1/ws "
                    "and SSE also ?token=; renewed on a WebSocket "
                    "by the refresh frame",
                },
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "one of API_KEYS; with auth on and API_KEYS unset, "
                    "every request is refused",
                },
            },
        },
    }

"""Declared shapes for everything that enters: bodies, query parameters, frames.

Each check raises ``ApiError`` with the documented code before anything is
written, so bad input changes nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from chat_gateway.core.text import flaw
from chat_gateway.errors import ApiError
from chat_gateway.storage import search

ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
EVENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_TEXT = 4000
MAX_AUTHOR = 64
MAX_REF = 128
MAX_IDEMPOTENCY_KEY = 128
# SSE event names the gateway itself sends; a backend's event may not take them.
RESERVED_EVENTS = {
    "message",
    "error",
    "presence",
    "disconnected",
    "unsubscribed",
    "history_purged",
    "message_updated",
    "message_deleted",
    "reactions_updated",
    "thread_updated",
    "typing",
    "read",
}
MAX_SEQ = 2**62 - 1
MAX_LIMIT = 200
MAX_SAFE_INT = 2**53 - 1  # integers every JSON client reads exactly

# -- declared shapes (JSON Schema): the checks below enforce them, the OpenAPI
# document (src/chat_gateway/server/openapi.py) publishes them, the fuzz test generates from them.

# Whitespace, as both regex dialects count it: ECMA-262's \s (what a JSON Schema
# pattern means to its readers) and Python's str.isspace (what str.strip trims)
# differ in \x1c-\x1f, \x85 and \ufeff, so the schema and the checks name the union.
BLANK = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
    "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_BLANK_CLASS = (
    r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_PRINTABLE = rf"^[^\x00]*[^\x00{_BLANK_CLASS}][^\x00]*$"  # something besides whitespace, no NUL
ROOM: dict[str, Any] = {"type": "string", "pattern": f"^{ROOM_RE.pattern}$", "maxLength": 128}
EVENT: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{EVENT_RE.pattern}$",
    "maxLength": 64,
    "not": {"enum": sorted(RESERVED_EVENTS)},
}
TEXT: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TEXT,
    "pattern": _PRINTABLE,
    "description": f"1..{MAX_TEXT} characters after trimming; no NUL",
}
AUTHOR: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_AUTHOR,
    "pattern": _PRINTABLE,
    "description": "open mode only; with auth the token's sub is used",
}
SEQ: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}
LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}
REF: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "maxLength": MAX_REF},
        {"type": "integer", "minimum": -MAX_SAFE_INT, "maximum": MAX_SAFE_INT},
    ],
    "description": "echoed in the ack or error frame",
}
IDEMPOTENCY_KEY: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_IDEMPOTENCY_KEY,
    "pattern": r"^[^\x00]*$",
    "description": "as the Idempotency-Key header (no NUL): a repeat "
    "in the same room is acked with the first message",
}
TOKEN: dict[str, Any] = {
    "type": "string",
    "description": "a user token (JWT), where a browser cannot send an Authorization header",
}


def object_schema(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _frame(kind: str, required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return object_schema(["type", *required], type={"const": kind}, **properties)


# Replies and mentions on a post (HTTP body and WS publish frame).
MAX_MENTION = 128
MAX_MENTIONS = 50
REPLY_TO: dict[str, Any] = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_SEQ,
    "description": "the seq of a message of the same room this one replies to "
    "(404 not_found when there is none, 409 message_deleted when it is deleted)",
}
MENTION: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_MENTION,
    "pattern": _PRINTABLE,
    "description": "a user id (a token's sub) as given: no NUL, not blank",
}
MENTIONS: dict[str, Any] = {
    "type": "array",
    "items": MENTION,
    "maxItems": MAX_MENTIONS,
    "description": f"at most {MAX_MENTIONS} user ids the message mentions; repeats are kept once",
}
POST_MESSAGE = object_schema(
    ["text"], text=TEXT, author=AUTHOR, reply_to=REPLY_TO, mentions=MENTIONS
)
PUBLISH = object_schema(["room", "event"], room=ROOM, event=EVENT, data={"type": "object"})
HISTORY_QUERY = object_schema([], limit=LIMIT, before=SEQ, after=SEQ)
PRESENCE_USER: dict[str, Any] = {
    **AUTHOR,
    "description": "open mode only: the name this connection is shown under in presence",
}
CHANGES_SINCE: dict[str, Any] = {
    **SEQ,
    "description": "resume edits and deletes: every "
    "change numbered after this one (docs/delivery.md)",
}
EVENTS_QUERY = object_schema(
    [],
    since=SEQ,
    changes_since=CHANGES_SINCE,
    conflate_ms={
        "type": "integer",
        "minimum": 0,
        "maximum": 60000,
        "description": "state and ephemeral rooms: at most one event per key (an event's "
        "name) per this many ms, the newest; 0: every update; absent: the namespace's",
    },
    token=TOKEN,
    user=PRESENCE_USER,
)
WS_QUERY = object_schema([], token=TOKEN, user=PRESENCE_USER)
NO_QUERY = object_schema([])  # for routes that take no query parameters
# GET /v1/search (chat_gateway.storage.search: the query language and its bounds)
SEARCH_QUERY = object_schema(
    ["q"],
    q={
        "type": "string",
        "minLength": 1,
        "maxLength": search.MAX_QUERY_CHARS,
        "description": 'words (the last one also as a prefix), "quoted phrases", -excluded words',
    },
    room={
        "type": "array",
        "items": ROOM,
        "maxItems": search.MAX_ROOMS,
        "description": "repeat to search only these rooms (each must be readable); "
        "absent: every room the caller may read",
    },
    limit={**LIMIT, "maximum": search.MAX_LIMIT, "default": 20},
    cursor={
        "type": "string",
        "pattern": f"^{search.CURSOR_RE.pattern}$",
        "description": "next_cursor of the previous page",
    },
)
# Chat: edits, deletes, read positions.
MESSAGE_SEQ: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}
READER: dict[str, Any] = {
    **AUTHOR,
    "description": "open mode only: whose read position; with auth the token's sub is used",
}
EDIT_MESSAGE = object_schema(["text"], text=TEXT, author=AUTHOR)
DELETE_MESSAGE = object_schema([], author=AUTHOR)
MARK_READ = object_schema(["seq"], seq=SEQ, user=READER)
READ_QUERY = object_schema([], user=READER)
# Reactions: a user's own, on a message.
MAX_REACTION = 32
REACTION: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_REACTION,
    "pattern": _PRINTABLE,
    "description": f"1..{MAX_REACTION} characters (an emoji or a short name), trimmed; "
    "no NUL, no lone surrogates",
}
REACTOR: dict[str, Any] = {
    **AUTHOR,
    "description": "open mode only: who reacts; with auth the token's sub is used",
}
REACT = object_schema(["reaction"], reaction=REACTION, user=REACTOR)
REACT_QUERY = object_schema([], user=REACTOR)
CHANGE_KEY: dict[str, Any] = {
    **IDEMPOTENCY_KEY,
    "description": "as the Idempotency-Key "
    "header on PATCH/DELETE: a repeat in the same room changes "
    "nothing and is acked with the message as it is",
}
# The server API (chat_gateway.api.server): a backend steers the gateway.
MAX_USER = 128
MAX_CLOSE_REASON_BYTES = 120  # it travels in a WebSocket close frame (at most 123 bytes)
MAX_BROADCAST_ROOMS = 100
SERVER_USER: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_USER,
    "pattern": r"^[^\x00]*$",
    "description": "a token's sub, or the ?user= of an open-mode connection",
}
CLOSE_REASON: dict[str, Any] = {
    "type": "string",
    "maxLength": MAX_CLOSE_REASON_BYTES,
    "default": "",
    "pattern": r"^[^\x00]*$",
    "description": f"at most {MAX_CLOSE_REASON_BYTES} bytes in UTF-8",
}
DISCONNECT = object_schema(["user"], user=SERVER_USER, reason=CLOSE_REASON)
UNSUBSCRIBE = object_schema(["user", "room"], user=SERVER_USER, room=ROOM, reason=CLOSE_REASON)
BROADCAST = object_schema(
    ["rooms", "event"],
    rooms={
        "type": "array",
        "items": ROOM,
        "minItems": 1,
        "maxItems": MAX_BROADCAST_ROOMS,
        "uniqueItems": True,
    },
    event=EVENT,
    data={"type": "object"},
)
ROOMS_QUERY = object_schema(
    [],
    limit={"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    cursor={**ROOM, "description": "the next of the previous page: rooms after this name"},
)
# Moderation (chat_gateway.api.moderation): bans, mutes, slow mode, the log.
MAX_REASON = 500
MAX_DURATION = 10 * 365 * 86400  # ten years, in seconds
MAX_SLOW_MODE = 86400
MODERATED_USER: dict[str, Any] = {
    **SERVER_USER,
    "description": "a token's sub (in open mode: an author or ?user= name)",
}
RESTRICTION_BODY = object_schema(
    ["user"],
    user=MODERATED_USER,
    duration={
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_DURATION,
        "description": "seconds; absent: until lifted",
    },
    reason={"type": "string", "maxLength": MAX_REASON, "default": "", "pattern": r"^[^\x00]*$"},
)
SETTINGS_BODY = object_schema(
    ["slow_mode"],
    slow_mode={
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_SLOW_MODE,
        "description": "seconds between two posts of one user who does not moderate; 0: off",
    },
)
MODERATION_LOG_QUERY = object_schema(
    [],
    limit={**LIMIT, "default": 50},
    cursor={
        "type": "string",
        "pattern": "^[0-9]{1,18}$",
        "description": "next_cursor of the previous page",
    },
)
# Webhook administration (chat_gateway.api.webhooks).
MAX_REPLAY_IDS = 1000
TIMESTAMP: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 with a time zone, e.g. 2026-11-28T06:00:00Z",
}
RECEIVER_URL: dict[str, Any] = {
    "type": "string",
    "description": "a receiver URL as in WEBHOOK_URLS",
}
DEAD_QUERY = object_schema(
    [],
    limit=LIMIT,
    before={
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_SEQ,
        "description": "the next cursor",
    },
    endpoint=RECEIVER_URL,
)
REPLAY_IDS = object_schema(
    ["ids"],
    ids={
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_REPLAY_IDS,
        "items": {"type": "integer", "minimum": 1},
    },
    endpoint=RECEIVER_URL,
)
REPLAY_RANGE = object_schema(
    ["from"], **{"from": TIMESTAMP, "to": TIMESTAMP, "endpoint": RECEIVER_URL}
)
REPLAY = {
    "oneOf": [REPLAY_IDS, REPLAY_RANGE],
    "description": "dead letters by id, or every delivered or dead event committed in "
    "[from, to) (to defaults to now)",
}
ENABLE = object_schema(["url"], url=RECEIVER_URL)
# GET /v1/stats/events (chat_gateway.transports.stats_stream).
INTERVAL: dict[str, Any] = {"type": "number", "minimum": 1, "maximum": 60, "default": 1.0}
SCOPE: dict[str, Any] = {"type": "string", "enum": ["instance", "cluster"], "default": "instance"}
STATS_QUERY = object_schema(
    [],
    interval=INTERVAL,
    scope=SCOPE,
    key={
        "type": "string",
        "description": "an API key, where a browser's "
        "EventSource cannot send an Authorization header (auth mode)",
    },
)
# State rooms (chat_gateway.api.state): a key is named as a room is.
MAX_STATE_WRITES = 100  # keys set, and keys deleted, by one PATCH
STATE_KEY: dict[str, Any] = {**ROOM, "description": "a key: the pattern of a room name"}
STATE_VALUE: dict[str, Any] = {
    "description": "any JSON value (null too), at most STATE_MAX_VALUE_BYTES (16 KiB) "
    "once encoded, nesting at most 32 levels"
}
PUT_STATE = object_schema(["value"], value=STATE_VALUE)
PATCH_STATE = {
    **object_schema(
        [],
        set={
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_STATE_WRITES,
            "propertyNames": STATE_KEY,
            "additionalProperties": STATE_VALUE,
            "description": "key -> value, set in this order",
        },
        delete={
            "type": "array",
            "items": STATE_KEY,
            "minItems": 1,
            "maxItems": MAX_STATE_WRITES,
            "uniqueItems": True,
            "description": "keys deleted after those set (none of them in set)",
        },
    ),
    "minProperties": 1,
}
CONFLATE_MS: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "maximum": 60000,
    "description": "state and ephemeral rooms: at most one frame per key (an event's "
    "name) per this many ms, the newest; 0: every update; absent: the namespace's "
    "conflate_ms",
}
FRAMES: dict[str, dict[str, Any]] = {
    "subscribe": _frame(
        "subscribe",
        ["room"],
        room=ROOM,
        since=SEQ,
        changes_since=CHANGES_SINCE,
        conflate_ms=CONFLATE_MS,
    ),
    "unsubscribe": _frame("unsubscribe", ["room"], room=ROOM),
    "publish": _frame(
        "publish",
        ["room", "text"],
        room=ROOM,
        text=TEXT,
        author=AUTHOR,
        ref=REF,
        key=IDEMPOTENCY_KEY,
        reply_to=REPLY_TO,
        mentions=MENTIONS,
    ),
    "emit": _frame(
        "emit",
        ["room", "event"],
        room=ROOM,
        event=EVENT,
        data={"type": "object", "description": "absent: {}"},
        ref=REF,
    ),
    "ping": _frame("ping", [], ref=REF),
    "refresh": _frame(
        "refresh",
        ["token"],
        token={
            **TOKEN,
            "description": "a new token for the same sub; it replaces the connection's token",
        },
        ref=REF,
    ),
    "edit": _frame(
        "edit",
        ["room", "seq", "text"],
        room=ROOM,
        seq=MESSAGE_SEQ,
        text=TEXT,
        author=AUTHOR,
        ref=REF,
        key=CHANGE_KEY,
    ),
    "delete": _frame(
        "delete",
        ["room", "seq"],
        room=ROOM,
        seq=MESSAGE_SEQ,
        author=AUTHOR,
        ref=REF,
        key=CHANGE_KEY,
    ),
    **{
        kind: _frame(
            kind,
            ["room", "seq", "reaction"],
            room=ROOM,
            seq=MESSAGE_SEQ,
            reaction=REACTION,
            ref=REF,
        )
        for kind in ("react", "unreact")
    },
    "typing": _frame("typing", ["room"], room=ROOM),
    "read": _frame("read", ["room", "seq"], room=ROOM, seq=SEQ, ref=REF),
}


def fields(schema: dict[str, Any]) -> set[str]:
    return set(schema["properties"])


def room_name(value: Any) -> str:
    if not isinstance(value, str) or not ROOM_RE.fullmatch(value):
        raise ApiError(
            "invalid_request", "room must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", field="room"
        )
    return value


def state_key(value: Any) -> str:
    """A state room's key: the pattern of a room name."""
    if not isinstance(value, str) or not ROOM_RE.fullmatch(value):
        raise ApiError(
            "invalid_request", "key must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", field="key"
        )
    return value


def state_value(value: Any, limit: int, name: str = "value") -> bytes:
    """A state value's JSON, compact: any JSON value nesting at most ``MAX_DEPTH``
    levels and at most ``limit`` bytes encoded."""
    if value is ABSENT:
        raise ApiError("invalid_request", f"{name} is required", field=name)
    nesting(value, name)
    encoded = orjson.dumps(value)
    if len(encoded) > limit:
        raise ApiError(
            "invalid_request",
            f"{name} is {len(encoded)} bytes of JSON; at most {limit} (STATE_MAX_VALUE_BYTES)",
            field=name,
            limit=limit,
        )
    return encoded


def conflate_ms(value: Any, name: str = "conflate_ms") -> int | None:
    """``conflate_ms`` of a subscribe frame or SSE query: 0..60000 ms, None when absent."""
    ms = seq_param(value, name) if isinstance(value, str) else seq_field(value, name)
    if ms is not None and ms > 60000:
        raise ApiError("invalid_request", f"{name} must be 0..60000", field=name)
    return ms


def _printable(value: str, name: str) -> None:
    problem = flaw(value)
    if problem is not None:
        raise ApiError("invalid_request", f"{name} {problem}", field=name)


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError("invalid_request", "text must be a string", field="text")
    trimmed: str = value.strip(BLANK)
    if not 1 <= len(trimmed) <= MAX_TEXT:
        raise ApiError(
            "invalid_request", f"text must be 1..{MAX_TEXT} characters after trimming", field="text"
        )
    _printable(trimmed, "text")
    return trimmed


def reaction(value: Any) -> str:
    """A reaction (``REACTION``), trimmed."""
    return _short(value, "reaction", MAX_REACTION)


ABSENT: Any = object()  # a field not given at all (unlike one given as null)


def reply_to(value: Any) -> int | None:
    """A post's ``reply_to``: absent (None), or a message's seq, a JSON number from 1
    (never null: the schema says an integer)."""
    if value is ABSENT:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQ:
        raise ApiError(
            "invalid_request",
            "reply_to must be a message's seq (an integer from 1)",
            field="reply_to",
        )
    return value


def mentions(value: Any) -> tuple[str, ...]:
    """A post's ``mentions``: up to MAX_MENTIONS user ids (MENTION), each kept once,
    in the order given; absent: none (null is refused, as the schema says a list)."""
    if value is ABSENT:
        return ()
    if not isinstance(value, list) or len(value) > MAX_MENTIONS:
        raise ApiError(
            "invalid_request",
            f"mentions must be a list of at most {MAX_MENTIONS} user ids",
            field="mentions",
        )
    for item in value:
        if (
            not isinstance(item, str)
            or not 1 <= len(item) <= MAX_MENTION
            or not item.strip(BLANK)
            or "\x00" in item
        ):
            raise ApiError(
                "invalid_request",
                f"each mention must be a user id of 1..{MAX_MENTION} characters, not blank",
                field="mentions",
            )
        _printable(item, "mentions")
    return tuple(dict.fromkeys(value))


# The replies of a message: after a reply's seq, a page of at most limit.
REPLIES_QUERY = object_schema([], after=SEQ, limit=LIMIT)


def author(value: Any) -> str:
    """An author name; absent (or ``None`` from the frame of an older client) is
    anonymous. In a JSON body, see :func:`body_author`."""
    if value is None or value is ABSENT:
        return "anonymous"
    return _short(value, "author", MAX_AUTHOR)


def _short(value: Any, name: str, limit: int) -> str:
    """A short name (``name`` in messages): at most ``limit`` characters as given
    (the schema's maxLength), one after trimming, no NUL or lone surrogate; trimmed."""
    if (
        not isinstance(value, str)
        or len(value) > limit
        or not 1 <= len(value.strip(BLANK)) <= limit
    ):
        raise ApiError(
            "invalid_request", f"{name} must be a string of 1..{limit} characters", field=name
        )
    _printable(value, name)
    return value.strip(BLANK)


def body_author(body: dict[str, Any], signed_in: str | None) -> str:
    """The author of a posted message: the token's ``sub`` when signed in, else the
    body's ``author`` or anonymous. A given ``author`` is checked either way: the
    body must match its declared shape (a string, never null)."""
    given = body.get("author", ABSENT)
    if given is not ABSENT:
        if given is None:
            raise ApiError(
                "invalid_request", "author must be a string (or left out)", field="author"
            )
        name = author(given)
    return signed_in if signed_in is not None else (name if given is not ABSENT else "anonymous")


def event_name(value: Any) -> str:
    if not isinstance(value, str) or not EVENT_RE.fullmatch(value) or value in RESERVED_EVENTS:
        raise ApiError(
            "invalid_request",
            "event must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$ "
            "and not be one the gateway sends: " + ", ".join(sorted(RESERVED_EVENTS)),
            field="event",
        )
    return value


def seq_param(value: Any, name: str) -> int | None:
    """A non-negative integer from a query string, header or frame field."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError("invalid_request", f"{name} must be a non-negative integer", field=name)
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > len(str(MAX_SEQ)):
            raise ApiError("invalid_request", f"{name} must be a non-negative integer", field=name)
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ApiError("invalid_request", f"{name} must be a non-negative integer", field=name)
    return value


def message_seq(value: Any) -> int:
    """A message's seq: an integer from 1."""
    n = seq_param(value, "seq")
    if n is None or n < 1:
        raise ApiError("invalid_request", "seq must be an integer from 1", field="seq")
    return n


def seq_field(value: Any, name: str) -> int | None:
    """A non-negative integer in a JSON body or frame: a number, never a string of
    digits. A number with a zero fraction (``12.0``) is an integer, as JSON Schema
    has it."""
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_SEQ:
        value = int(value)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ApiError(
            "invalid_request", f"{name} must be a non-negative integer (a JSON number)", field=name
        )
    return seq_param(value, name)


MAX_DEPTH = 32  # levels of nested arrays and objects in free-form data


def nesting(value: Any, name: str, limit: int = MAX_DEPTH) -> Any:
    """``value``, refused if its arrays and objects nest more than ``limit`` deep
    (an object holding scalars is 1 deep). Checked level by level, no recursion."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise ApiError(
                "invalid_request",
                f"{name} nests deeper than {limit} levels",
                field=name,
                limit=limit,
            )
        level = [
            x
            for c in level
            for x in (c.values() if isinstance(c, dict) else c)
            if isinstance(x, (dict, list))
        ]
    return value


def event_data(value: Any) -> dict[str, Any]:
    """The ``data`` of an ephemeral event (``POST /v1/publish``, ``POST
    /v1/server/broadcast``): absent is ``{}``, else a JSON object nesting at most
    ``MAX_DEPTH`` levels."""
    if value is ABSENT:
        return {}
    if not isinstance(value, dict):
        raise ApiError("invalid_request", "data must be a JSON object", field="data")
    nesting(value, "data")
    return value


def limit_param(value: Any, default: int = 50, maximum: int = MAX_LIMIT) -> int:
    """A ``limit`` query parameter: 1..``maximum``, ``default`` when absent."""
    if value is None:
        return default
    n = seq_param(value, "limit")
    if n is None or not 1 <= n <= maximum:
        raise ApiError(
            "invalid_request", f"limit must be an integer from 1 to {maximum}", field="limit"
        )
    return n


def query_limit(value: Any, schema: dict[str, Any]) -> int:
    """The ``limit`` query parameter of a query ``schema``: its declared default
    and maximum."""
    declared = schema["properties"]["limit"]
    return limit_param(value, declared["default"], declared["maximum"])


def user_name(value: Any, *, blank: bool = True) -> str:
    """A user name as the server and moderation APIs take it (``SERVER_USER``,
    ``MODERATED_USER``); ``blank=False`` also refuses one of only whitespace."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_USER
        or "\x00" in value
        or (not blank and not value.strip(BLANK))
    ):
        raise ApiError(
            "invalid_request",
            f"user must be a string of 1..{MAX_USER} characters"
            + ("" if blank else ", not blank")
            + ", no NUL",
            field="user",
        )
    return value


def close_reason(value: Any) -> str:
    """A reason sent in a WebSocket close frame (``CLOSE_REASON``)."""
    if not isinstance(value, str):
        raise ApiError("invalid_request", "reason must be a string (or left out)", field="reason")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        size = -1
    if not 0 <= size <= MAX_CLOSE_REASON_BYTES or "\x00" in value:
        raise ApiError(
            "invalid_request",
            f"reason must be valid text of at most {MAX_CLOSE_REASON_BYTES} bytes in UTF-8",
            field="reason",
        )
    return value


def reason(value: Any) -> str:
    """A moderation action's reason (``RESTRICTION_BODY``)."""
    if not isinstance(value, str) or len(value) > MAX_REASON or "\x00" in value:
        raise ApiError(
            "invalid_request",
            f"reason must be a string of at most {MAX_REASON} characters, no NUL",
            field="reason",
        )
    return value


def int_field(body: dict[str, Any], name: str, schema: dict[str, Any]) -> int | None:
    """An integer field of a JSON ``body`` within the bounds ``schema`` declares
    for it; None when absent."""
    value = body.get(name)
    if value is None and name not in body:
        return None
    declared = schema["properties"][name]
    low, high = declared["minimum"], declared["maximum"]
    if isinstance(value, float) and value.is_integer():  # 12.0 is an integer, as in JSON Schema
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(
            "invalid_request", f"{name} must be an integer from {low} to {high}", field=name
        )
    return value


def room_list(value: Any) -> list[str]:
    """The ``rooms`` of a broadcast (``BROADCAST``): distinct room names."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_BROADCAST_ROOMS:
        raise ApiError(
            "invalid_request",
            f"rooms must be a list of 1..{MAX_BROADCAST_ROOMS} room names",
            field="rooms",
        )
    rooms = [room_name(room) for room in value]
    if len(set(rooms)) != len(rooms):
        raise ApiError("invalid_request", "rooms must not repeat a room", field="rooms")
    return rooms


def dead_letter_ids(value: Any) -> list[int]:
    """The ``ids`` of a replay (``REPLAY_IDS``)."""
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_REPLAY_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i < 2**63 for i in value)
    ):
        raise ApiError(
            "invalid_request",
            f"ids must be a list of 1..{MAX_REPLAY_IDS} dead letter ids",
            field="ids",
        )
    return value


def timestamp(value: Any, name: str) -> int:
    """An ISO 8601 ``TIMESTAMP`` with a time zone, as epoch milliseconds."""
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


def interval(raw: str | None) -> float:
    """The stats stream's ``interval`` (``INTERVAL``), in seconds."""
    if raw is None:
        return float(INTERVAL["default"])
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not INTERVAL["minimum"] <= value <= INTERVAL["maximum"]:
        raise ApiError(
            "invalid_request",
            "interval must be a number of seconds from "
            f"{INTERVAL['minimum']} to {INTERVAL['maximum']}",
            field="interval",
        )
    return value


def choice(value: str | None, name: str, schema: dict[str, Any]) -> str:
    """One of the values ``schema`` enumerates; its default when absent."""
    if value is None:
        return str(schema["default"])
    if value not in schema["enum"]:
        raise ApiError(
            "invalid_request", f"{name} must be {' or '.join(schema['enum'])}", field=name
        )
    return value


def idempotency_key(value: Any, name: str = "Idempotency-Key") -> str | None:
    """The header's value, or a publish frame's ``key`` (``name="key"``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            "invalid_request",
            f"{name} must be a string of 1..{MAX_IDEMPOTENCY_KEY} characters",
            field=name,
        )
    _printable(value, name)
    return value


def ref(value: Any) -> Any:
    if (
        value is None
        or (isinstance(value, str) and len(value) <= MAX_REF)
        or (isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SAFE_INT)
    ):
        return value
    raise ApiError(
        "invalid_request",
        f"ref must be a string of at most {MAX_REF} characters "
        f"or an integer of at most {MAX_SAFE_INT} in magnitude",
        field="ref",
    )


def json_object(raw: bytes | str, what: str = "the body") -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError("invalid_json", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError("invalid_request", f"{what} must be a JSON object")
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError("invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError("too_large", f"the body exceeds {limit} bytes", limit=limit)
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError("too_large", f"the body exceeds {limit} bytes", limit=limit)
            chunks.append(chunk)
    except ClientDisconnect:  # the client's doing: nothing to store, nobody to answer
        raise ApiError(
            "invalid_request", "the client closed the connection before the body ended", status=400
        ) from None
    return b"".join(chunks)


async def json_body(
    request: Request, limit: int, schema: dict[str, Any] | None, *, optional: bool = False
) -> dict[str, Any]:
    """The request's JSON object body: at most ``limit`` bytes, with only the fields
    ``schema`` declares (None: the caller checks them); ``optional``: an empty body
    is ``{}``."""
    raw = await read_body(request, limit)
    if optional and not raw.strip():
        return {}
    body = json_object(raw)
    if schema is not None:
        only_fields(body, fields(schema))
    return body


def only_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(
            "invalid_request",
            f"unknown field(s): {', '.join(sorted(unknown))}",
            fields=sorted(unknown),
        )

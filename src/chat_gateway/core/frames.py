"""What a subscriber receives, per transport: the payload of a WebSocket text frame
(one JSON object, see docs/API.md) or one complete SSE event.

The hub (chat_gateway.delivery.hub) builds each frame once per transport and queues the same
bytes to every subscriber of that transport; a stored message's frame is built
around the message's own JSON bytes, never re-encoded.
"""

from __future__ import annotations

from typing import Final

import orjson

from chat_gateway.core.wire import EventPayload, PresencePayload, ReadPayload, TypingPayload

WS: Final = "ws"
SSE: Final = "sse"


def sse_event(name: bytes | str, data: bytes, event_id: int | None = None) -> bytes:
    """One complete Server-Sent Event: ``id`` (when given), ``event`` and one ``data``
    line (JSON never holds a raw newline), ended by a blank line. Every SSE frame
    the gateway sends is built here."""
    if isinstance(name, str):
        name = name.encode()
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + name + b"\ndata: " + data + b"\n\n"


def message_frame(transport: str, room_json: bytes, seq: int, body: bytes) -> bytes:
    """A stored message (``body``, its JSON) in the room whose JSON name is ``room_json``."""
    if transport == WS:
        return b'{"type":"message","room":' + room_json + b',"message":' + body + b"}"
    return sse_event(b"message", body, seq)


def change_frame(transport: str, room_json: bytes, change: int, body: bytes) -> bytes:
    """``message_updated`` / ``message_deleted`` (``body``: the message's JSON),
    ``reactions_updated`` (``body``: ``{"seq", "reactions"}``) or ``thread_updated``
    (``body``: ``{"thread", "seq"}``, chat_gateway.storage.Change.body): the same
    object on WS and as SSE data."""
    if body.startswith(b'{"thread":'):
        frame = (
            b'{"type":"thread_updated","room":' + room_json + b',"change":%d,' % change + body[1:]
        )
        return frame if transport == WS else sse_event(b"thread_updated", frame)
    if body.startswith(b'{"seq":'):
        frame = (
            b'{"type":"reactions_updated","room":'
            + room_json
            + b',"change":%d,' % change
            + body[1:]
        )
        return frame if transport == WS else sse_event(b"reactions_updated", frame)
    kind = b"message_deleted" if b'"deleted_at":"' in body else b"message_updated"
    frame = (
        b'{"type":"'
        + kind
        + b'","room":'
        + room_json
        + b',"change":%d,"message":' % change
        + body
        + b"}"
    )
    if transport == WS:
        return frame
    return sse_event(kind, frame)


def event_frame(transport: str, event: EventPayload) -> bytes:
    """An ephemeral event; on SSE its name is the event's."""
    if transport == WS:
        return orjson.dumps(
            {"type": "event", "room": event.room, "event": event.event, "data": event.data}
        )
    return sse_event(event.event, orjson.dumps({"room": event.room, "data": event.data}))


def presence_frame(transport: str, p: PresencePayload) -> bytes:
    """A presence change: ``{"type": "presence", "room", "action", "user"}`` on WS."""
    obj = {"room": p.room, "action": p.action, "user": p.user}
    if transport == WS:
        return orjson.dumps({"type": "presence", **obj})
    return sse_event(b"presence", orjson.dumps(obj))


def chat_frame(transport: str, event: TypingPayload | ReadPayload) -> bytes:
    """A typing notice or read receipt, ``{"type", "room", "user", ...}``; on SSE the
    type is the event name."""
    if isinstance(event, TypingPayload):
        name = b"typing"
        data = orjson.dumps({"type": "typing", "room": event.room, "user": event.user})
    else:
        name = b"read"
        data = orjson.dumps(
            {"type": "read", "room": event.room, "user": event.user, "seq": event.seq}
        )
    if transport == WS:
        return data
    return sse_event(name, data)


def state_frame(transport: str, room_json: bytes, seq: int, body: bytes) -> bytes:
    """A state room's write (``body``: ``{"key", "value" | "deleted", "updated_at"}``):
    ``{"type": "state", "room", "seq", "key", …}`` on WS, ``event: state`` with
    ``id:`` the seq on SSE."""
    if transport == WS:
        return b'{"type":"state","room":' + room_json + b',"seq":%d,' % seq + body[1:]
    return sse_event(b"state", b'{"room":' + room_json + b',"seq":%d,' % seq + body[1:], seq)


def snapshot_frame(transport: str, room_json: bytes, seq: int, values: bytes) -> bytes:
    """Every live key of a state room at ``seq`` (``values``: ``{"k": {"value", "seq",
    "updated_at"}}``): ``{"type": "snapshot", "room", "seq", "values"}`` on WS,
    ``event: snapshot`` with ``id:`` the seq on SSE (its data: :func:`state_document`)."""
    if transport == WS:
        return (
            b'{"type":"snapshot","room":' + room_json + b',"seq":%d,"values":' % seq + values + b"}"
        )
    return sse_event(b"snapshot", state_document(room_json, seq, values), seq)


def state_document(room_json: bytes, seq: int, values: bytes) -> bytes:
    """``{"room", "seq", "values"}``: every live key of a state room at ``seq``, as
    ``GET /v1/rooms/{room}/state`` answers and an SSE ``snapshot`` carries it."""
    return b'{"room":' + room_json + b',"seq":%d,"values":' % seq + values + b"}"

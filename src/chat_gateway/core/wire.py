"""The broker payloads: what an instance publishes on a room's channel for every hub.

A payload is a kind, one letter and a colon, then the kind's fields:

- ``n:<seq>:<created_ms>:<changes>:<message JSON>``: a stored message, ``changes``
  being the room's change count when it committed (the edits and deletes it
  must follow). A message whose count is unknown goes as the first release's
  ``m:<seq>:<created_ms>:<message JSON>``, which is still read (an instance of
  that release publishes it) and is not held back for changes; that release
  ignores ``n:`` and reads those messages from the store (its gap wait and
  position check).
- ``c:<change>:<after_seq>:<body>``: an edit or delete, the body being the
  message as it is after the change, or a reactions change, the body being
  ``{"seq", "reactions"}``, or a thread change, the body being ``{"thread", "seq"}``
  (chat_gateway.storage.Change.body; a release before reactions or threads would
  show them as an edit).
- ``s:<seq>:<updated_ms>:<body>``: a state room's write, ``body`` being
  ``{"key", "value", "updated_at"}`` or ``{"key", "deleted": true, "updated_at"}``
  (chat_gateway.storage.records.StateEntry.to_json); sequenced by seq like a
  message (a release before state rooms ignores it).
- ``e:{"room", "event", "data"}``: an ephemeral event (``POST /v1/publish``).
- ``p:{"room", "action", "user"}``: a presence join or leave (chat_gateway.delivery.presence).
- ``t:{"type": "typing", "room", "user"}``: a typing notice.
- ``r:{"type": "read", "room", "user", "seq"}``: a read receipt.
- ``x:<traceparent>:<payload>``: any of the above inside the W3C trace context of
  the span that published it (only while tracing is on, chat_gateway.tracing):
  :func:`decode` returns the inner payload, a message carrying the traceparent in
  ``trace``. Without tracing the bytes are exactly the above. A release that
  predates ``x:`` ignores it as an unknown kind and reads that message from the
  store (its gap wait), so a mixed cluster with tracing on delivers late there,
  never wrongly.

Messages and changes are sequenced by the hub (chat_gateway.delivery.hub); the others are
delivered as they come. :func:`decode` returns ``None`` for a kind it does not
know (one a later release may add), which the hub ignores; a known kind that
does not parse raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from chat_gateway.storage import Change, Message
from chat_gateway.storage.records import StateEntry

__all__ = [
    "ChangePayload",
    "EventPayload",
    "MessagePayload",
    "Payload",
    "PresencePayload",
    "ReadPayload",
    "StatePayload",
    "TypingPayload",
    "decode",
    "encode_change",
    "encode_event",
    "encode_message",
    "encode_presence",
    "encode_read",
    "encode_state",
    "encode_typing",
    "traced",
]


class MessagePayload(NamedTuple):
    """``n:`` / ``m:``: a stored message; ``body`` is its JSON as the API shows it.
    ``changes`` is None for an ``m:`` payload (the count is unknown); ``trace`` is the
    publisher's ``traceparent`` when it came inside ``x:``."""

    seq: int
    created_ms: int
    changes: int | None
    body: bytes
    trace: bytes | None = None


class ChangePayload(NamedTuple):
    """``c:``: change number ``change`` of the room, committed after message
    ``after_seq``; ``body`` is what its frame carries (``Change.body``)."""

    change: int
    after_seq: int
    body: bytes


class StatePayload(NamedTuple):
    """``s:``: a state room's write that took ``seq``; ``body`` is
    ``StateEntry.to_json``."""

    seq: int
    updated_ms: int
    body: bytes


class EventPayload(NamedTuple):
    """``e:``: an ephemeral event published to a room; ``origin``: the instance that
    published it (``from``), which gave it to its own subscribers already."""

    room: str
    event: str
    data: Any
    origin: str | None = None


class PresencePayload(NamedTuple):
    """``p:``: ``user`` joined (``action`` ``"join"``) or left (``"leave"``) ``room``."""

    room: str
    action: str
    user: str


class TypingPayload(NamedTuple):
    """``t:``: ``user`` types in ``room``."""

    room: str
    user: str


class ReadPayload(NamedTuple):
    """``r:``: ``user`` has read ``room`` up to ``seq``."""

    room: str
    user: str
    seq: int


Payload = (
    MessagePayload
    | ChangePayload
    | StatePayload
    | EventPayload
    | PresencePayload
    | TypingPayload
    | ReadPayload
)


# -- encoding ------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """``n:`` for a message whose change count is known, else the first release's ``m:``."""
    if msg.changes is None:
        return b"m:%d:%d:" % (msg.seq, msg.created_ms) + msg.to_json()
    return b"n:%d:%d:%d:" % (msg.seq, msg.created_ms, msg.changes) + msg.to_json()


def traced(payload: bytes, traceparent: bytes | None) -> bytes:
    """``payload`` inside ``x:`` with ``traceparent``; unchanged without one."""
    if traceparent is None:
        return payload
    return b"x:" + traceparent + b":" + payload


def encode_change(change: Change) -> bytes:
    return b"c:%d:%d:" % (change.change, change.after_seq) + change.body()


def encode_state(entry: StateEntry) -> bytes:
    return b"s:%d:%d:" % (entry.seq, entry.updated_ms) + entry.to_json()


def encode_event(room: str, event: str, data: Any, origin: str | None = None) -> bytes:
    if origin is None:
        return b"e:" + orjson.dumps({"room": room, "event": event, "data": data})
    return b"e:" + orjson.dumps({"room": room, "event": event, "data": data, "from": origin})


def encode_presence(room: str, action: str, user: str) -> bytes:
    return b"p:" + orjson.dumps({"room": room, "action": action, "user": user})


def encode_typing(room: str, user: str) -> bytes:
    return b"t:" + orjson.dumps({"type": "typing", "room": room, "user": user})


def encode_read(room: str, user: str, seq: int) -> bytes:
    return b"r:" + orjson.dumps({"type": "read", "room": room, "user": user, "seq": seq})


# -- decoding ------------------------------------------------------------------


def decode(data: bytes) -> Payload | None:
    """The payload ``data`` carries; None for a kind this release does not know."""
    kind = data[:2]
    if kind == b"x:":
        trace, _, inner = data[2:].partition(b":")
        payload = decode(inner)
        if isinstance(payload, MessagePayload):
            return payload._replace(trace=trace)
        return payload
    if kind == b"n:" or kind == b"m:":
        seq, _, rest = data[2:].partition(b":")
        created, _, body = rest.partition(b":")
        changes = None
        if kind == b"n:":
            count, _, body = body.partition(b":")
            changes = int(count)
        return MessagePayload(int(seq), int(created), changes, body)
    if kind == b"s:":
        seq, _, rest = data[2:].partition(b":")
        updated, _, body = rest.partition(b":")
        return StatePayload(int(seq), int(updated), body)
    if kind == b"c:":
        change, _, rest = data[2:].partition(b":")
        after, _, body = rest.partition(b":")
        return ChangePayload(int(change), int(after), body)
    if kind not in _JSON_KINDS:
        return None
    obj = orjson.loads(data[2:])  # orjson.JSONDecodeError is a ValueError
    try:
        if kind == b"e:":
            return EventPayload(obj["room"], obj["event"], obj["data"], obj.get("from"))
        if kind == b"p:":
            return PresencePayload(obj["room"], obj["action"], obj["user"])
        if kind == b"t:":
            return TypingPayload(obj["room"], obj["user"])
        return ReadPayload(obj["room"], obj["user"], obj["seq"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a {kind!r} payload without its fields: {data[:200]!r}") from exc


_JSON_KINDS = frozenset((b"e:", b"p:", b"t:", b"r:"))

"""The broker payloads (chat_gateway.core.wire) and the frames built from them (chat_gateway.core.frames):
every kind survives encode then decode, an ``m:`` payload of the first release is
still read, and the bytes are the ones other instances and clients expect."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from chat_gateway.core import wire
from chat_gateway.core.frames import (
    SSE,
    WS,
    change_frame,
    chat_frame,
    event_frame,
    message_frame,
    presence_frame,
)
from chat_gateway.storage import Change, Message

MSG = Message(
    id="01J0000000000000000000000A",
    room="lobby",
    seq=7,
    author="ann",
    text="hi: there",  # a colon in the body: only the head's fields are split
    created_ms=1_764_000_000_123,
    changes=3,
)


def test_message_round_trip() -> None:
    data = wire.encode_message(MSG)
    assert data == b"n:7:1764000000123:3:" + MSG.to_json()
    assert wire.decode(data) == wire.MessagePayload(7, 1_764_000_000_123, 3, MSG.to_json())


def test_message_without_change_count_goes_as_v1() -> None:
    msg = Message(MSG.id, MSG.room, 9, MSG.author, MSG.text, MSG.created_ms)
    data = wire.encode_message(msg)
    assert data == b"m:9:1764000000123:" + msg.to_json()
    assert wire.decode(data) == wire.MessagePayload(9, 1_764_000_000_123, None, msg.to_json())


def test_v1_message_from_an_earlier_release_is_read() -> None:
    body = b'{"id":"x","room":"lobby","seq":12,"author":"a","text":"a:b:c"}'
    assert wire.decode(b"m:12:99:" + body) == wire.MessagePayload(12, 99, None, body)


def test_change_round_trip() -> None:
    change = Change(change=4, after_seq=7, message=MSG)
    data = wire.encode_change(change)
    assert data == b"c:4:7:" + MSG.to_json()
    assert wire.decode(data) == wire.ChangePayload(4, 7, MSG.to_json())


@pytest.mark.parametrize(
    ("data", "decoded", "expected"),
    [
        (
            wire.encode_event("lobby", "ping", {"n": [1, 2]}),
            wire.EventPayload("lobby", "ping", {"n": [1, 2]}),
            b'e:{"room":"lobby","event":"ping","data":{"n":[1,2]}}',
        ),
        (
            wire.encode_presence("lobby", "join", "ann"),
            wire.PresencePayload("lobby", "join", "ann"),
            b'p:{"room":"lobby","action":"join","user":"ann"}',
        ),
        (
            wire.encode_typing("lobby", "ann"),
            wire.TypingPayload("lobby", "ann"),
            b't:{"type":"typing","room":"lobby","user":"ann"}',
        ),
        (
            wire.encode_read("lobby", "ann", 7),
            wire.ReadPayload("lobby", "ann", 7),
            b'r:{"type":"read","room":"lobby","user":"ann","seq":7}',
        ),
    ],
)
def test_json_kinds_round_trip(data: bytes, decoded: wire.Payload, expected: bytes) -> None:
    assert data == expected
    assert wire.decode(data) == decoded


def test_unknown_kind_is_ignored_and_broken_known_kind_raises() -> None:
    assert wire.decode(b"z:whatever a later release sends") is None
    with pytest.raises(ValueError):
        wire.decode(b"n:seven:1:0:{}")
    with pytest.raises(ValueError):
        wire.decode(b"e:{not json")
    with pytest.raises(ValueError):
        wire.decode(b'p:{"room":"lobby"}')


ROOM = orjson.dumps("lobby")


def test_message_frames() -> None:
    body = MSG.to_json()
    assert message_frame(WS, ROOM, 7, body) == (
        b'{"type":"message","room":"lobby","message":' + body + b"}"
    )
    assert message_frame(SSE, ROOM, 7, body) == b"id: 7\nevent: message\ndata: " + body + b"\n\n"
    assert orjson.loads(message_frame(WS, ROOM, 7, body))["message"]["text"] == "hi: there"


def test_change_frames() -> None:
    edited = b'{"id":"x","seq":7,"text":"new","edited_at":"2026-01-01T00:00:00.000Z"}'
    deleted = b'{"id":"x","seq":7,"text":"","deleted_at":"2026-01-01T00:00:00.000Z"}'
    assert change_frame(WS, ROOM, 4, edited) == (
        b'{"type":"message_updated","room":"lobby","change":4,"message":' + edited + b"}"
    )
    frame = b'{"type":"message_deleted","room":"lobby","change":5,"message":' + deleted + b"}"
    assert change_frame(WS, ROOM, 5, deleted) == frame
    assert change_frame(SSE, ROOM, 5, deleted) == (
        b"event: message_deleted\ndata: " + frame + b"\n\n"
    )


def test_thread_and_reactions_change_frames_from_the_change_body() -> None:
    thread = {"replies": 2, "last_seq": 9, "last_at": "2026-01-01T00:00:00.000Z"}
    parent = replace(MSG, thread=thread, reactions={"thread": {"count": 1, "users": ["a"]}})
    body = Change(6, 9, parent, thread=True).body()
    frame = change_frame(WS, ROOM, 6, body)
    assert orjson.loads(frame) == {
        "type": "thread_updated",
        "room": "lobby",
        "change": 6,
        "seq": 7,
        "thread": thread,
    }
    assert change_frame(SSE, ROOM, 6, body) == b"event: thread_updated\ndata: " + frame + b"\n\n"
    # a reaction named "thread" stays a reactions change
    reacted = orjson.loads(change_frame(WS, ROOM, 7, Change(7, 9, parent, True).body()))
    assert reacted["type"] == "reactions_updated" and "thread" not in reacted
    assert Change(6, 9, parent, thread=True).kind == "thread_updated"
    d = parent.to_dict()
    assert d["thread"] == thread and "reply_to" not in d and "mentions" not in d
    reply = replace(MSG, reply_to=3, mentions=("bo", "cy"))
    assert reply.to_dict()["reply_to"] == 3 and reply.to_dict()["mentions"] == ["bo", "cy"]


def test_unsequenced_frames() -> None:
    event = wire.EventPayload("lobby", "ping", {"n": 1})
    assert event_frame(WS, event) == (
        b'{"type":"event","room":"lobby","event":"ping","data":{"n":1}}'
    )
    assert event_frame(SSE, event) == b'event: ping\ndata: {"room":"lobby","data":{"n":1}}\n\n'
    p = wire.PresencePayload("lobby", "leave", "ann")
    assert presence_frame(WS, p) == (
        b'{"type":"presence","room":"lobby","action":"leave","user":"ann"}'
    )
    assert presence_frame(SSE, p) == (
        b'event: presence\ndata: {"room":"lobby","action":"leave","user":"ann"}\n\n'
    )
    typing = wire.TypingPayload("lobby", "ann")
    assert chat_frame(WS, typing) == b'{"type":"typing","room":"lobby","user":"ann"}'
    assert chat_frame(SSE, typing) == (
        b'event: typing\ndata: {"type":"typing","room":"lobby","user":"ann"}\n\n'
    )
    read = wire.ReadPayload("lobby", "ann", 3)
    assert chat_frame(WS, read) == b'{"type":"read","room":"lobby","user":"ann","seq":3}'
    assert chat_frame(SSE, read) == (
        b'event: read\ndata: {"type":"read","room":"lobby","user":"ann","seq":3}\n\n'
    )


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_without_a_trace_the_payload_is_unchanged() -> None:
    data = wire.encode_message(MSG)
    assert wire.traced(data, None) is data
    assert wire.decode(data).trace is None  # type: ignore[union-attr]


def test_a_traced_message_carries_its_traceparent() -> None:
    data = wire.traced(wire.encode_message(MSG), TRACEPARENT)
    assert data == b"x:" + TRACEPARENT + b":" + wire.encode_message(MSG)
    assert wire.decode(data) == wire.MessagePayload(
        7, 1_764_000_000_123, 3, MSG.to_json(), TRACEPARENT
    )


def test_other_kinds_inside_a_trace_decode_as_themselves() -> None:
    data = wire.traced(wire.encode_typing("lobby", "ann"), TRACEPARENT)
    assert wire.decode(data) == wire.TypingPayload("lobby", "ann")

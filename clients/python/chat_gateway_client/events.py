"""Typed events and objects of the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    """A stored message; ``raw`` keeps every field (edits and deletes add some)."""

    id: str
    room: str
    seq: int
    author: str
    text: str
    created_at: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, d: dict[str, Any]) -> Message:
        return cls(d["id"], d["room"], d["seq"], d["author"], d.get("text", ""), d["created_at"], d)


@dataclass(frozen=True)
class Page:
    messages: list[Message]
    has_more: bool


@dataclass(frozen=True)
class Change:
    """``message_updated`` (kind ``updated``) or ``message_deleted`` (``deleted``)."""

    kind: str
    room: str
    message: Message


@dataclass(frozen=True)
class Event:
    """An ephemeral event (not stored, no seq)."""

    room: str
    event: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Presence:
    room: str
    action: str  # "join" or "leave"
    user: str


@dataclass(frozen=True)
class Typing:
    room: str
    user: str


@dataclass(frozen=True)
class Read:
    room: str
    frame: dict[str, Any]


@dataclass(frozen=True)
class Unsubscribed:
    """The server API ended a subscription."""

    room: str
    reason: str | None


@dataclass(frozen=True)
class StateChange:
    state: Any  # client.State
    code: int | None = None
    reason: str = ""
    status: int | None = None  # HTTP status of a refused upgrade


@dataclass(frozen=True)
class SearchHit:
    """A message ``search`` found; ``highlights``: ``(start, end)`` code point offsets
    into ``message.text`` (Python ``str`` indices) of the words it matched."""

    message: Message
    highlights: list[tuple[int, int]]


@dataclass(frozen=True)
class SearchPage:
    """Newest first; ``next_cursor`` (``None``: no more) asks for the next page."""

    results: list[SearchHit]
    next_cursor: str | None

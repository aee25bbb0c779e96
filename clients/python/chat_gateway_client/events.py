"""Typed events and objects of the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    """A stored message, as the gateway sends it (``Message`` in ``/openapi.json``).

    A message never changed has no ``version``, ``edited_at`` or ``deleted_at`` on the
    wire; a changed one has all three, ``edited_at`` and ``deleted_at`` possibly
    ``null``. Here both read ``None``. A deleted message is a tombstone: ``text`` is
    ``""`` and ``deleted_at`` is set. ``reactions`` is the summary by reaction,
    ``{"count", "users"}`` (at most ten users named), ``None`` when there is none.
    ``reply_to`` is the seq of the message a reply answers, ``mentions`` the user ids
    it mentions, ``thread`` its replies so far (each ``None`` when absent).
    ``raw`` keeps every field as sent.
    """

    id: str
    room: str
    seq: int
    author: str
    text: str
    created_at: str
    version: int | None = None
    edited_at: str | None = None
    deleted_at: str | None = None
    reactions: dict[str, Reaction] | None = None
    reply_to: int | None = None
    mentions: list[str] | None = None
    thread: Thread | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @classmethod
    def of(cls, d: dict[str, Any]) -> Message:
        return cls(
            d["id"],
            d["room"],
            d["seq"],
            d["author"],
            d.get("text", ""),
            d["created_at"],
            d.get("version"),
            d.get("edited_at"),
            d.get("deleted_at"),
            Reaction.summary(d.get("reactions")),
            d.get("reply_to"),
            d.get("mentions"),
            Thread.of(d.get("thread")),
            d,
        )


@dataclass(frozen=True)
class Thread:
    """A message's replies so far: how many (a deleted reply's tombstone still
    counts), the last one's seq and creation time."""

    replies: int
    last_seq: int
    last_at: str

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> Thread | None:
        if not d:
            return None
        return cls(d["replies"], d["last_seq"], d["last_at"])


@dataclass(frozen=True)
class ThreadUpdated:
    """``thread_updated``: a reply to the message at ``seq`` committed; ``thread`` is
    its summary now. ``change`` is the room's change number, in the same stream as
    edits and reactions (each arrives once across reconnections)."""

    room: str
    change: int
    seq: int
    thread: Thread


@dataclass(frozen=True)
class Version:
    """An earlier text of an edited message: ``version`` 1 is as posted; ``edited_at``
    is when the edit that replaced it was made."""

    version: int
    text: str
    edited_at: str


@dataclass(frozen=True)
class RepliesPage:
    """A page of replies, ascending by seq; pass ``next`` as ``after`` for the next."""

    messages: list[Message]
    has_more: bool
    next: int | None


@dataclass(frozen=True)
class Reaction:
    """One reaction's part of a message's summary: how many users reacted with it,
    and the first ten of them."""

    count: int
    users: list[str]

    @classmethod
    def summary(cls, raw: dict[str, Any] | None) -> dict[str, Reaction] | None:
        """A wire summary, by reaction; None when there is none."""
        if not raw:
            return None
        return {k: cls(v["count"], list(v["users"])) for k, v in raw.items()}


@dataclass(frozen=True)
class ReactionsUpdated:
    """``reactions_updated``: the summary of the message at ``seq`` is now
    ``reactions`` (``{}``: none left). ``change`` is the room's change number, in
    the same stream as edits and deletes (each arrives once across reconnections)."""

    room: str
    change: int
    seq: int
    reactions: dict[str, Reaction]


@dataclass(frozen=True)
class Page:
    messages: list[Message]
    has_more: bool


@dataclass(frozen=True)
class Change:
    """``message_updated`` (kind ``updated``) or ``message_deleted`` (``deleted``).

    ``change`` is the room's change number: the client resumes changes from the last
    one it handed on (``changes_since``), so each arrives once across reconnections.
    Apply it by replacing the message at ``message.seq`` with ``message``.
    """

    kind: str
    room: str
    message: Message
    change: int


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
    """A read receipt: ``user`` has read ``room`` up to ``seq``."""

    room: str
    user: str
    seq: int
    frame: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ReadState:
    """A read position (``POST``/``GET /v1/rooms/{room}/read``, ``GET /v1/read``):
    read up to ``seq``, ``unread`` messages after it, ``mentions`` of them (not
    deleted, not the user's own) mentioning the user."""

    room: str
    seq: int
    unread: int
    mentions: int = 0

    @classmethod
    def of(cls, d: dict[str, Any]) -> ReadState:
        return cls(d["room"], d["seq"], d["unread"], d.get("mentions", 0))


@dataclass(frozen=True)
class Subscribed:
    """The answer to a subscribe: the room's latest ``seq`` and last ``change``."""

    room: str
    seq: int
    change: int


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
    error: Any = None  # the GatewayError of a refused upgrade, with the server's reason


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

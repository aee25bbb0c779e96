"""The records a store reads and writes (messages, changes, read positions, pages),
their ids and timestamps, and the store's errors: what the store interface, its
implementations and the modules beside them (moderation, search) share."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

MAX_PAGE = 200


class StoreUnavailable(Exception):
    """The database cannot be reached or did not answer in time.

    ``outcome_unknown`` is set when a write had already been sent when the answer
    failed to come (a timeout or a lost connection after the statement, or the
    commit, went out): the database may have committed it. Otherwise the write
    was never sent, or the database refused it, and nothing was stored."""

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


def display_url(url: str) -> str:
    """``url`` fit to print: any password (in the user info or a ``password=``
    parameter) replaced by ``***``, e.g. ``postgresql://chat:***@db:5432/chat``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hosts}"
    path, q, query = tail.partition("?")
    if q:
        query = "&".join(
            "password=***" if part.lower().startswith("password=") else part
            for part in query.split("&")
        )
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


class MessageNotFound(LookupError):
    """No message at that seq (never committed, removed by retention or a purge), or
    an edit of a deleted one."""


class MessageDeleted(Exception):
    """A reaction or a reply to a deleted message (its tombstone takes none), or the
    replies or versions of one."""


class NotAuthor(Exception):
    """A change of someone else's message by a caller allowed only their own."""


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two digits per 10 bits: a ULID's 130 bits (two leading zeros) in 13 lookups.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = range(120, -1, -10)


def new_id(now_ms: int | None = None) -> str:
    """A ULID: 48 bits of milliseconds and 80 random bits, Crockford base32, sortable."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def format_ts(ms: int) -> str:
    """Epoch milliseconds as ``2026-11-21T23:00:00.123Z``."""
    global _second
    sec, frac = divmod(ms, 1000)
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    return f"{_second[1]}{frac:03d}Z"


def parse_ts(text: str) -> int:
    """``2026-11-21T23:00:00.123Z`` as epoch milliseconds."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1000 + dt.microsecond // 1000


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    room: str
    seq: int
    author: str
    text: str
    created_ms: int  # commit time, epoch milliseconds
    version: int = 1  # 1 as posted; each edit or delete adds one
    edited_ms: int | None = None
    deleted_ms: int | None = None  # a tombstone: text is empty
    # An append's own answer, never stored or sent to clients: the room's change
    # count when the message committed (edits and deletes before it), which the
    # channel payload carries so a subscriber gets the two in commit order.
    changes: int | None = field(default=None, compare=False)
    # The reactions summary (``summarize``), kept on the message's row; None: none.
    reactions: dict[str, Any] | None = None
    # The seq of the message this one replies to (same room); None: not a reply.
    reply_to: int | None = None
    # The user ids the message mentions, deduplicated, in the order given; None: none.
    mentions: tuple[str, ...] | None = None
    # A parent's thread summary ``{"replies", "last_seq", "last_at"}``; None: no reply.
    thread: dict[str, Any] | None = None
    # An append's own answer, never stored or sent: the thread change of the parent a
    # reply committed with it (announced after the reply, in the change stream).
    follow: Change | None = field(default=None, compare=False)
    # The JSON of to_dict, made on first use: a message is encoded once for every
    # history read, ack and publish that carries it.
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "id": self.id,
            "room": self.room,
            "seq": self.seq,
            "author": self.author,
            "text": self.text,
            "created_at": format_ts(self.created_ms),
        }
        if self.version > 1:  # changed: v1's message object, plus what changed
            d["version"] = self.version
            d["edited_at"] = None if self.edited_ms is None else format_ts(self.edited_ms)
            d["deleted_at"] = None if self.deleted_ms is None else format_ts(self.deleted_ms)
        if self.reactions:
            d["reactions"] = self.reactions
        if self.reply_to is not None:
            d["reply_to"] = self.reply_to
        if self.mentions:
            d["mentions"] = list(self.mentions)
        if self.thread:
            d["thread"] = self.thread
        return d

    def to_json(self) -> bytes:
        encoded = self._json
        if encoded is None:
            encoded = orjson.dumps(self.to_dict())
            object.__setattr__(self, "_json", encoded)
        return encoded


# Users named per reaction in a message's summary; the count goes on past it.
REACTION_USERS = 10


def summarize(rows: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    """A message's reactions summary from its ``(reaction, user)`` rows in the order
    they were added: ``{reaction: {"count", "users": [the first REACTION_USERS]}}``,
    reactions in order of their first use; None when there is none."""
    out: dict[str, Any] = {}
    for reaction, user in rows:
        entry = out.setdefault(reaction, {"count": 0, "users": []})
        entry["count"] += 1
        if len(entry["users"]) < REACTION_USERS:
            entry["users"].append(user)
    return out or None


def thread_summary(replies: int, last_seq: int, last_ms: int) -> dict[str, Any]:
    """A parent's ``thread``: how many replies it has (tombstones of deleted replies
    included: they keep their place, as in history), the last one's seq and time."""
    return {"replies": replies, "last_seq": last_seq, "last_at": format_ts(last_ms)}


MAX_MENTIONS = 50


def change_event(
    msg: Message, change: int, now_ms: int, *, reactions: bool = False
) -> tuple[str, str, str]:
    """The webhook event of an edit, delete or reactions change: (event id, type,
    data JSON). ``data`` is the message as it is after the change (a delete's
    tombstone: text empty, ``deleted_at`` set; ``reactions`` its summary) plus
    ``change``, the room's change number."""
    if reactions:
        kind = "message.reactions_updated"
    else:
        kind = "message.deleted" if msg.deleted_ms is not None else "message.updated"
    data = orjson.dumps({**msg.to_dict(), "change": change}).decode()
    return "evt_" + new_id(now_ms), kind, data


@dataclass(frozen=True, slots=True)
class Change:
    """An edit, a delete, a reactions change (``reactions``) or a thread change
    (``thread``: a reply to the message committed): the room's change number, the
    room's last seq when it committed (it sits after that message), and the message
    as it is now."""

    change: int
    after_seq: int
    message: Message
    reactions: bool = False
    thread: bool = False

    @property
    def kind(self) -> str:
        if self.thread:
            return "thread_updated"
        if self.reactions:
            return "reactions_updated"
        return "message_deleted" if self.message.deleted_ms is not None else "message_updated"

    def body(self) -> bytes:
        """What the change's frame carries (chat_gateway.core.frames.change_frame): the
        message's JSON for an edit or delete, ``{"seq", "reactions"}`` for a
        reactions change, ``{"thread", "seq"}`` for a thread change (the message's JSON
        always starts with ``{"id"``)."""
        if self.thread:
            return orjson.dumps({"thread": self.message.thread or {}, "seq": self.message.seq})
        if self.reactions:
            return orjson.dumps(
                {"seq": self.message.seq, "reactions": self.message.reactions or {}}
            )
        return self.message.to_json()


@dataclass(frozen=True, slots=True)
class ReadPosition:
    room: str
    seq: int
    last_seq: int
    # Unread messages (after seq, not deleted, not the user's own) mentioning the user.
    mentions: int = 0

    @property
    def unread(self) -> int:
        return max(0, self.last_seq - self.seq)


@dataclass(frozen=True, slots=True)
class RoomFilter:
    """Rooms a listing keeps: those named, and those starting with a prefix."""

    names: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def sql_sqlite(self, column: str) -> tuple[str, list[str]]:
        """A SQLite condition on ``column`` and its parameters."""
        parts = [f"{column} IN ({', '.join('?' * len(self.names))})"] if self.names else []
        parts += [f"substr({column}, 1, ?) = ?"] * len(self.prefixes)
        args: list[Any] = list(self.names)
        for prefix in self.prefixes:
            args += [len(prefix), prefix]
        return "(" + (" OR ".join(parts) or "0") + ")", args


@dataclass(frozen=True, slots=True)
class Version:
    """An earlier text of an edited message: the version it was (1: as posted), and
    when the edit that replaced it was made."""

    version: int
    text: str
    edited_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "text": self.text, "edited_at": format_ts(self.edited_ms)}


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]
    has_more: bool

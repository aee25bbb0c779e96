"""The store interface: the truth about messages.

Contract every implementation keeps:

- ``append`` assigns the room's next ``seq`` inside the committing transaction:
  1, 2, 3 … per room with no gap and no duplicate, whatever the number of
  concurrent writers on however many instances. A failed append leaves nothing
  behind (no message, no consumed seq).
- An ``idempotency_key`` is unique per room (a database constraint, not a
  check-then-insert): a repeat, even a concurrent one, returns the message the
  first call stored and ``created=False``. The store compares nothing else: the
  caller scopes keys (the gateway qualifies each by the poster's identity) and
  judges whether a repeat's text and author match the stored message.
- A message's seq, id, author and creation time never change. Its text changes
  only by ``change`` (an edit, or a delete that empties it and keeps the row as
  a tombstone at its seq), each change numbered by the room's own contiguous
  change counter; reads see every committed message and change.
- A removed text is gone from the webhook outbox too: a delete, ``purge_room``
  and ``delete_before`` empty the ``text`` (and set ``deleted_at``) of every
  outbox event of each message they remove, whatever its state, in their own
  transaction.
- Failures raise ``StoreUnavailable`` (the database cannot be reached or timed
  out), with ``outcome_unknown`` set where a write may have been committed all
  the same; nothing else is swallowed.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from chat_gateway.storage.moderation import Action, ModerationEntry, RoomModeration
    from chat_gateway.storage.search import Cursor, Query, RoomScope

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
    """A reaction to a deleted message (its tombstone takes none)."""


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
    """An edit, a delete or a reactions change (``reactions``): the room's change
    number, the room's last seq when it committed (it sits after that message), and
    the message as it is now."""

    change: int
    after_seq: int
    message: Message
    reactions: bool = False

    @property
    def kind(self) -> str:
        if self.reactions:
            return "reactions_updated"
        return "message_deleted" if self.message.deleted_ms is not None else "message_updated"

    def body(self) -> bytes:
        """What the change's frame carries (chat_gateway.core.frames.change_frame): the
        message's JSON for an edit or delete, ``{"seq", "reactions"}`` for a
        reactions change (the message's JSON always starts with ``{"id"``)."""
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
class Page:
    messages: list[Message]
    has_more: bool


class Store(ABC):
    """Messages and their per-room sequence. Constructors do no I/O; ``start`` connects."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    def listen(self, on_posted: Callable[[str, int], None]) -> None:
        """From now until ``close``, call ``on_posted(room, seq)`` for each message
        committed by a backend's SQL call (``chat_post``, Postgres only). A
        notification may be lost (the position check repairs it) or repeated. The
        default: a store with no such path calls nothing."""
        del on_posted

    async def unlisten(self) -> None:
        """Stop what ``listen`` started (``close`` does too). The default: nothing to stop."""
        return

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the versions applied now."""

    @abstractmethod
    async def append(
        self, room: str, author: str, text: str, idempotency_key: str | None = None
    ) -> tuple[Message, bool]:
        """Commit one message; return it and whether it was created now. An author
        banned or muted in the room (as of the commit, under the room's lock) is
        refused with ``Restricted`` and nothing is stored."""

    async def append_many(self, posts: list[tuple[str, str, str]]) -> list[Message | Exception]:
        """Commit new messages ``(room, author, text)`` in this order: within a room
        their seqs follow it. A post whose author is banned or muted in its room is
        not stored: its place holds ``Restricted``. This default commits one by one;
        a store that can commits them together, all (but those refused) or none."""
        from chat_gateway.storage.moderation import Restricted

        out: list[Message | Exception] = []
        for room, author, text in posts:
            try:
                out.append((await self.append(room, author, text))[0])
            except Restricted as exc:
                out.append(exc)
        return out

    @abstractmethod
    async def history(
        self, room: str, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> Page:
        """Messages ascending by seq. With ``after``: the first ``limit`` above it
        (``has_more``: more follow); otherwise the last ``limit`` below ``before``
        or the latest (``has_more``: earlier ones exist)."""

    @abstractmethod
    async def latest_seq(self, room: str) -> int:
        """The room's last committed seq, 0 for a room with no message."""

    async def latest_seqs(self, rooms: list[str]) -> dict[str, int]:
        """``latest_seq`` of each room (0 for a room with no message). This default
        asks room by room; a store that can answers all of them in one query."""
        return {room: await self.latest_seq(room) for room in rooms}

    @abstractmethod
    async def ping(self) -> None:
        """One round trip to the database; raises StoreUnavailable."""

    @abstractmethod
    async def delete_before(self, cutoff_ms: int, limit: int) -> int:
        """Delete at most ``limit`` messages committed before ``cutoff_ms`` (epoch ms) in
        one short transaction; return how many. Rooms keep their seq counter, so
        new messages never reuse a deleted seq."""

    @abstractmethod
    async def purge_room(self, room: str) -> int:
        """Delete every message of ``room`` committed so far, in one transaction; return
        how many. As with ``delete_before`` the room keeps its seq counter: the next
        message gets the next seq, never a purged one."""

    @abstractmethod
    async def search(
        self,
        query: Query,
        scope: RoomScope,
        *,
        limit: int,
        cursor: Cursor | None = None,
        timeout: float = 2.0,
    ) -> Page:
        """Messages matching ``query`` (``chat_gateway.storage.search``) in the rooms of
        ``scope``, newest first: by creation time, then room and seq, descending;
        with ``cursor`` only those after it in that order (so a page stays exact
        while new messages arrive). ``has_more``: more match after the last.

        The scope is a condition of the query itself, applied before the limit,
        never a filter of its result. A deleted message is never found; an edited
        one only by its current text; a purged or retention-deleted one not at all.
        The query runs for at most ``timeout`` seconds, then is cancelled
        (``SearchTimeout``), its connection left usable."""

    def write_outbox(self, endpoint_ids: list[int]) -> None:
        """From now on, every append also writes its messages' ``message.created``
        events to the webhook outbox, one row per receiver id, in the transaction
        that commits them (an empty list: no outbox rows, no cost)."""
        raise NotImplementedError(f"{type(self).__name__} has no webhook outbox")

    def outbox(self) -> Any:
        """The webhook outbox on this store's database (a ``chat_gateway.storage.outbox.Outbox``)."""
        raise NotImplementedError(f"{type(self).__name__} has no webhook outbox")

    # -- chat: edits, deletes, read positions (not abstract: a store without them
    # answers the routes with 503 through StoreUnavailable)

    async def change(
        self,
        room: str,
        seq: int,
        text: str | None,
        *,
        author: str | None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> tuple[Change | None, Message]:
        """Edit (``text``) or delete (``None``: text emptied, ``deleted_at`` set) the
        message at ``seq``, in one transaction that takes the room's row lock (as an
        append does), numbers the change and logs it. ``author``: only that author's
        message may be changed (``NotAuthor``), and not while that author is banned
        in the room, nor muted for an edit (``Restricted``, checked under the room's
        lock); None: any. Raises ``MessageNotFound``.
        ``idempotency_key`` is ``(owner, key)``: a repeat of a key the owner already
        used in the room changes nothing and returns the message that change was
        made to, as it is now (checked under the room's lock, so concurrent repeats
        too). Returns the change (None when nothing changed: a repeat, a repeated
        delete, an edit to the same text) and the message as it is now."""
        raise StoreUnavailable("this store keeps no changes")

    async def react(
        self, room: str, seq: int, user: str, reaction: str, *, add: bool
    ) -> tuple[Change | None, Message]:
        """Add (``add``) or remove ``user``'s ``reaction`` to the message at ``seq``, in
        one transaction that takes the room's row lock (as a change does), numbers
        the change, logs it, keeps the message's summary (``summarize``) on its row
        and writes its ``message.reactions_updated`` events. A user's reaction is
        there once: adding it again or removing one not there changes nothing
        (change None). Raises ``MessageNotFound``, ``MessageDeleted``, and
        ``Restricted`` for a banned or muted user (checked under the room's lock)."""
        raise StoreUnavailable("this store keeps no reactions")

    async def changes(self, room: str, *, after: int, limit: int = MAX_PAGE) -> list[Change]:
        """The room's changes numbered above ``after``, ascending, each with its
        message's current state (a change whose message is gone is left out)."""
        raise StoreUnavailable("this store keeps no changes")

    async def position(self, room: str) -> tuple[int, int]:
        """The room's last seq and last change number (0, 0 for an unknown room)."""
        return await self.latest_seq(room), 0

    async def mark_read(self, user: str, room: str, seq: int) -> ReadPosition:
        """Raise ``user``'s read position in ``room`` to ``seq`` (capped at the room's
        last seq), never lowering it, in one statement; return it."""
        raise StoreUnavailable("this store keeps no read positions")

    async def read_position(self, user: str, room: str) -> ReadPosition:
        raise StoreUnavailable("this store keeps no read positions")

    async def read_positions(
        self, user: str, limit: int = 1000, rooms: RoomFilter | None = None
    ) -> list[ReadPosition]:
        """Every room ``user`` has a position in (of ``rooms`` only, when given; the
        limit counts what the filter keeps), by room name."""
        raise StoreUnavailable("this store keeps no read positions")

    # -- moderation (chat_gateway.storage.moderation) ------------------------------

    async def room_moderations(self, rooms: list[str]) -> dict[str, RoomModeration]:
        """Each room's bans, mutes and slow mode as stored (a room never moderated:
        none), in one query."""
        raise StoreUnavailable("this store keeps no moderation")

    async def moderate(self, room: str, action: Action) -> ModerationEntry | None:
        """Apply ``action`` to the room in one transaction, under the room's row lock
        (as an append takes it): the room's restrictions, a line of its moderation
        log and, with webhook receivers, its ``moderation.*`` event. None (nothing
        written) when it changes nothing: lifting what is not there."""
        raise StoreUnavailable("this store keeps no moderation")

    async def moderation_log(
        self, room: str, *, limit: int, before: int | None = None
    ) -> list[ModerationEntry]:
        """The room's moderation log, newest first (ids below ``before`` when given)."""
        raise StoreUnavailable("this store keeps no moderation")

    async def banned_rooms(self, user: str) -> list[str]:
        """The rooms where ``user`` is banned now."""
        raise StoreUnavailable("this store keeps no moderation")

    def where(self) -> str:
        """What the store opens, fit for a log line (no password)."""
        return type(self).__name__

    def stats(self) -> dict[str, Any]:
        """Pool figures for metrics."""
        return {}

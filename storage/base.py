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
- Messages are immutable once committed; reads see every committed message.
- Failures raise ``StoreUnavailable`` (the database cannot be reached or timed
  out); nothing else is swallowed.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

MAX_PAGE = 200


class StoreUnavailable(Exception):
    """The database cannot be reached or did not answer in time."""


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
        query = "&".join("password=***" if part.lower().startswith("password=") else part
                         for part in query.split("&"))
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


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
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1000 + dt.microsecond // 1000


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    room: str
    seq: int
    author: str
    text: str
    created_ms: int  # commit time, epoch milliseconds
    # The JSON of to_dict, made on first use: a message is encoded once for every
    # history read, ack and publish that carries it.
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "room": self.room,
            "seq": self.seq,
            "author": self.author,
            "text": self.text,
            "created_at": format_ts(self.created_ms),
        }

    def to_json(self) -> bytes:
        encoded = self._json
        if encoded is None:
            encoded = orjson.dumps(self.to_dict())
            object.__setattr__(self, "_json", encoded)
        return encoded


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

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the versions applied now."""

    @abstractmethod
    async def append(self, room: str, author: str, text: str,
                     idempotency_key: str | None = None) -> tuple[Message, bool]:
        """Commit one message; return it and whether it was created now."""

    async def append_many(self, posts: list[tuple[str, str, str]]) -> list[Message]:
        """Commit new messages ``(room, author, text)`` in this order: within a room
        their seqs follow it. This default commits one by one; a store that can
        commits them together, all or none."""
        return [(await self.append(room, author, text))[0] for room, author, text in posts]

    @abstractmethod
    async def history(self, room: str, *, limit: int = 50, before: int | None = None,
                      after: int | None = None) -> Page:
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
    def write_outbox(self, endpoint_ids: list[int]) -> None:
        """From now on, every append also writes its messages' ``message.created``
        events to the webhook outbox, one row per receiver id, in the transaction
        that commits them (an empty list: no outbox rows, no cost)."""
        raise NotImplementedError(f"{type(self).__name__} has no webhook outbox")

    def outbox(self) -> Any:
        """The webhook outbox on this store's database (a ``storage.outbox.Outbox``)."""
        raise NotImplementedError(f"{type(self).__name__} has no webhook outbox")

    def stats(self) -> dict[str, Any]:
        """Pool figures for metrics."""
        return {}


def create_store(url: str, **options: Any) -> Store:
    """Pick the implementation by URL; the driver is imported only in its branch."""
    if url.startswith(("postgres://", "postgresql://")):
        from storage.postgres import PostgresStore

        return PostgresStore(url, **options)
    if url.startswith("sqlite://"):
        from storage.sqlite import SQLiteStore

        return SQLiteStore(url, **options)
    raise ValueError(f"unsupported DATABASE_URL {url!r}: use postgresql://… or sqlite:///PATH")

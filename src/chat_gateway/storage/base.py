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

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from chat_gateway.storage.records import (
    MAX_MENTIONS,
    MAX_PAGE,
    REACTION_USERS,
    Change,
    Message,
    MessageDeleted,
    MessageNotFound,
    NotAuthor,
    Page,
    ReadPosition,
    RoomFilter,
    StoreUnavailable,
    Version,
    change_event,
    display_url,
    format_ts,
    new_id,
    parse_ts,
    summarize,
    thread_summary,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from chat_gateway.storage.moderation import Action, ModerationEntry, RoomModeration
    from chat_gateway.storage.search import Cursor, Query, RoomScope

__all__ = [
    "MAX_MENTIONS",
    "MAX_PAGE",
    "Version",
    "thread_summary",
    "StoreUnavailable",
    "display_url",
    "MessageNotFound",
    "NotAuthor",
    "MessageDeleted",
    "REACTION_USERS",
    "summarize",
    "new_id",
    "format_ts",
    "parse_ts",
    "Message",
    "change_event",
    "Change",
    "ReadPosition",
    "RoomFilter",
    "Page",
    "Store",
]


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
        self,
        room: str,
        author: str,
        text: str,
        idempotency_key: str | None = None,
        *,
        reply_to: int | None = None,
        mentions: tuple[str, ...] = (),
    ) -> tuple[Message, bool]:
        """Commit one message; return it and whether it was created now. An author
        banned or muted in the room (as of the commit, under the room's lock) is
        refused with ``Restricted`` and nothing is stored.

        ``reply_to``: the seq of the message of the same room this one replies to
        (``MessageNotFound`` when there is none, ``MessageDeleted`` when it is a
        tombstone; nothing stored). In the same transaction the parent's ``thread``
        summary is raised and a thread change numbered and logged; the new message
        carries that change in ``follow`` for the caller to announce.
        ``mentions``: user ids (deduplicated by the caller), kept with the message
        and counted in ``read_position(s)``."""

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

    async def replies(self, room: str, seq: int, *, after: int | None, limit: int) -> Page:
        """The replies to the message at ``seq``, ascending by seq (after ``after``
        when given; ``has_more``: more follow). ``MessageNotFound`` when there is no
        such message, ``MessageDeleted`` when it is a tombstone."""
        raise StoreUnavailable("this store keeps no replies")

    async def versions(self, room: str, seq: int) -> tuple[Message, list[Version]]:
        """The message at ``seq`` and its earlier texts, oldest first (none for one
        never edited). ``MessageNotFound`` when there is no such message,
        ``MessageDeleted`` when it is a tombstone (a delete removed them all)."""
        raise StoreUnavailable("this store keeps no versions")

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

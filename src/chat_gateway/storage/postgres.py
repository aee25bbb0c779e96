"""Postgres store through an asyncpg pool.

The seq of a room is the ``rooms.last_seq`` counter, incremented by an upsert in
the same statement that inserts the message: the row lock it takes serialises
the writers of one room (and only them), and a failed insert rolls the
increment back, so seqs have no gap.

Posts without an idempotency key are committed in groups: whatever arrives
while a group is being committed goes in the next statement (one transaction,
one WAL flush). The statement upserts each room of the group once, in room
order (so two groups never wait on each other in a cycle), raising its
counter by the room's number of messages, and numbers them in arrival order.
A group's statement commits all of it or none of it; every caller gets its
own seq or the error. A statement refused for one row's data is committed
again in halves, down to that row, so one bad post never fails another's.
Posts with a key keep the single statement above, so a duplicate key can only
ever fail its own post.

One committer (a task committing groups back to back on one pooled connection)
does the committing while it keeps up, which makes the groups as large as the
load: fewer statements, fewer commits, less CPU in the gateway and in
Postgres. Another committer starts only when every running committer has been
on one statement longer than ``GROUP_STALL`` (a lock wait on a room another
instance is writing, a slow flush), so one stalled statement does not hold
the posts of every other room.

Every operation (a post, an edit or delete, a read, a purge, an outbox step) is
answered within ``command_timeout`` as a whole (waiting for a connection, every
statement it sends, the commit), whatever the network does: each runs in one
``_operation``, the only place a deadline is set. A link that
stops answering without a reset (a frozen server or network) would otherwise
hold the caller twice more: asyncpg's cancel request and the connection's
release go down the same silent path. A connection whose statement failed or
was given up on is therefore released in the background, within its own
bound (then terminated), never by the caller.

An operation that fails tells whether a write of it may have been committed:
``StoreUnavailable.outcome_unknown`` is set when a write statement (or a
transaction's commit) was sent and no answer came (the deadline, a lost
connection); a write never sent (no connection in time, a post withdrawn from
its group) or refused by the server stored nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from chat_gateway.storage import migrations
from chat_gateway.storage.base import (
    Change,
    Message,
    MessageDeleted,
    MessageNotFound,
    NotAuthor,
    Page,
    ReadPosition,
    RoomFilter,
    StateEntry,
    StateSnapshot,
    Store,
    StoreUnavailable,
    Version,
    change_event,
    display_url,
    format_ts,
    new_id,
    summarize,
    thread_summary,
)
from chat_gateway.storage.listen_postgres import Listener
from chat_gateway.storage.moderation import (
    BANNED,
    Action,
    ModerationEntry,
    Restricted,
    RoomModeration,
    apply,
    check_append,
    check_change,
    entry,
    log_row,
    now_ms,
)
from chat_gateway.storage.search import Cursor, Query, RoomScope, SearchTimeout

log = logging.getLogger("storage.postgres")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# pg_advisory_lock key for migrations: any fixed 64-bit number, the same on every instance.
MIGRATION_LOCK = 0x63686174_6777  # "chatgw"
# A search first looks for its matches among this many of the newest rows; finding
# too few, it asks the words' GIN index when the planner expects at most
# SEARCH_FEW matches, else walks on newest first (see PostgresStore.search).
SEARCH_RECENT_ROWS = 1000
SEARCH_FEW = 2000

_COLUMNS = (
    "id, room, seq, author, text, "
    "(extract(epoch from created_at) * 1000)::bigint AS created_ms, version, "
    "(extract(epoch from edited_at) * 1000)::bigint AS edited_ms, "
    "(extract(epoch from deleted_at) * 1000)::bigint AS deleted_ms, reactions, "
    "reply_to, mentions, thread"
)

# A banned or muted author (chat_may_post, migration 0011) gets no row: the room's
# row is locked but not raised, and nothing is inserted. ON CONFLICT DO UPDATE
# reads the row's newest version, so a ban committed while this statement waited
# for the row's lock is seen (storage.moderation).
_APPEND = """
WITH r AS (
    INSERT INTO rooms AS r (room, last_seq) VALUES ($1, 1)
    ON CONFLICT (room) DO UPDATE SET last_seq = r.last_seq + 1
        WHERE chat_may_post(r.banned, r.muted, $3)
    RETURNING room, last_seq, last_change
)
INSERT INTO messages (room, seq, id, author, text, created_at, idempotency_key)
SELECT $1, last_seq, $2, $3, $4, $5, $6 FROM r
RETURNING seq, (SELECT last_change FROM r) AS changes
"""

_APPEND_GROUP = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
        WITH ORDINALITY AS t(room, id, author, text, created_at, ord)
), counts AS (
    SELECT room, count(*) AS n FROM input GROUP BY room
), r AS (
    INSERT INTO rooms AS r (room, last_seq)
    SELECT room, n FROM counts ORDER BY room
    ON CONFLICT (room) DO UPDATE SET last_seq = r.last_seq + (
        SELECT count(*) FROM input i
        WHERE i.room = r.room AND chat_may_post(r.banned, r.muted, i.author))
    RETURNING room, last_seq, last_change, banned, muted
), ok AS (
    SELECT i.*, row_number() OVER (PARTITION BY i.room ORDER BY i.ord) AS k,
           count(*) OVER (PARTITION BY i.room) AS n
    FROM input i JOIN r USING (room) WHERE chat_may_post(r.banned, r.muted, i.author)
)
INSERT INTO messages (room, seq, id, author, text, created_at)
SELECT ok.room, r.last_seq - ok.n + ok.k, ok.id, ok.author, ok.text, ok.created_at
FROM ok JOIN r USING (room)
RETURNING id, seq, (SELECT r.last_change FROM r WHERE r.room = messages.room) AS changes
"""

_OUTBOX = """,
o AS (
    INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, pos, data,
                                created_at, next_at)
    SELECT e, 'evt_' || m.id, 'message.created', m.room, m.seq,
           m.seq + (SELECT r.last_change FROM r WHERE r.room = m.room),
           json_build_object('id', m.id, 'room', m.room, 'seq', m.seq, 'author', m.author,
                             'text', m.text, 'created_at', to_char(m.created_at AT TIME ZONE
                             'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::text,
           m.created_at, m.created_at
    FROM m CROSS JOIN unnest(${param}::bigint[]) AS e
)
"""


def with_outbox(statement: str) -> str:
    """An append statement that also writes each message's ``message.created`` event
    to the webhook outbox, one row per receiver, in the same transaction: its
    ``INSERT INTO messages`` becomes a CTE whose rows feed the outbox insert, and
    the statement returns what it returned before (its RETURNING list is read
    from that CTE under the table's name, so it may name ``messages``). The receivers' ids are one
    more parameter, after the statement's own."""
    head, _, insert = statement.rpartition("\nINSERT INTO messages")
    insert, _, returning = insert.rpartition("RETURNING ")
    param = max(int(n) for n in re.findall(r"\$(\d+)", statement)) + 1
    return (
        f"{head},\nm AS (\nINSERT INTO messages{insert}RETURNING *\n)"
        f"{_OUTBOX.format(param=param)}SELECT {returning.strip()} FROM m AS messages\n"
    )


# The most committers at once, how long a statement runs before another committer may
# take off (seconds), and the most posts in one group.
GROUP_COMMITTERS = 4
GROUP_STALL = 0.02
GROUP_MAX = 256

_BY_KEY = f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND idempotency_key = $2"

# Where a new connection landed: the server's cluster (a promoted standby keeps its
# primary's) and the timeline it writes on (one more with every promotion).
# (None on a standby, which takes no write anyway.)
_TIMELINE = (
    "SELECT system_identifier, CASE WHEN NOT pg_is_in_recovery() THEN "
    "('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int END "
    "AS timeline FROM pg_control_system()"
)


class StalePrimary(Exception):
    """A server that writes on an older timeline than one this store has written on:
    a primary whose standby was promoted, back up as a primary (a split brain)."""


# A database that cannot take the statement now: unreachable, starting, shutting
# down or crashed (a failover in progress), out of connections, or a standby (a
# demoted primary, or no host of a multi-host URL is the primary yet), or a
# connection whose protocol state the server's end of the session broke (asyncpg's
# InternalClientError: "cannot switch to state …"). The caller
# answers 503 and may retry; nothing was committed by this statement unless its
# commit's reply was lost, which an Idempotency-Key retry finds.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InternalClientError,
    StalePrimary,
)


# The array types the statements bind (the group commit's columns, latest_seqs'
# rooms). asyncpg looks a connection's codecs for them up with a catalog query the
# first time a statement binds them: tens of milliseconds (more on a busy server)
# that the first post through each pooled connection would wait for.
_ARRAY_TYPES = "SELECT $1::text[], $2::timestamptz[]"


async def _prime(conn: asyncpg.Connection) -> None:
    """A new pooled connection looks its array types up now, before any post needs it
    (the floor connections are made at start-up and kept; see the pool's min_size)."""
    await conn.prepare(_ARRAY_TYPES)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default sends a reset query (unlock
    advisory locks, close cursors, UNLISTEN, RESET ALL): one more round trip for
    every statement. This store leaves no session state on a pooled connection
    (no SET, LISTEN, cursor or advisory lock; migrations take their own
    connection), and an open transaction is still rolled back by asyncpg first."""


# Failures that leave a statement already sent without an answer: the deadline, a
# socket error, a connection lost mid-way. (An error the server answered with
# means it rolled the statement back; a client-side refusal means nothing went.)
_UNANSWERED = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError)

# A statement refused for what one of its rows holds (the database's data errors,
# asyncpg's own for an argument it cannot encode, a constraint): the connection is
# fine, and the other rows of a group may commit without that one.
_ROW_FAULTS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _unavailable(exc: BaseException, *, sent: bool = False) -> StoreUnavailable:
    """The store's failure for ``exc``; ``sent``: a write of the operation had gone
    out, so an unanswered failure leaves its outcome unknown."""
    return StoreUnavailable(
        f"Postgres unavailable: {exc!r}",
        outcome_unknown=sent and isinstance(exc, _UNANSWERED),
    )


class _Operation:
    """One store operation under way: ``sent`` once a write of it (a statement outside
    a transaction, or a transaction's commit) went to the database."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


def _fail(group: list[Any], exc: BaseException, *, sent: bool) -> None:
    """Every post of a group that failed gets the error (``StoreUnavailable`` for a lost
    or unreachable database; ``sent``: its statement had gone out)."""
    err = _unavailable(exc, sent=sent) if isinstance(exc, _UNAVAILABLE) else exc
    for item in group:
        if not item[5].done():
            item[5].set_exception(err)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a given-up future's outcome as seen (no "never retrieved" report)."""
    if not future.cancelled():
        future.exception()


def _literal(text: str) -> str:
    """``text`` as a SQL string literal (for DDL, which takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _row(r: Any) -> Message:
    return Message(
        r["id"],
        r["room"],
        r["seq"],
        r["author"],
        r["text"],
        r["created_ms"],
        r["version"],
        r["edited_ms"],
        r["deleted_ms"],
        reactions=None if r["reactions"] is None else orjson.loads(r["reactions"]),
        reply_to=r["reply_to"],
        mentions=None if r["mentions"] is None else tuple(orjson.loads(r["mentions"])),
        thread=None if r["thread"] is None else orjson.loads(r["thread"]),
    )


# -- chat: edits, deletes, read positions --------------------------------------

# An edit's or delete's event, one row per receiver, in the change's transaction;
# pos: the change's place in the room's commit order (after_seq + change number).
_CHANGE_OUTBOX = """
INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, pos, data, created_at,
                            next_at)
SELECT e, $1, $2, $4, $5, $6, $3, $7, $7 FROM unnest($8::bigint[]) AS e
"""

_MESSAGE_FOR_UPDATE = f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq = $2 FOR UPDATE"
# The room's row, locked as an append locks it: changes and posts of a room commit
# one at a time, so a change's after_seq is exact.
_ROOM_FOR_UPDATE = (
    "SELECT last_seq, last_change, banned::text, muted::text FROM rooms WHERE room = $1 FOR UPDATE"
)


async def _message_in(conn: Any, pos: Any, room: str, seq: int) -> Message:
    """The message at ``seq``, locked (``pos``: the room's locked row, None when the
    room has none); ``MessageNotFound`` when there is none."""
    row = None if pos is None else await conn.fetchrow(_MESSAGE_FOR_UPDATE, room, seq)
    if row is None:
        raise MessageNotFound(f"no message {seq} in room {room!r}")
    return _row(row)


# An edit keeps the text it replaces: the version the message had, and the edit's time.
_KEEP_VERSION = (
    "INSERT INTO message_versions (room, seq, version, text, edited_at) "
    "SELECT room, seq, version, text, $3 FROM messages WHERE room = $1 AND seq = $2"
)
_EDIT = (
    "UPDATE messages SET text = $3, version = version + 1, edited_at = $4 "
    f"WHERE room = $1 AND seq = $2 RETURNING {_COLUMNS}"
)
# A delete empties the text in the row itself: the text is gone, not hidden.
_DELETE = (
    "UPDATE messages SET text = '', version = version + 1, deleted_at = $3, reactions = NULL, "
    "mentions = NULL "
    f"WHERE room = $1 AND seq = $2 RETURNING {_COLUMNS}"
)


def _scrub(gone: str, at: str) -> str:
    """The statement (or CTE body) that takes the text out of every webhook event of
    the messages ``gone`` lists (a relation with ``room`` and ``seq``): each event
    that still carries text (a ``message.created``, an edit's ``message.updated``),
    whatever its state (pending, delivered and kept, dead), keeps its fields with
    ``text`` empty and ``deleted_at`` set to ``at`` (a parameter: the removal's time
    as the API writes it). A later attempt, replay or dead-letter listing therefore
    carries no text of a removed message. Events found by ``webhook_outbox_message``."""
    return (
        "UPDATE webhook_outbox o SET data = (o.data::jsonb || jsonb_build_object("
        f"'text', '', 'deleted_at', {at}::text))::text FROM {gone} "
        "WHERE o.room = gone.room AND o.seq = gone.seq AND o.data::jsonb ->> 'text' <> ''"
    )


# A deleted message's earlier events (its own message.deleted has no text).
_SCRUB_MESSAGE = _scrub("(SELECT $1::text AS room, $2::bigint AS seq) AS gone", "$3")

_CHANGES = """
SELECT c.change, c.after_seq, c.kind, m.id, m.room, m.seq, m.author, m.text,
       (extract(epoch from m.created_at) * 1000)::bigint AS created_ms, m.version,
       (extract(epoch from m.edited_at) * 1000)::bigint AS edited_ms,
       (extract(epoch from m.deleted_at) * 1000)::bigint AS deleted_ms, m.reactions,
       m.reply_to, m.mentions, m.thread
FROM message_changes c JOIN messages m ON m.room = c.room AND m.seq = c.seq
WHERE c.room = $1 AND c.change > $2 ORDER BY c.change LIMIT $3
"""
# One upsert: capped at the room's last seq, never lowered (GREATEST under the
# conflict's row lock), so concurrent marks cannot move a position back.
_MARK_READ = """
WITH r AS (SELECT last_seq FROM rooms WHERE room = $2)
INSERT INTO read_positions AS p (user_name, room, seq, updated_at)
SELECT $1, $2, LEAST($3, r.last_seq), now() FROM r
ON CONFLICT (user_name, room) DO UPDATE
    SET seq = GREATEST(p.seq, EXCLUDED.seq), updated_at = EXCLUDED.updated_at
RETURNING seq, (SELECT last_seq FROM r) AS last_seq, (
    SELECT count(*) FROM mentions x JOIN messages m ON m.room = x.room AND m.seq = x.seq
    WHERE x.user_name = $1 AND x.room = $2 AND x.seq > p.seq
      AND m.deleted_at IS NULL AND m.author <> $1) AS mentions
"""
_READ_POSITION = """
SELECT coalesce(p.seq, 0) AS seq, coalesce(r.last_seq, 0) AS last_seq, (
    SELECT count(*) FROM mentions x JOIN messages m ON m.room = x.room AND m.seq = x.seq
    WHERE x.user_name = $1 AND x.room = $2 AND x.seq > coalesce(p.seq, 0)
      AND m.deleted_at IS NULL AND m.author <> $1) AS mentions
FROM (SELECT 1) AS one
LEFT JOIN rooms r ON r.room = $2
LEFT JOIN read_positions p ON p.user_name = $1 AND p.room = $2
"""
_READ_POSITIONS = """
SELECT p.room, p.seq, coalesce(r.last_seq, 0) AS last_seq, (
    SELECT count(*) FROM mentions x JOIN messages m ON m.room = x.room AND m.seq = x.seq
    WHERE x.user_name = $1 AND x.room = p.room AND x.seq > p.seq
      AND m.deleted_at IS NULL AND m.author <> $1) AS mentions
FROM (
    SELECT room, seq FROM read_positions WHERE user_name = $1
    UNION ALL
    -- a room never marked read, where the user is mentioned: position 0
    SELECT DISTINCT x.room, 0::bigint FROM mentions x
    JOIN messages m ON m.room = x.room AND m.seq = x.seq
    WHERE x.user_name = $1 AND m.deleted_at IS NULL AND m.author <> $1
      AND NOT EXISTS (SELECT 1 FROM read_positions q WHERE q.user_name = $1 AND q.room = x.room)
) AS p LEFT JOIN rooms r ON r.room = p.room
WHERE ($3::text[] IS NULL OR p.room = ANY($3::text[])
       OR EXISTS (SELECT 1 FROM unnest($4::text[]) AS pre WHERE starts_with(p.room, pre)))
ORDER BY p.room LIMIT $2
"""


# The room's row locked (made if new) as an append locks it (see _APPEND), its
# position and restrictions read: taken first by a reply or a post with mentions, a
# moderation action and a state room's writes.
_LOCK_ROOM = (
    "INSERT INTO rooms AS r (room, last_seq) VALUES ($1, 0) "
    "ON CONFLICT (room) DO UPDATE SET last_seq = r.last_seq "
    "RETURNING last_seq, last_change, banned::text, muted::text, slow_mode"
)

# -- state rooms: the room's row locked (_LOCK_ROOM), then the writes take its next
# seqs and replace each key's row.
_STATE_WRITE = """
WITH raised AS (
    UPDATE rooms SET last_seq = last_seq + $4 WHERE room = $1 RETURNING last_seq - $4 AS base
)
INSERT INTO room_state AS s (room, key, value, seq, updated_at, deleted)
SELECT $1, t.key, t.value::jsonb, raised.base + t.n, $5, t.value IS NULL
FROM raised, unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(key, value, n)
ON CONFLICT (room, key) DO UPDATE
    SET value = excluded.value, seq = excluded.seq, updated_at = excluded.updated_at,
        deleted = excluded.deleted
RETURNING s.key, s.seq
"""
# One statement, so one snapshot: the keys and the room's last seq agree.
_STATE = """
SELECT r.last_seq, r.state_purged_seq, s.key, s.value::text AS value, s.seq, s.updated_at
FROM rooms r LEFT JOIN room_state s ON s.room = r.room AND s.seq > $2
WHERE r.room = $1 ORDER BY s.seq
"""
_PURGE_TOMBSTONES = """
WITH gone AS (
    DELETE FROM room_state WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM room_state WHERE deleted AND updated_at < $1
        ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING room, seq
), raised AS (
    UPDATE rooms r SET state_purged_seq = greatest(r.state_purged_seq, g.top)
    FROM (SELECT room, max(seq) AS top FROM gone GROUP BY room) g WHERE r.room = g.room
)
SELECT count(*) FROM gone
"""


def _ms(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(milliseconds=1)


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        search_language: str = "simple",
    ) -> None:
        if pool_max < 1 or pool_min < 0 or pool_min > pool_max:
            raise ValueError("pool sizes must satisfy 0 <= min <= max, max >= 1")
        self.url = url
        self.search_language = search_language
        # How a search finds its matches (see search); tests set them to take
        # each way.
        self.search_recent_rows = SEARCH_RECENT_ROWS
        self.search_few = SEARCH_FEW
        self._pool_args = dict(
            min_size=pool_min,
            max_size=pool_max,
            timeout=connect_timeout,
            command_timeout=command_timeout,
            max_inactive_connection_lifetime=idle_timeout,
        )
        self._acquire_timeout = connect_timeout + command_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._releases: set[asyncio.Task[None]] = set()  # given-up connections going back
        self._waiting: list[
            tuple[str, str, str, str, datetime, asyncio.Future[tuple[int, int]]]
        ] = []
        # Each committer, and when its statement in progress started (loop time).
        self._committers: dict[asyncio.Task[None], float] = {}
        # Per database cluster (system identifier), the latest timeline connected to.
        self._timelines: dict[int, int] = {}
        # The append statements and their extra arguments: with webhook receivers,
        # the variants that write the outbox too (see write_outbox).
        self._append_sql, self._append_group_sql = _APPEND, _APPEND_GROUP
        self._outbox_args: tuple[list[int], ...] = ()
        self._listener: Listener | None = None  # chat_post's wake-ups (listen)

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, reset=_keep_session, init=self._init_connection, **self._pool_args
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            # Refused, unknown host, no such database, bad credentials: the server's
            # or the socket's sentence, with the target it was about.
            raise self._cannot_connect(exc) from exc

    def listen(self, on_posted: Callable[[str, int], None]) -> None:
        self._listener = Listener(self.url, on_posted, timeout=self._pool_args["timeout"])
        self._listener.start()

    async def unlisten(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close()

    async def close(self) -> None:
        await self.unlisten()
        if self._releases:
            await asyncio.wait(self._releases, timeout=self._command_timeout)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()

    def _cannot_connect(self, exc: BaseException) -> StoreUnavailable:
        reason = str(exc) or type(exc).__name__
        return StoreUnavailable(f"cannot connect to Postgres at {display_url(self.url)}: {reason}")

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        return self._pool

    async def _call(self, method: str, query: str, *args: Any, write: bool = False) -> Any:
        """One statement as one operation (``write``: it may store something)."""
        async with self._operation() as op:
            return await self._statement(op, method, query, *args, write=write)

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[_Operation]:
        """The deadline of one store operation: everything in it (waiting for
        connections, every statement, the commit) within the command timeout; a
        failure of the database is raised as ``StoreUnavailable``, its outcome
        unknown when a write had gone out."""
        op = _Operation()
        try:
            async with asyncio.timeout(self._command_timeout):
                yield op
        except _UNAVAILABLE as exc:
            raise _unavailable(exc, sent=op.sent) from exc

    async def _statement(
        self, op: _Operation, method: str, query: str, *args: Any, write: bool = False
    ) -> Any:
        """One statement of operation ``op`` on a pooled connection of its own."""
        async with self._connection() as conn:
            op.sent = op.sent or write
            return await getattr(conn, method)(query, *args)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection for the body, within the deadline of the operation
        around it. One whose body failed is released in the background (see the
        module's docstring), never by the caller."""
        pool = self.pool
        # No timeout of the pool's own: the operation's deadline bounds the wait
        # (and asyncpg's would cost a task per call).
        conn = await pool.acquire()
        try:
            yield conn
        except BaseException as exc:
            if isinstance(exc, _UNAVAILABLE):
                await self._failed(exc, conn)
            self._release_later(conn)
            raise
        await pool.release(conn)  # nothing to send: the session is kept (_keep_session)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _transaction(conn: Any) -> AsyncIterator[None]:
        """A transaction on ``conn``, within the deadline of the operation around it:
        committed when the body ends, rolled back when it raises (a message not
        found, not the author). One that cannot end cleanly (the deadline came, the
        link failed, the commit or rollback got no answer) is ended by closing the
        connection, which the server rolls back: a ROLLBACK down a frozen link would
        hold the caller past its deadline."""
        tx = conn.transaction()
        await tx.start()
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, Exception) and not isinstance(exc, _UNAVAILABLE):
                try:
                    await tx.rollback()
                except BaseException:
                    conn.terminate()
                    raise
            else:
                conn.terminate()
            raise
        try:
            await tx.commit()
        except BaseException:
            conn.terminate()
            raise

    def _release_later(self, conn: Any) -> None:
        """Give a connection back without waiting for it: its statement failed or was
        given up on, and asyncpg first waits for the cancel request to go through."""
        task = asyncio.get_running_loop().create_task(self._release(conn))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        """A new pooled connection: refused if it reached a stale primary, then primed."""
        await self._check_timeline(conn)
        await _prime(conn)

    async def _check_timeline(self, conn: asyncpg.Connection) -> None:
        """Each new pooled connection: a server on an older timeline of the cluster
        than one this store has written on is an old primary that came back as a
        primary after its standby was promoted. It is refused (503 until the
        orchestrator fences it), so it never takes a write."""
        row = await conn.fetchrow(_TIMELINE)
        if row["timeline"] is None:
            return
        cluster, timeline = int(row["system_identifier"]), int(row["timeline"])
        latest = self._timelines.get(cluster, 0)
        if timeline < latest:
            log.warning(
                "refusing a stale Postgres primary: it writes on timeline %d, "
                "the cluster is on timeline %d",
                timeline,
                latest,
            )
            raise StalePrimary(f"the server is a stale primary (timeline {timeline} < {latest})")
        self._timelines[cluster] = timeline

    async def _failed(self, exc: BaseException, conn: Any = None) -> None:
        """A read-only answer means the pool holds connections to a server that is a
        standby now (a failover demoted it): every pooled connection is replaced on
        its next use, by one the URL's ``target_session_attrs`` sends to the primary.
        A connection in a broken protocol state is closed, not pooled again."""
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError) and self._pool is not None:
            log.warning("Postgres answered read-only: reconnecting the pool to the primary")
            await self._pool.expire_connections()
        elif isinstance(exc, asyncpg.InternalClientError) and conn is not None:
            conn.terminate()

    def write_outbox(self, endpoint_ids: list[int]) -> None:
        if endpoint_ids:
            self._append_sql, self._append_group_sql = (
                with_outbox(_APPEND),
                with_outbox(_APPEND_GROUP),
            )
            self._outbox_args = (list(endpoint_ids),)
        else:
            self._append_sql, self._append_group_sql = _APPEND, _APPEND_GROUP
            self._outbox_args = ()

    def outbox(self) -> Any:
        from chat_gateway.storage.outbox_postgres import PostgresOutbox

        return PostgresOutbox(self)

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        try:
            conn = await asyncpg.connect(self.url, timeout=self._pool_args["timeout"])
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise self._cannot_connect(exc) from exc
        try:
            # Several instances may start at once: one migrates, the others wait here,
            # asking again and again rather than blocking in one statement: a
            # waiting statement's transaction would hold up the migrating
            # instance's CREATE INDEX CONCURRENTLY, which waits for older ones.
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
                await asyncio.sleep(0.2)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for version, sql in migrations.load("postgres"):
                    if version in done:
                        continue
                    started = time.monotonic()
                    if migrations.outside_transaction(sql):
                        for statement in migrations.statements(sql):
                            await conn.execute(statement)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", version
                        )
                    else:
                        async with conn.transaction():
                            await conn.execute(sql)
                            await conn.execute(
                                "INSERT INTO schema_migrations (version) VALUES ($1)", version
                            )
                    log.info(
                        "applied migration",
                        extra={"version": version, "seconds": round(time.monotonic() - started, 3)},
                    )
                    applied.append(version)
                await self._keep_search_language(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        finally:
            await conn.close()
        return applied

    async def _keep_search_language(self, conn: asyncpg.Connection) -> None:
        """Index with ``search_language``: when the stored messages were indexed with
        another, replace the indexing function and index them all again, in batches
        (searches meanwhile find the messages re-indexed so far)."""
        current = await conn.fetchval("SELECT language FROM search_settings")
        if current == self.search_language:
            return
        try:
            await conn.execute(f"SELECT to_tsvector({_literal(self.search_language)}, '')")
        except asyncpg.UndefinedObjectError:
            raise StoreUnavailable(
                f"SEARCH_LANGUAGE={self.search_language!r} is not a text search "
                "configuration of this database (see \\dF in psql; simple and english are)"
            ) from None
        log.warning(
            "re-indexing messages for search",
            extra={"from_language": current, "to_language": self.search_language},
        )
        async with conn.transaction():
            await conn.execute(
                "CREATE OR REPLACE FUNCTION messages_search_vector(body text) RETURNS tsvector "
                "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT to_tsvector("
                f"{_literal(self.search_language)}::regconfig, "
                "regexp_replace(body, '[^[:alnum:]]+', ' ', 'g')) $$"
            )
            await conn.execute("UPDATE search_settings SET language = $1", self.search_language)
        await conn.execute("CALL messages_search_fill(10000, true)")

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
        if reply_to is not None or mentions:
            return await self._append_extras(
                room, author, text, idempotency_key, reply_to, mentions
            )
        # One deadline for all of it: the key lookup, the insert, the lookup after a race.
        try:
            async with self._operation() as op:
                return await self._append(op, room, author, text, idempotency_key)
        except Restricted as exc:
            if exc.kind:
                raise
            raise (await self._refusals([(room, author)]))[0] from None

    async def _append_extras(
        self,
        room: str,
        author: str,
        text: str,
        idempotency_key: str | None,
        reply_to: int | None,
        mentions: tuple[str, ...],
    ) -> tuple[Message, bool]:
        """A reply or a post with mentions: one transaction of its own under the room's
        row lock (as a change takes it), which also raises the parent's thread and
        numbers and logs its thread change, so a subscriber resuming from the change
        log replays it once, right after the reply."""
        ms = int(time.time() * 1000)
        at = _EPOCH + timedelta(milliseconds=ms)
        mid = new_id(ms)
        async with self._operation() as op, self._connection() as conn:
            async with self._transaction(conn):
                pos = await conn.fetchrow(_LOCK_ROOM, room)
                if idempotency_key is not None:  # under the lock: a concurrent repeat is seen
                    row = await conn.fetchrow(_BY_KEY, room, idempotency_key)
                    if row is not None:
                        return _row(row), False
                check_append(
                    RoomModeration.of_row(room, pos["banned"], pos["muted"], 0), author, ms
                )
                parent = None
                if reply_to is not None:
                    parent = await _message_in(conn, pos, room, reply_to)
                    if parent.deleted_ms is not None:
                        raise MessageDeleted(f"message {reply_to} in room {room!r} is deleted")
                seq, changes = int(pos["last_seq"]) + 1, int(pos["last_change"])
                await conn.execute("UPDATE rooms SET last_seq = $2 WHERE room = $1", room, seq)
                msg = Message(
                    mid,
                    room,
                    seq,
                    author,
                    text,
                    ms,
                    changes=changes,
                    reply_to=reply_to,
                    mentions=mentions or None,
                )
                await conn.execute(
                    "INSERT INTO messages (room, seq, id, author, text, created_at, "
                    "idempotency_key, reply_to, mentions) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    room,
                    seq,
                    mid,
                    author,
                    text,
                    at,
                    idempotency_key,
                    reply_to,
                    orjson.dumps(list(mentions)).decode() if mentions else None,
                )
                if mentions:
                    await conn.execute(
                        "INSERT INTO mentions (user_name, room, seq) "
                        "SELECT u, $2, $3 FROM unnest($1::text[]) AS u",
                        list(mentions),
                        room,
                        seq,
                    )
                if self._outbox_args:
                    await conn.execute(
                        _CHANGE_OUTBOX,
                        "evt_" + mid,
                        "message.created",
                        msg.to_json().decode(),
                        room,
                        seq,
                        seq + changes,
                        at,
                        *self._outbox_args,
                    )
                if parent is not None:
                    count = int((parent.thread or {}).get("replies", 0)) + 1
                    thread = thread_summary(count, seq, ms)
                    row = await conn.fetchrow(
                        f"UPDATE messages SET thread = $3 WHERE room = $1 AND seq = $2"
                        f" RETURNING {_COLUMNS}",
                        room,
                        parent.seq,
                        orjson.dumps(thread).decode(),
                    )
                    number = changes + 1
                    await conn.execute(
                        "UPDATE rooms SET last_change = $2 WHERE room = $1", room, number
                    )
                    await conn.execute(
                        "INSERT INTO message_changes (room, change, seq, after_seq, kind) "
                        "VALUES ($1, $2, $3, $4, 'thread')",
                        room,
                        number,
                        parent.seq,
                        seq,
                    )
                    msg = replace(msg, follow=Change(number, seq, _row(row), thread=True))
                op.sent = True  # the commit goes out as the block ends
        return msg, True

    async def replies(self, room: str, seq: int, *, after: int | None, limit: int) -> Page:
        async with self._operation(), self._connection() as conn:
            parent = await conn.fetchrow(
                "SELECT deleted_at IS NOT NULL AS deleted FROM messages WHERE room = $1 AND seq = $2",
                room,
                seq,
            )
            if parent is None:
                raise MessageNotFound(f"no message {seq} in room {room!r}")
            if parent["deleted"]:
                raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND reply_to = $2 "
                "AND seq > $3 ORDER BY seq LIMIT $4",
                room,
                seq,
                after or 0,
                limit + 1,
            )
        return Page([_row(r) for r in rows[:limit]], len(rows) > limit)

    async def versions(self, room: str, seq: int) -> tuple[Message, list[Version]]:
        async with self._operation(), self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq = $2", room, seq
            )
            if row is None:
                raise MessageNotFound(f"no message {seq} in room {room!r}")
            msg = _row(row)
            if msg.deleted_ms is not None:
                raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
            rows = await conn.fetch(
                "SELECT version, text, (extract(epoch from edited_at) * 1000)::bigint AS ms "
                "FROM message_versions WHERE room = $1 AND seq = $2 ORDER BY version",
                room,
                seq,
            )
        return msg, [Version(r["version"], r["text"], r["ms"]) for r in rows]

    async def _refusals(self, posts: list[tuple[str, str]]) -> list[Restricted]:
        """Why the statement refused each (room, author): read after the fact (a
        refusal is rare), ``banned`` unless only a mute is found."""
        states = await self.room_moderations(sorted({room for room, _ in posts}))
        at = now_ms()
        return [
            Restricted(states[room].refusal(author, at) or BANNED, room, author)
            for room, author in posts
        ]

    async def _append(
        self, op: _Operation, room: str, author: str, text: str, idempotency_key: str | None
    ) -> tuple[Message, bool]:
        if idempotency_key is not None:
            row = await self._statement(op, "fetchrow", _BY_KEY, room, idempotency_key)
            if row is not None:
                return _row(row), False
        ms = int(time.time() * 1000)
        mid = new_id(ms)
        created = _EPOCH + timedelta(milliseconds=ms)
        if idempotency_key is None:
            seq, changes = await self._grouped(op, room, mid, author, text, created)
            return Message(mid, room, seq, author, text, ms, changes=changes), True
        try:
            row = await self._statement(
                op,
                "fetchrow",
                self._append_sql,
                room,
                mid,
                author,
                text,
                created,
                idempotency_key,
                *self._outbox_args,
                write=True,
            )
        except asyncpg.UniqueViolationError:
            # A concurrent request with the same key committed first; the failed
            # statement rolled its seq increment back.
            row = await self._statement(op, "fetchrow", _BY_KEY, room, idempotency_key)
            if row is None:  # pragma: no cover - the constraint named a row that vanished
                raise
            return _row(row), False
        if row is None:  # the author is banned or muted there
            raise Restricted("", room, author)
        return Message(mid, room, row["seq"], author, text, ms, changes=row["changes"]), True

    async def append_many(self, posts: list[tuple[str, str, str]]) -> list[Message | Exception]:
        """One statement for all of them (all, but those of banned or muted authors,
        or none), numbered in this order."""
        if not posts:
            return []
        ms = int(time.time() * 1000)
        created = _EPOCH + timedelta(milliseconds=ms)
        ids = [new_id(ms) for _ in posts]
        rows = await self._call(
            "fetch",
            self._append_group_sql,
            [p[0] for p in posts],
            ids,
            [p[1] for p in posts],
            [p[2] for p in posts],
            [created] * len(posts),
            *self._outbox_args,
            write=True,
        )
        seqs = {r["id"]: (r["seq"], r["changes"]) for r in rows}
        refused = iter(
            await self._refusals(
                [
                    (room, author)
                    for mid, (room, author, _) in zip(ids, posts, strict=True)
                    if mid not in seqs
                ]
            )
            if len(seqs) < len(posts)
            else []
        )
        return [
            Message(mid, room, seqs[mid][0], author, text, ms, changes=seqs[mid][1])
            if mid in seqs
            else next(refused)
            for mid, (room, author, text) in zip(ids, posts, strict=True)
        ]

    async def _grouped(
        self, op: _Operation, room: str, mid: str, author: str, text: str, created: datetime
    ) -> tuple[int, int]:
        """Commit one post with whatever others wait; its seq and the room's change count.
        Within ``op``'s deadline: a post a committer took may be stored even so."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        item = (room, mid, author, text, created, future)
        self._waiting.append(item)
        committers = self._committers
        if not committers or (
            len(committers) < GROUP_COMMITTERS
            and all(loop.time() - since > GROUP_STALL for since in committers.values())
        ):
            task = loop.create_task(self._commit_groups())
            committers[task] = loop.time()
            task.add_done_callback(self._committer_done)
        # A caller that gives up (its deadline, or cancelled) withdraws its post if no
        # committer has taken it yet; one already taken is left to its group, which may
        # still commit it (its outcome is unknown: the committer may have sent it).
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if item in self._waiting:
                self._waiting.remove(item)
                future.cancel()
            else:
                op.sent = True
            raise
        finally:
            if not future.done():  # in flight: its outcome is nobody's now
                future.add_done_callback(_retrieve)

    def _committer_done(self, task: asyncio.Task[None]) -> None:
        self._committers.pop(task, None)

    async def _commit_groups(self) -> None:
        """Commit groups back to back on one connection until nothing waits. A group
        that fails gets its error (``StoreUnavailable`` for a lost or unreachable
        database) and the connection goes back; the next group takes another.

        A group is taken only once a connection is in hand: a post whose caller
        gave up while the committer waited for one is still in ``_waiting``, so it is
        withdrawn there and never stored behind its 503."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("the committer runs in a task")
        loop = asyncio.get_running_loop()
        conn: Any = None
        try:
            while True:
                if not self._waiting:
                    # Landed as of now: a post that comes while the connection goes
                    # back starts a committer of its own.
                    self._committers.pop(task, None)
                    break
                self._committers[task] = loop.time()
                if conn is None:
                    try:
                        conn = await self.pool.acquire(timeout=self._acquire_timeout)
                    except BaseException as exc:
                        # Nothing was sent: the posts waiting now are told so.
                        _fail(self._take(), exc, sent=False)
                        if isinstance(exc, asyncio.CancelledError):
                            raise
                        continue
                group = self._take()
                if not group:
                    continue  # all withdrawn meanwhile
                try:
                    await self._commit_isolating(conn, group)
                except BaseException as exc:
                    _fail(group, exc, sent=True)
                    if isinstance(exc, _UNAVAILABLE):
                        await self._failed(exc, conn)
                    conn, held = None, conn
                    self._release_later(held)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
        finally:
            if conn is not None:
                await self._release(conn)

    def _take(self) -> list[tuple[str, str, str, str, datetime, asyncio.Future[tuple[int, int]]]]:
        group = self._waiting[:GROUP_MAX]
        del self._waiting[:GROUP_MAX]
        return group

    async def _release(self, conn: Any) -> None:
        try:
            await self.pool.release(conn, timeout=self._command_timeout)
        except Exception as exc:
            log.debug("releasing a connection: %r", exc)

    async def _commit_isolating(self, conn: Any, group: list[Any]) -> None:
        """Commit a group and give each post its seq. A statement refused for one row's
        data (a NUL in a text, a string with no UTF-8 form, a constraint) fails the
        whole group, which would fail every other caller with that row: the group is
        then committed in halves, in order (arrival order, so seqs within a room
        keep it), down to the row at fault, whose caller alone gets the error."""
        try:
            rows = await self._commit_group(conn, group)
        except _ROW_FAULTS as exc:
            if len(group) == 1:
                _fail(group, exc, sent=False)  # refused by the server: nothing stored
                return
            log.debug("a group failed on a row's data, committed in parts: %r", exc)
            half = len(group) // 2
            await self._commit_isolating(conn, group[:half])
            await self._commit_isolating(conn, group[half:])
            return
        seqs = {r["id"]: (r["seq"], r["changes"]) for r in rows}
        for item in group:
            if item[5].done():
                continue
            if item[1] in seqs:
                item[5].set_result(seqs[item[1]])
            else:  # its author is banned or muted there
                item[5].set_exception(Restricted("", item[0], item[2]))

    async def _commit_group(self, conn: Any, group: list[Any]) -> Any:
        cols = [*zip(*(item[:5] for item in group), strict=True), *self._outbox_args]
        for _ in range(2):
            try:
                return await conn.fetch(self._append_group_sql, *cols)
            except asyncpg.DeadlockDetectedError:
                pass  # rolled back whole (no seq used); another group holds a room
        return await conn.fetch(self._append_group_sql, *cols)

    async def history(
        self, room: str, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> Page:
        hi = before if before is not None else 2**62
        if after is not None:
            rows = await self._call(
                "fetch",
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq > $2 AND seq < $3 "
                "ORDER BY seq ASC LIMIT $4",
                room,
                after,
                hi,
                limit + 1,
            )
            msgs = [_row(r) for r in rows[:limit]]
        else:
            rows = await self._call(
                "fetch",
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq < $2 "
                "ORDER BY seq DESC LIMIT $3",
                room,
                hi,
                limit + 1,
            )
            msgs = [_row(r) for r in reversed(rows[:limit])]
        return Page(msgs, len(rows) > limit)

    async def latest_seq(self, room: str) -> int:
        value = await self._call("fetchval", "SELECT last_seq FROM rooms WHERE room = $1", room)
        return int(value or 0)

    async def latest_seqs(self, rooms: list[str]) -> dict[str, int]:
        rows = await self._call(
            "fetch", "SELECT room, last_seq FROM rooms WHERE room = ANY($1::text[])", rooms
        )
        seqs = dict.fromkeys(rooms, 0)
        seqs.update((r["room"], int(r["last_seq"])) for r in rows)
        return seqs

    async def delete_before(self, cutoff_ms: int, limit: int, rooms: set[str] | None = None) -> int:
        # A bounded batch found through the created_at index, deleted by ctid:
        # row locks on those rows only, never a table lock; SKIP LOCKED lets
        # two instances' retention runs share the work. The deleted messages'
        # change rows go in the same statement, and their text leaves the outbox.
        counts = await self._call(
            "fetch",
            "WITH gone AS (DELETE FROM messages WHERE ctid = ANY(ARRAY("
            " SELECT ctid FROM messages WHERE created_at < $1"
            " ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)) RETURNING room, seq),"
            " changes AS (DELETE FROM message_changes c USING gone"
            " WHERE c.room = gone.room AND c.seq = gone.seq),"
            " reacted AS (DELETE FROM reactions x USING gone"
            " WHERE x.room = gone.room AND x.seq = gone.seq),"
            " mentioned AS (DELETE FROM mentions x USING gone"
            " WHERE x.room = gone.room AND x.seq = gone.seq),"
            " versions AS (DELETE FROM message_versions x USING gone"
            " WHERE x.room = gone.room AND x.seq = gone.seq),"
            f" scrub AS ({_scrub('gone', '$3')})"
            " SELECT room, count(*) AS n FROM gone GROUP BY room",
            _EPOCH + timedelta(milliseconds=cutoff_ms),
            limit,
            format_ts(int(time.time() * 1000)),
        )
        if rooms is not None:
            rooms.update(r["room"] for r in counts)
        return sum(int(r["n"]) for r in counts)

    async def purge_room(self, room: str) -> int:
        # The rooms row (its last_seq, last_change) stays: seqs and change numbers
        # are never handed out twice. The change rows go in the same statement, and
        # the messages' text leaves the outbox.
        count = await self._call(
            "fetchval",
            "WITH gone AS (DELETE FROM messages WHERE room = $1 RETURNING room, seq),"
            " changes AS (DELETE FROM message_changes WHERE room = $1),"
            " reacted AS (DELETE FROM reactions WHERE room = $1),"
            " mentioned AS (DELETE FROM mentions WHERE room = $1),"
            " versions AS (DELETE FROM message_versions WHERE room = $1),"
            f" scrub AS ({_scrub('gone', '$2')})"
            " SELECT count(*) FROM gone",
            room,
            format_ts(int(time.time() * 1000)),
            write=True,
        )
        return int(count)

    async def ping(self) -> None:
        await self._call("fetchval", "SELECT 1")

    async def change(
        self,
        room: str,
        seq: int,
        text: str | None,
        *,
        author: str | None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> tuple[Change | None, Message]:
        ms = int(time.time() * 1000)
        at = _EPOCH + timedelta(milliseconds=ms)
        async with self._operation() as op, self._connection() as conn:
            async with self._transaction(conn):
                # The room's row first, as an append takes it: changes and posts
                # of a room commit one at a time, so after_seq is exact.
                pos = await conn.fetchrow(_ROOM_FOR_UPDATE, room)
                if pos is not None and idempotency_key is not None:
                    done = await conn.fetchval(
                        "SELECT seq FROM message_changes WHERE room = $1 AND key_owner = $2"
                        " AND idempotency_key = $3",
                        room,
                        *idempotency_key,
                    )
                    if done is not None:  # a repeat: the message as it is now
                        return None, _row(await conn.fetchrow(_MESSAGE_FOR_UPDATE, room, done))
                current = await _message_in(conn, pos, room, seq)
                if author is not None and current.author != author:
                    raise NotAuthor("only the author may change this message")
                # The row's newest version (FOR UPDATE): a ban committed first is seen.
                restrictions = RoomModeration.of_row(room, pos["banned"], pos["muted"], 0)
                check_change(restrictions, author, edit=text is not None, at_ms=ms)
                if current.deleted_ms is not None:
                    if text is None:
                        return None, current  # deleted already: nothing to do
                    raise MessageNotFound(f"message {seq} in room {room!r} is deleted")
                if text == current.text:
                    return None, current
                if text is None:
                    row = await conn.fetchrow(_DELETE, room, seq, at)
                    for table in ("reactions", "mentions", "message_versions"):
                        await conn.execute(
                            f"DELETE FROM {table} WHERE room = $1 AND seq = $2", room, seq
                        )
                    await conn.execute(_SCRUB_MESSAGE, room, seq, format_ts(ms))
                else:
                    await conn.execute(_KEEP_VERSION, room, seq, at)
                    row = await conn.fetchrow(_EDIT, room, seq, text, at)
                msg = _row(row)
                number = await self._record_change(conn, pos, msg, ms, key=idempotency_key)
                op.sent = True  # the commit goes out as the block ends
        return Change(number, pos["last_seq"], msg), msg

    async def changes(self, room: str, *, after: int, limit: int = 200) -> list[Change]:
        rows = await self._call("fetch", _CHANGES, room, after, limit)
        return [
            Change(
                r["change"],
                r["after_seq"],
                _row(r),
                r["kind"] == "reactions",
                r["kind"] == "thread",
            )
            for r in rows
        ]

    async def _record_change(
        self,
        conn: Any,
        pos: Any,
        msg: Message,
        ms: int,
        *,
        key: tuple[str, str] | None = None,
        reactions: bool = False,
    ) -> int:
        """Number a change of ``msg`` (the room's row ``pos`` is locked), log it and
        write its events, in the caller's transaction; its number."""
        number = int(pos["last_change"]) + 1
        await conn.execute("UPDATE rooms SET last_change = $2 WHERE room = $1", msg.room, number)
        owner, idem = key or (None, None)
        await conn.execute(
            "INSERT INTO message_changes (room, change, seq, after_seq, key_owner, "
            "idempotency_key, kind) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            msg.room,
            number,
            msg.seq,
            pos["last_seq"],
            owner,
            idem,
            "reactions" if reactions else None,
        )
        if self._outbox_args:
            await conn.execute(
                _CHANGE_OUTBOX,
                *change_event(msg, number, ms, reactions=reactions),
                msg.room,
                msg.seq,
                pos["last_seq"] + number,
                _EPOCH + timedelta(milliseconds=ms),
                *self._outbox_args,
            )
        return number

    async def react(
        self, room: str, seq: int, user: str, reaction: str, *, add: bool
    ) -> tuple[Change | None, Message]:
        ms = int(time.time() * 1000)
        async with self._operation() as op, self._connection() as conn:
            async with self._transaction(conn):
                # The room's row first, as a change takes it: one commit order.
                pos = await conn.fetchrow(_ROOM_FOR_UPDATE, room)
                current = await _message_in(conn, pos, room, seq)
                restrictions = RoomModeration.of_row(room, pos["banned"], pos["muted"], 0)
                check_change(restrictions, user, edit=True, at_ms=ms)
                if current.deleted_ms is not None:
                    raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
                if add:
                    done = await conn.fetchval(
                        "INSERT INTO reactions (room, seq, reaction, user_name) "
                        "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                        room,
                        seq,
                        reaction,
                        user,
                    )
                else:
                    done = await conn.fetchval(
                        "DELETE FROM reactions WHERE room = $1 AND seq = $2 AND reaction = $3"
                        " AND user_name = $4 RETURNING 1",
                        room,
                        seq,
                        reaction,
                        user,
                    )
                if done is None:
                    return None, current  # there already, or not there
                rows = await conn.fetch(
                    "SELECT reaction, user_name FROM reactions WHERE room = $1 AND seq = $2"
                    " ORDER BY id",
                    room,
                    seq,
                )
                summary = summarize((r["reaction"], r["user_name"]) for r in rows)
                row = await conn.fetchrow(
                    f"UPDATE messages SET reactions = $3 WHERE room = $1 AND seq = $2"
                    f" RETURNING {_COLUMNS}",
                    room,
                    seq,
                    None if summary is None else orjson.dumps(summary).decode(),
                )
                msg = _row(row)
                number = await self._record_change(conn, pos, msg, ms, reactions=True)
                op.sent = True
        return Change(number, pos["last_seq"], msg, True), msg

    async def position(self, room: str) -> tuple[int, int]:
        row = await self._call(
            "fetchrow", "SELECT last_seq, last_change FROM rooms WHERE room = $1", room
        )
        return (0, 0) if row is None else (int(row["last_seq"]), int(row["last_change"]))

    async def write_state(
        self, room: str, writes: list[tuple[str, bytes | None]], *, author: str | None = None
    ) -> list[StateEntry]:
        ms = now_ms()
        at = _EPOCH + timedelta(milliseconds=ms)
        keys = [k for k, _ in writes]
        values = [None if v is None else v.decode() for _, v in writes]
        async with self._operation() as op, self._connection() as conn:
            async with self._transaction(conn):
                row = await conn.fetchrow(_LOCK_ROOM, room)
                if author is not None:  # the row's newest version: a ban committed first
                    check_append(
                        RoomModeration.of_row(room, row["banned"], row["muted"], 0), author, ms
                    )
                op.sent = True
                stored = await conn.fetch(_STATE_WRITE, room, keys, values, len(writes), at)
        seqs = {r["key"]: int(r["seq"]) for r in stored}
        return [StateEntry(room, k, seqs[k], v, ms) for k, v in writes]

    async def state(self, room: str, *, after: int = 0) -> StateSnapshot:
        rows = await self._call("fetch", _STATE, room, after)
        if not rows:
            return StateSnapshot(room, 0, [])
        entries = [
            StateEntry(
                room,
                r["key"],
                int(r["seq"]),
                None if r["value"] is None else r["value"].encode(),
                _ms(r["updated_at"]),
            )
            for r in rows
            if r["key"] is not None
        ]
        return StateSnapshot(
            room, int(rows[0]["last_seq"]), entries, int(rows[0]["state_purged_seq"])
        )

    async def purge_tombstones(self, cutoff_ms: int, limit: int) -> int:
        count = await self._call(
            "fetchval",
            _PURGE_TOMBSTONES,
            _EPOCH + timedelta(milliseconds=cutoff_ms),
            limit,
            write=True,
        )
        return int(count)

    async def mark_read(self, user: str, room: str, seq: int) -> ReadPosition:
        row = await self._call("fetchrow", _MARK_READ, user, room, seq, write=True)
        if row is None:  # a room with no message: nothing to be read
            return ReadPosition(room, 0, 0)
        return ReadPosition(room, int(row["seq"]), int(row["last_seq"]), int(row["mentions"]))

    async def read_position(self, user: str, room: str) -> ReadPosition:
        row = await self._call("fetchrow", _READ_POSITION, user, room)
        return ReadPosition(room, int(row["seq"]), int(row["last_seq"]), int(row["mentions"]))

    async def read_positions(
        self, user: str, limit: int = 1000, rooms: RoomFilter | None = None
    ) -> list[ReadPosition]:
        names = None if rooms is None else list(rooms.names)
        prefixes = [] if rooms is None else list(rooms.prefixes)
        rows = await self._call("fetch", _READ_POSITIONS, user, limit, names, prefixes)
        return [
            ReadPosition(r["room"], int(r["seq"]), int(r["last_seq"]), int(r["mentions"]))
            for r in rows
        ]

    async def search(
        self,
        query: Query,
        scope: RoomScope,
        *,
        limit: int,
        cursor: Cursor | None = None,
        timeout: float = 2.0,
    ) -> Page:
        """Three ways to the newest matches, each answering alike, the quickest for
        the words asked: first the matches among the newest ``search_recent_rows``
        rows (common words, or words of the moment the planner's statistics do not
        know yet); finding too few there, the planner's estimate of the matches in
        all picks the GIN index then a sort (at most ``search_few``: rare words, or
        words rare in the rooms asked, the index ANDed with the rooms' primary
        key), or the creation-time index walked newest first (common words)."""
        sql = _search_sql(self.search_language, query, scope, limit, cursor)
        settings = f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}; {_CUSTOM_PLANS}"

        try:
            async with self._operation(), self._connection() as conn, self._transaction(conn):
                await conn.execute(settings)
                rows: list[Any] = await conn.fetch(sql.recent(self.search_recent_rows), *sql.args)
                if len(rows) <= limit:
                    plan = orjson.loads(await conn.fetchval(sql.estimate, *sql.args))
                    matches = plan[0]["Plan"]["Plan Rows"]
                    few = matches <= self.search_few
                    await conn.execute(_INDEX_FIRST if few else _NEWEST_FIRST)
                    rows = await conn.fetch(sql.ordered, *sql.args)
        except asyncpg.QueryCanceledError as exc:
            raise SearchTimeout(f"the search ran past {timeout:g} s") from exc
        return Page([_row(r) for r in rows[:limit]], len(rows) > limit)

    # -- moderation ----------------------------------------------------------------

    async def room_moderations(self, rooms: list[str]) -> dict[str, RoomModeration]:
        rows = await self._call(
            "fetch",
            "SELECT room, banned::text, muted::text, slow_mode FROM rooms "
            "WHERE room = ANY($1::text[])",
            rooms,
        )
        found = {room: RoomModeration(room) for room in rooms}
        for r in rows:
            found[r["room"]] = RoomModeration.of_row(
                r["room"], r["banned"], r["muted"], r["slow_mode"]
            )
        return found

    async def moderate(self, room: str, action: Action) -> ModerationEntry | None:
        ms = now_ms()
        at = _EPOCH + timedelta(milliseconds=ms)
        async with self._operation() as op, self._connection() as conn:
            async with self._transaction(conn):
                row = await conn.fetchrow(_LOCK_ROOM, room)  # first, as an append
                before = RoomModeration.of_row(room, row["banned"], row["muted"], row["slow_mode"])
                after = apply(before, action, ms)
                if after is None:
                    return None  # rolled back: nothing written
                await conn.execute(
                    "UPDATE rooms SET banned = $2::jsonb, muted = $3::jsonb, slow_mode = $4 "
                    "WHERE room = $1",
                    room,
                    *after.stored(),
                )
                done = entry(room, action, ms)
                entry_id = await conn.fetchval(
                    "INSERT INTO moderation_log (room, action, user_name, by_name, reason, "
                    "until_ms, slow_mode, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                    "RETURNING id",
                    *log_row(done),
                    at,
                )
                done = replace(done, id=entry_id)
                if self._outbox_args:  # queued with the room's events, at its position now
                    await conn.execute(
                        _CHANGE_OUTBOX,
                        *done.event(),
                        room,
                        row["last_seq"],
                        row["last_seq"] + row["last_change"],
                        at,
                        *self._outbox_args,
                    )
                op.sent = True  # the commit goes out as the block ends
        return done

    async def moderation_log(
        self, room: str, *, limit: int, before: int | None = None
    ) -> list[ModerationEntry]:
        rows = await self._call(
            "fetch",
            "SELECT id, room, action, user_name, by_name, reason, until_ms, slow_mode, "
            "(extract(epoch from created_at) * 1000)::bigint AS created_ms "
            "FROM moderation_log WHERE room = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            room,
            2**62 if before is None else before,
            limit,
        )
        return [ModerationEntry(*r) for r in rows]

    async def banned_rooms(self, user: str) -> list[str]:
        rows = await self._call(
            "fetch",
            "SELECT room FROM rooms WHERE banned <> '{}' AND banned ? $1 "
            "AND NOT chat_may_post(jsonb_build_object($1::text, banned -> $1), '{}', $1) "
            "ORDER BY room",
            user,
        )
        return [r["room"] for r in rows]

    def where(self) -> str:
        return f"Postgres at {display_url(self.url)}"

    def stats(self) -> dict[str, Any]:
        if self._pool is None:
            return {}
        size = self._pool.get_size()
        return {
            "pool_size": size,
            "pool_in_use": size - self._pool.get_idle_size(),
            "pool_max": self._pool.get_max_size(),
        }


# A search's statements are planned for their words every time: a generic plan
# (asyncpg prepares them, and Postgres may switch to one after five runs) would
# guess how common the words are.
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
# The two ways to the matches (see PostgresStore.search): the words' GIN index
# first (alone, or ANDed with the primary key's rooms) then a sort; or a walk of
# the creation-time index, newest first, until enough match.
_INDEX_FIRST = "SET LOCAL enable_indexscan = off; SET LOCAL enable_seqscan = off"
_NEWEST_FIRST = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off"


_NEWEST = "ORDER BY created_at DESC, room DESC, seq DESC"


@dataclass(frozen=True, slots=True)
class _SearchSQL:
    """A search's statements, over the same arguments: the words, the scope and the
    cursor are conditions of each (applied before any limit). ``recent`` and
    ``ordered`` answer the newest ``limit + 1`` matches; ``estimate`` has the
    planner guess how many rows match in all.
    (Rows the gateway writes carry millisecond creation times, as the cursor does.)"""

    args: list[Any]
    match: str  # the words and the scope
    after: str  # the cursor
    limit: int

    def recent(self, rows: int) -> str:
        """The matches among the newest ``rows`` rows after the cursor."""
        return (
            f"SELECT {_COLUMNS} FROM (SELECT * FROM messages WHERE {self.after} "
            f"{_NEWEST} LIMIT {int(rows)}) m WHERE {self.match} {_NEWEST} LIMIT {self.limit + 1}"
        )

    @property
    def estimate(self) -> str:
        return f"EXPLAIN (FORMAT JSON) SELECT 1 FROM messages WHERE {self.match} AND {self.after}"

    @property
    def ordered(self) -> str:
        return (
            f"SELECT {_COLUMNS} FROM messages WHERE {self.match} AND {self.after} "
            f"{_NEWEST} LIMIT {self.limit + 1}"
        )


def _search_sql(
    language: str, query: Query, scope: RoomScope, limit: int, cursor: Cursor | None
) -> _SearchSQL:
    args: list[Any] = [language, query.tsquery()]
    match = ["search @@ to_tsquery($1::regconfig, $2)", "deleted_at IS NULL"]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if not scope.everything:
        # Named rooms alone are a condition the primary key answers (ANDed with the
        # words' index, and estimated by the planner); prefixes are checked per row.
        rooms = []
        if scope.names or not scope.prefixes:
            rooms.append(f"room = ANY({arg(list(scope.names))}::text[])")
        if scope.prefixes:
            rooms.append(
                f"EXISTS (SELECT 1 FROM unnest({arg(list(scope.prefixes))}::text[]) p "
                "WHERE starts_with(room, p))"
            )
        match.append("(" + " OR ".join(rooms) + ")")
    if scope.excluded:
        match.append(f"room <> ALL({arg(list(scope.excluded))}::text[])")
    after = "TRUE"
    if cursor is not None:
        at = _EPOCH + timedelta(milliseconds=cursor.created_ms)
        after = f"(created_at, room, seq) < ({arg(at)}, {arg(cursor.room)}, {arg(cursor.seq)})"
    return _SearchSQL(args, " AND ".join(match), after, int(limit))

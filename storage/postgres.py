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
All of a group commits or none of it; every caller gets its own seq or the
error. Posts with a key keep the single statement above, so a duplicate key
can only ever fail its own post.

One flight (a task committing groups back to back on one pooled connection)
does the committing while it keeps up, which makes the groups as large as the
load: fewer statements, fewer commits, less CPU in the gateway and in
Postgres. Another flight takes off only when every flight in the air has been
on one statement longer than ``GROUP_STALL`` (a lock wait on a room another
instance is writing, a slow flush), so one stalled statement does not hold
the posts of every other room.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from storage import migrations
from storage.base import Message, Page, Store, StoreUnavailable, new_id

log = logging.getLogger("storage.postgres")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# pg_advisory_lock key for migrations: any fixed 64-bit number, the same on every instance.
MIGRATION_LOCK = 0x63686174_6777  # "chatgw"

_COLUMNS = ("id, room, seq, author, text, "
            "(extract(epoch from created_at) * 1000)::bigint AS created_ms")

_APPEND = """
WITH r AS (
    INSERT INTO rooms AS r (room, last_seq) VALUES ($1, 1)
    ON CONFLICT (room) DO UPDATE SET last_seq = r.last_seq + 1
    RETURNING last_seq
)
INSERT INTO messages (room, seq, id, author, text, created_at, idempotency_key)
SELECT $1, last_seq, $2, $3, $4, $5, $6 FROM r
RETURNING seq
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
    ON CONFLICT (room) DO UPDATE SET last_seq = r.last_seq + EXCLUDED.last_seq
    RETURNING room, last_seq
)
INSERT INTO messages (room, seq, id, author, text, created_at)
SELECT i.room, r.last_seq - c.n + row_number() OVER (PARTITION BY i.room ORDER BY i.ord),
       i.id, i.author, i.text, i.created_at
FROM input i JOIN r USING (room) JOIN counts c USING (room)
RETURNING id, seq
"""

_OUTBOX = """,
o AS (
    INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, data, created_at,
                                next_at)
    SELECT e, 'evt_' || m.id, 'message.created', m.room, m.seq,
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
    the statement returns what it returned before. The receivers' ids are one
    more parameter, after the statement's own."""
    head, _, insert = statement.rpartition("\nINSERT INTO messages")
    insert, _, returning = insert.rpartition("RETURNING ")
    param = max(int(n) for n in re.findall(r"\$(\d+)", statement)) + 1
    return (f"{head},\nm AS (\nINSERT INTO messages{insert}RETURNING *\n)"
            f"{_OUTBOX.format(param=param)}SELECT {returning.strip()} FROM m\n")


# The most flights at once, how long a statement runs before another flight may
# take off (seconds), and the most posts in one group.
GROUP_FLIGHTS = 4
GROUP_STALL = 0.02
GROUP_MAX = 256

_BY_KEY = f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND idempotency_key = $2"

_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                asyncpg.TooManyConnectionsError)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default sends a reset query (unlock
    advisory locks, close cursors, UNLISTEN, RESET ALL): one more round trip for
    every statement. This store leaves no session state on a pooled connection
    (no SET, LISTEN, cursor or advisory lock; migrations take their own
    connection), and an open transaction is still rolled back by asyncpg first."""


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"Postgres unavailable: {exc!r}")


def _row(r: Any) -> Message:
    return Message(r["id"], r["room"], r["seq"], r["author"], r["text"], r["created_ms"])


class PostgresStore(Store):
    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 10,
                 connect_timeout: float = 5.0, command_timeout: float = 10.0,
                 idle_timeout: float = 300.0) -> None:
        if pool_max < 1 or pool_min < 0 or pool_min > pool_max:
            raise ValueError("pool sizes must satisfy 0 <= min <= max, max >= 1")
        self.url = url
        self._pool_args = dict(min_size=pool_min, max_size=pool_max, timeout=connect_timeout,
                               command_timeout=command_timeout,
                               max_inactive_connection_lifetime=idle_timeout)
        self._acquire_timeout = connect_timeout + command_timeout
        self._pool: asyncpg.Pool | None = None
        self._waiting: list[tuple[str, str, str, str, datetime, asyncio.Future[int]]] = []
        # Each flight, and when its statement in progress started (loop time).
        self._flights: dict[asyncio.Task[None], float] = {}
        # The append statements and their extra arguments: with webhook receivers,
        # the variants that write the outbox too (see write_outbox).
        self._append, self._append_group = _APPEND, _APPEND_GROUP
        self._outbox_args: tuple[list[int], ...] = ()

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.url, reset=_keep_session,
                                                   **self._pool_args)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to Postgres: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (asyncio.TimeoutError, *_UNAVAILABLE):
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        return self._pool

    async def _call(self, method: str, query: str, *args: Any) -> Any:
        try:
            async with self.pool.acquire(timeout=self._acquire_timeout) as conn:
                return await getattr(conn, method)(query, *args)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def write_outbox(self, endpoint_ids: list[int]) -> None:
        if endpoint_ids:
            self._append, self._append_group = with_outbox(_APPEND), with_outbox(_APPEND_GROUP)
            self._outbox_args = (list(endpoint_ids),)
        else:
            self._append, self._append_group = _APPEND, _APPEND_GROUP
            self._outbox_args = ()

    def outbox(self) -> Any:
        from storage.outbox_postgres import PostgresOutbox

        return PostgresOutbox(self)

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        try:
            conn = await asyncpg.connect(self.url, timeout=self._pool_args["timeout"])
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to Postgres: {exc}") from exc
        try:
            # Several instances may start at once: one migrates, the others wait here.
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for version, sql in migrations.load("postgres"):
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)",
                                           version)
                    log.info("applied migration", extra={"version": version})
                    applied.append(version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        finally:
            await conn.close()
        return applied

    async def append(self, room: str, author: str, text: str,
                     idempotency_key: str | None = None) -> tuple[Message, bool]:
        if idempotency_key is not None:
            row = await self._call("fetchrow", _BY_KEY, room, idempotency_key)
            if row is not None:
                return _row(row), False
        ms = int(time.time() * 1000)
        mid = new_id(ms)
        created = _EPOCH + timedelta(milliseconds=ms)
        if idempotency_key is None:
            return Message(mid, room, await self._grouped(room, mid, author, text, created),
                           author, text, ms), True
        try:
            seq = await self._call("fetchval", self._append, room, mid, author, text, created,
                                   idempotency_key, *self._outbox_args)
        except asyncpg.UniqueViolationError:
            # A concurrent request with the same key committed first; the failed
            # statement rolled its seq increment back.
            row = await self._call("fetchrow", _BY_KEY, room, idempotency_key)
            if row is None:  # pragma: no cover - the constraint named a row that vanished
                raise
            return _row(row), False
        return Message(mid, room, seq, author, text, ms), True

    async def append_many(self, posts: list[tuple[str, str, str]]) -> list[Message]:
        """One statement for all of them (all or none), numbered in this order."""
        if not posts:
            return []
        ms = int(time.time() * 1000)
        created = _EPOCH + timedelta(milliseconds=ms)
        ids = [new_id(ms) for _ in posts]
        rows = await self._call("fetch", self._append_group, [p[0] for p in posts], ids,
                                [p[1] for p in posts], [p[2] for p in posts],
                                [created] * len(posts), *self._outbox_args)
        seqs = {r["id"]: r["seq"] for r in rows}
        return [Message(mid, room, seqs[mid], author, text, ms)
                for mid, (room, author, text) in zip(ids, posts, strict=True)]

    async def _grouped(self, room: str, mid: str, author: str, text: str,
                       created: datetime) -> int:
        """Commit one post with whatever others wait; its seq."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._waiting.append((room, mid, author, text, created, future))
        flights = self._flights
        if not flights or (len(flights) < GROUP_FLIGHTS and
                           all(loop.time() - since > GROUP_STALL for since in flights.values())):
            task = loop.create_task(self._fly())
            flights[task] = loop.time()
            task.add_done_callback(self._landed)
        # A caller that gives up leaves its post to its group, which may still commit it.
        return await asyncio.shield(future)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._flights.pop(task, None)

    async def _fly(self) -> None:
        """Commit groups back to back on one connection until nothing waits. A group
        that fails gets its error (``StoreUnavailable`` for a lost or unreachable
        database) and the connection goes back; the next group takes another."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        conn: Any = None
        try:
            while True:
                if not self._waiting:
                    # Landed as of now: a post that comes while the connection goes
                    # back sends off a flight of its own.
                    self._flights.pop(task, None)
                    break
                group = self._waiting[:GROUP_MAX]
                del self._waiting[:GROUP_MAX]
                self._flights[task] = loop.time()
                try:
                    if conn is None:
                        conn = await self.pool.acquire(timeout=self._acquire_timeout)
                    rows = await self._commit_group(conn, group)
                except BaseException as exc:
                    err = _unavailable(exc) if isinstance(exc, _UNAVAILABLE) else exc
                    for item in group:
                        if not item[5].done():
                            item[5].set_exception(err)
                    if conn is not None:
                        conn, held = None, conn
                        await self._release(held)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                seqs = {r["id"]: r["seq"] for r in rows}
                for item in group:
                    if not item[5].done():
                        item[5].set_result(seqs[item[1]])
        finally:
            if conn is not None:
                await self._release(conn)

    async def _release(self, conn: Any) -> None:
        try:
            await self.pool.release(conn)
        except Exception as exc:  # noqa: BLE001 - asyncpg terminates what it cannot release
            log.debug("releasing a group commit connection: %r", exc)

    async def _commit_group(self, conn: Any, group: list[Any]) -> Any:
        cols = [*zip(*(item[:5] for item in group), strict=True), *self._outbox_args]
        for _ in range(2):
            try:
                return await conn.fetch(self._append_group, *cols)
            except asyncpg.DeadlockDetectedError:
                pass  # rolled back whole (no seq used); another group holds a room
        return await conn.fetch(self._append_group, *cols)

    async def history(self, room: str, *, limit: int = 50, before: int | None = None,
                      after: int | None = None) -> Page:
        hi = before if before is not None else 2**62
        if after is not None:
            rows = await self._call(
                "fetch",
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq > $2 AND seq < $3 "
                "ORDER BY seq ASC LIMIT $4", room, after, hi, limit + 1)
            msgs = [_row(r) for r in rows[:limit]]
        else:
            rows = await self._call(
                "fetch",
                f"SELECT {_COLUMNS} FROM messages WHERE room = $1 AND seq < $2 "
                "ORDER BY seq DESC LIMIT $3", room, hi, limit + 1)
            msgs = [_row(r) for r in reversed(rows[:limit])]
        return Page(msgs, len(rows) > limit)

    async def latest_seq(self, room: str) -> int:
        value = await self._call("fetchval", "SELECT last_seq FROM rooms WHERE room = $1", room)
        return int(value or 0)

    async def delete_before(self, cutoff_ms: int, limit: int) -> int:
        # A bounded batch found through the created_at index, deleted by ctid:
        # row locks on those rows only, never a table lock; SKIP LOCKED lets
        # two instances' retention runs share the work.
        status = await self._call(
            "execute",
            "DELETE FROM messages WHERE ctid = ANY(ARRAY("
            " SELECT ctid FROM messages WHERE created_at < $1"
            " ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
            _EPOCH + timedelta(milliseconds=cutoff_ms), limit)
        return int(status.split()[-1])

    async def ping(self) -> None:
        await self._call("fetchval", "SELECT 1")

    def stats(self) -> dict[str, Any]:
        if self._pool is None:
            return {}
        size = self._pool.get_size()
        return {"pool_size": size, "pool_in_use": size - self._pool.get_idle_size(),
                "pool_max": self._pool.get_max_size()}

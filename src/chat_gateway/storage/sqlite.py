"""Embedded SQLite store: one file, no server, for a single instance.

All statements run on one connection in one worker thread, so the store needs
no lock of its own; ``BEGIN IMMEDIATE`` makes each append one serialised
transaction (seq increment and insert commit together or not at all).

Every operation but a migration is answered within ``command_timeout``: it waits
for another process' lock on the file only for what is left of that time (the
busy timeout, set per operation), so it fails cleanly, nothing written, by then;
one still queued behind a slow statement at its deadline is not run at all.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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
    Store,
    StoreUnavailable,
    Version,
    change_event,
    format_ts,
    new_id,
    summarize,
    thread_summary,
)
from chat_gateway.storage.moderation import (
    Action,
    ModerationEntry,
    RoomModeration,
    apply,
    check_append,
    check_change,
    entry,
    log_row,
    now_ms,
)
from chat_gateway.storage.search import BadQuery, Cursor, Query, RoomScope, SearchTimeout

T = TypeVar("T")

_COLUMNS = (
    "id, room, seq, author, text, created_ms, version, edited_ms, deleted_ms, reactions, "
    "reply_to, mentions, thread"
)
# Rooms per ``IN (...)`` list: under SQLite's oldest bound on bound parameters (999).
_IN_CHUNK = 500


def statements(sql: str) -> list[str]:
    """A migration's statements, each whole: a trigger's body holds semicolons too."""
    out, pending = [], ""
    for piece in sql.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending)
            pending = ""
    return out


def _row(r: tuple[Any, ...]) -> Message:
    return Message(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        r[8],
        reactions=None if r[9] is None else orjson.loads(r[9]),
        reply_to=r[10],
        mentions=None if r[11] is None else tuple(orjson.loads(r[11])),
        thread=None if r[12] is None else orjson.loads(r[12]),
    )


# Unread messages mentioning user ?1 in room ?2 after seq ?3 (not deleted, not theirs).
_MENTIONS = (
    "SELECT count(*) FROM mentions x JOIN messages m ON m.room = x.room AND m.seq = x.seq "
    "WHERE x.user_name = ?1 AND x.room = ?2 AND x.seq > ?3 AND m.deleted_ms IS NULL "
    "AND m.author <> ?1"
)


_ROOM = "SELECT last_seq, last_change, banned, muted FROM rooms WHERE room = ?"
_MESSAGE = f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq = ?"


def _message_in(db: sqlite3.Connection, pos: Any, room: str, seq: int) -> Message:
    """The message at ``seq`` (``pos``: the room's row, None when the room has none);
    ``MessageNotFound`` when there is none."""
    row = None if pos is None else db.execute(_MESSAGE, (room, seq)).fetchone()
    if row is None:
        raise MessageNotFound(f"no message {seq} in room {room!r}")
    return _row(row)


def _scrub(db: sqlite3.Connection, gone: list[tuple[str, int]], at_ms: int) -> None:
    """Take the text out of every webhook event of the messages ``gone`` lists, inside
    the caller's transaction: each event that still carries text (a
    ``message.created``, an edit's ``message.updated``), whatever its state (pending,
    delivered and kept, dead), keeps its fields with ``text`` empty and
    ``deleted_at`` set to the removal's time. A later attempt, replay or dead-letter
    listing therefore carries no text of a removed message."""
    at = format_ts(at_ms)
    db.executemany(
        "UPDATE webhook_outbox SET data = json_set(data, '$.text', '', '$.deleted_at', ?) "
        "WHERE room = ? AND seq = ? AND json_extract(data, '$.text') <> ''",
        [(at, room, seq) for room, seq in gone],
    )


class SQLiteStore(Store):
    def __init__(self, url: str, *, command_timeout: float = 10.0) -> None:
        if not url.startswith("sqlite://"):
            raise ValueError(f"not a sqlite URL: {url!r}")
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///relative.db and sqlite:////abs/path.db
        if not path:
            raise ValueError("sqlite URL needs a path: sqlite:///./chat-gateway.db")
        self.path = path if path == ":memory:" else str(Path(path))
        self.command_timeout = command_timeout
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._outbox_ids: list[int] = []  # webhook receivers (write_outbox)

    def write_outbox(self, endpoint_ids: list[int]) -> None:
        self._outbox_ids = list(endpoint_ids)

    def outbox(self) -> Any:
        from chat_gateway.storage.outbox_sqlite import SQLiteOutbox

        return SQLiteOutbox(self)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, bounded: bool = True) -> T:
        if self._db is None or self._executor is None:
            raise StoreUnavailable("the store is not started")
        db = self._db
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.command_timeout

        def within(db: sqlite3.Connection) -> T:
            left = deadline - time.monotonic() if bounded else self.command_timeout
            if left <= 0:
                raise sqlite3.OperationalError("queued past its deadline; not run")
            db.execute(f"PRAGMA busy_timeout={max(1, int(left * 1000))}")
            return fn(db)

        try:
            # A backstop only: the busy timeout ends a wait for a lock before this.
            async with asyncio.timeout(self.command_timeout + 1.0 if bounded else None):
                return await loop.run_in_executor(self._executor, within, db)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite file {self.path} unavailable: {exc}") from exc
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"SQLite file {self.path} did not answer within {self.command_timeout:g} s"
            ) from exc

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        def connect() -> sqlite3.Connection:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.command_timeout,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(self.command_timeout * 1000)}")
            return db

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except (sqlite3.Error, OSError) as exc:  # OSError: its directory cannot be made
            raise StoreUnavailable(f"cannot open SQLite file {self.file}: {exc}") from exc

    @property
    def file(self) -> str:
        """The file's absolute path: a relative one is relative to the working directory."""
        return self.path if self.path == ":memory:" else os.path.abspath(self.path)

    def where(self) -> str:
        return f"SQLite file {self.file}"

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            if self._executor is None:
                raise RuntimeError("an open SQLite store has its database thread")
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
            self._executor.shutdown(wait=False)
            self._executor = None

    async def migrate(self) -> list[str]:
        def apply(db: sqlite3.Connection) -> list[str]:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)"
            )
            done = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in migrations.load("sqlite"):
                if version in done:
                    continue
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in statements(sql):
                        db.execute(statement)
                    db.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?)",
                        (version, int(time.time() * 1000)),
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                applied.append(version)
            return applied

        return await self._run(apply, bounded=False)  # a migration takes what it takes

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
        def write(db: sqlite3.Connection) -> tuple[Message, bool]:
            db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    row = db.execute(
                        f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND idempotency_key = ?",
                        (room, idempotency_key),
                    ).fetchone()
                    if row is not None:
                        db.execute("ROLLBACK")
                        return _row(row), False
                ms = int(time.time() * 1000)
                held = db.execute(
                    "SELECT banned, muted FROM rooms WHERE room = ?", (room,)
                ).fetchone()
                if held is not None:  # under the write lock: the latest
                    check_append(RoomModeration.of_row(room, held[0], held[1], 0), author, ms)
                parent = None
                if reply_to is not None:
                    parent = _message_in(db, held, room, reply_to)
                    if parent.deleted_ms is not None:
                        raise MessageDeleted(f"message {reply_to} in room {room!r} is deleted")
                seq, changes = db.execute(
                    "INSERT INTO rooms (room, last_seq) VALUES (?, 1) ON CONFLICT (room) "
                    "DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq, last_change",
                    (room,),
                ).fetchone()
                msg = Message(
                    new_id(ms),
                    room,
                    seq,
                    author,
                    text,
                    ms,
                    changes=changes,
                    reply_to=reply_to,
                    mentions=mentions or None,
                )
                db.execute(
                    "INSERT INTO messages (id, room, seq, author, text, created_ms, "
                    "idempotency_key, reply_to, mentions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        msg.id,
                        room,
                        seq,
                        author,
                        text,
                        ms,
                        idempotency_key,
                        reply_to,
                        orjson.dumps(list(mentions)).decode() if mentions else None,
                    ),
                )
                db.executemany(
                    "INSERT INTO mentions (user_name, room, seq) VALUES (?, ?, ?)",
                    [(user, room, seq) for user in mentions],
                )
                if self._outbox_ids:
                    data = msg.to_json().decode()
                    db.executemany(
                        "INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, "
                        "pos, data, created_ms, next_ms) "
                        "VALUES (?, ?, 'message.created', ?, ?, ?, ?, ?, ?)",
                        [
                            (e, "evt_" + msg.id, room, seq, seq + changes, data, ms, ms)
                            for e in self._outbox_ids
                        ],
                    )
                if parent is not None:  # the parent's thread, changed in the same commit
                    count = int((parent.thread or {}).get("replies", 0)) + 1
                    thread = orjson.dumps(thread_summary(count, seq, ms)).decode()
                    number = changes + 1
                    db.execute("UPDATE rooms SET last_change = ? WHERE room = ?", (number, room))
                    db.execute(
                        "UPDATE messages SET thread = ? WHERE room = ? AND seq = ?",
                        (thread, room, parent.seq),
                    )
                    db.execute(
                        "INSERT INTO message_changes (room, change, seq, after_seq, kind) "
                        "VALUES (?, ?, ?, ?, 'thread')",
                        (room, number, parent.seq, seq),
                    )
                    now = _row(db.execute(_MESSAGE, (room, parent.seq)).fetchone())
                    msg = replace(msg, follow=Change(number, seq, now, thread=True))
                db.execute("COMMIT")
                return msg, True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def history(
        self, room: str, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> Page:
        hi = before if before is not None else 2**62

        def read(db: sqlite3.Connection) -> Page:
            if after is not None:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? "
                    "AND seq < ? ORDER BY seq ASC LIMIT ?",
                    (room, after, hi, limit + 1),
                ).fetchall()
                msgs = [_row(r) for r in rows[:limit]]
            else:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? "
                    "ORDER BY seq DESC LIMIT ?",
                    (room, hi, limit + 1),
                ).fetchall()
                msgs = [_row(r) for r in reversed(rows[:limit])]
            return Page(msgs, len(rows) > limit)

        return await self._run(read)

    async def latest_seq(self, room: str) -> int:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT last_seq FROM rooms WHERE room = ?", (room,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(read)

    async def latest_seqs(self, rooms: list[str]) -> dict[str, int]:
        def read(db: sqlite3.Connection) -> dict[str, int]:
            seqs = dict.fromkeys(rooms, 0)
            for i in range(0, len(rooms), _IN_CHUNK):
                chunk = rooms[i : i + _IN_CHUNK]
                seqs.update(
                    db.execute(
                        "SELECT room, last_seq FROM rooms WHERE room IN "
                        f"({', '.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                )
            return seqs

        return await self._run(read)

    async def delete_before(self, cutoff_ms: int, limit: int) -> int:
        def delete(db: sqlite3.Connection) -> int:
            # The messages and their change rows in one transaction.
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "SELECT rowid, room, seq FROM messages WHERE created_ms < ? "
                    "ORDER BY created_ms LIMIT ?",
                    (cutoff_ms, limit),
                ).fetchall()
                for table in ("message_changes", "reactions", "mentions", "message_versions"):
                    db.executemany(
                        f"DELETE FROM {table} WHERE room = ? AND seq = ?",
                        [(room, seq) for _, room, seq in rows],
                    )
                db.executemany(
                    "DELETE FROM messages WHERE rowid = ?", [(rowid,) for rowid, _, _ in rows]
                )
                _scrub(db, [(room, seq) for _, room, seq in rows], int(time.time() * 1000))
                db.execute("COMMIT")
                return len(rows)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        return await self._run(delete)

    async def purge_room(self, room: str) -> int:
        # The rooms row (its last_seq, last_change) stays: seqs and change numbers
        # are never handed out twice. The change rows go in the same transaction.
        def purge(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM message_changes WHERE room = ?", (room,))
                for table in ("reactions", "mentions", "message_versions"):
                    db.execute(f"DELETE FROM {table} WHERE room = ?", (room,))
                gone = db.execute(
                    "DELETE FROM messages WHERE room = ? RETURNING room, seq", (room,)
                ).fetchall()
                _scrub(db, gone, int(time.time() * 1000))
                count = len(gone)
                db.execute("COMMIT")
                return count
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        return await self._run(purge)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def change(
        self,
        room: str,
        seq: int,
        text: str | None,
        *,
        author: str | None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> tuple[Change | None, Message]:
        def write(db: sqlite3.Connection) -> tuple[Change | None, Message]:
            db.execute("BEGIN IMMEDIATE")
            try:
                pos = db.execute(_ROOM, (room,)).fetchone()
                if pos is not None and idempotency_key is not None:
                    done = db.execute(
                        "SELECT seq FROM message_changes WHERE room = ? AND "
                        "key_owner = ? AND idempotency_key = ?",
                        (room, *idempotency_key),
                    ).fetchone()
                    if done is not None:  # a repeat: the message as it is now
                        again = _row(db.execute(_MESSAGE, (room, done[0])).fetchone())
                        db.execute("ROLLBACK")
                        return None, again
                current = _message_in(db, pos, room, seq)
                if author is not None and current.author != author:
                    raise NotAuthor("only the author may change this message")
                restrictions = RoomModeration.of_row(room, pos[2], pos[3], 0)
                check_change(restrictions, author, edit=text is not None, at_ms=now_ms())
                if current.deleted_ms is not None:
                    if text is None:
                        db.execute("ROLLBACK")
                        return None, current
                    raise MessageNotFound(f"message {seq} in room {room!r} is deleted")
                if text == current.text:
                    db.execute("ROLLBACK")
                    return None, current
                number = pos[1] + 1
                ms = int(time.time() * 1000)
                db.execute("UPDATE rooms SET last_change = ? WHERE room = ?", (number, room))
                if text is None:  # the text is gone from the row and its events, not hidden
                    db.execute(
                        "UPDATE messages SET text = '', version = version + 1, "
                        "deleted_ms = ?, reactions = NULL, mentions = NULL "
                        "WHERE room = ? AND seq = ?",
                        (ms, room, seq),
                    )
                    for table in ("reactions", "mentions", "message_versions"):
                        db.execute(f"DELETE FROM {table} WHERE room = ? AND seq = ?", (room, seq))
                    _scrub(db, [(room, seq)], ms)
                else:  # the text it replaces is kept as a version
                    db.execute(
                        "INSERT INTO message_versions (room, seq, version, text, edited_ms) "
                        "SELECT room, seq, version, text, ? FROM messages "
                        "WHERE room = ? AND seq = ?",
                        (ms, room, seq),
                    )
                    db.execute(
                        "UPDATE messages SET text = ?, version = version + 1, "
                        "edited_ms = ? WHERE room = ? AND seq = ?",
                        (text, ms, room, seq),
                    )
                owner, key = idempotency_key or (None, None)
                db.execute(
                    "INSERT INTO message_changes (room, change, seq, after_seq, "
                    "key_owner, idempotency_key) VALUES (?, ?, ?, ?, ?, ?)",
                    (room, number, seq, pos[0], owner, key),
                )
                msg = _row(db.execute(_MESSAGE, (room, seq)).fetchone())
                self._outbox_change(db, msg, number, pos[0], ms)  # commits with it
                db.execute("COMMIT")
                return Change(number, pos[0], msg), msg
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def changes(self, room: str, *, after: int, limit: int = 200) -> list[Change]:
        cols = ", ".join("m." + c for c in _COLUMNS.split(", "))
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT c.change, c.after_seq, c.kind, {cols} FROM message_changes c "
                "JOIN messages m "
                "ON m.room = c.room AND m.seq = c.seq WHERE c.room = ? AND c.change > ? "
                "ORDER BY c.change LIMIT ?",
                (room, after, limit),
            ).fetchall()
        )
        return [
            Change(r[0], r[1], _row(r[3:]), r[2] == "reactions", r[2] == "thread") for r in rows
        ]

    async def replies(self, room: str, seq: int, *, after: int | None, limit: int) -> Page:
        def read(db: sqlite3.Connection) -> Page:
            parent = db.execute(
                "SELECT deleted_ms FROM messages WHERE room = ? AND seq = ?", (room, seq)
            ).fetchone()
            if parent is None:
                raise MessageNotFound(f"no message {seq} in room {room!r}")
            if parent[0] is not None:
                raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND reply_to = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (room, seq, after or 0, limit + 1),
            ).fetchall()
            return Page([_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(read)

    async def versions(self, room: str, seq: int) -> tuple[Message, list[Version]]:
        def read(db: sqlite3.Connection) -> tuple[Message, list[Version]]:
            row = db.execute(_MESSAGE, (room, seq)).fetchone()
            if row is None:
                raise MessageNotFound(f"no message {seq} in room {room!r}")
            msg = _row(row)
            if msg.deleted_ms is not None:
                raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
            rows = db.execute(
                "SELECT version, text, edited_ms FROM message_versions "
                "WHERE room = ? AND seq = ? ORDER BY version",
                (room, seq),
            ).fetchall()
            return msg, [Version(*r) for r in rows]

        return await self._run(read)

    async def react(
        self, room: str, seq: int, user: str, reaction: str, *, add: bool
    ) -> tuple[Change | None, Message]:
        def write(db: sqlite3.Connection) -> tuple[Change | None, Message]:
            db.execute("BEGIN IMMEDIATE")
            try:
                pos = db.execute(_ROOM, (room,)).fetchone()
                current = _message_in(db, pos, room, seq)
                ms = int(time.time() * 1000)
                restrictions = RoomModeration.of_row(room, pos[2], pos[3], 0)
                check_change(restrictions, user, edit=True, at_ms=ms)
                if current.deleted_ms is not None:
                    raise MessageDeleted(f"message {seq} in room {room!r} is deleted")
                if add:
                    done = db.execute(
                        "INSERT INTO reactions (room, seq, reaction, user_name) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (room, seq, reaction, user),
                    ).rowcount
                else:
                    done = db.execute(
                        "DELETE FROM reactions WHERE room = ? AND seq = ? AND reaction = ? "
                        "AND user_name = ?",
                        (room, seq, reaction, user),
                    ).rowcount
                if not done:
                    db.execute("ROLLBACK")
                    return None, current  # there already, or not there
                summary = summarize(
                    db.execute(
                        "SELECT reaction, user_name FROM reactions WHERE room = ? AND seq = ? "
                        "ORDER BY id",
                        (room, seq),
                    ).fetchall()
                )
                number = pos[1] + 1
                db.execute("UPDATE rooms SET last_change = ? WHERE room = ?", (number, room))
                db.execute(
                    "UPDATE messages SET reactions = ? WHERE room = ? AND seq = ?",
                    (None if summary is None else orjson.dumps(summary).decode(), room, seq),
                )
                db.execute(
                    "INSERT INTO message_changes (room, change, seq, after_seq, kind) "
                    "VALUES (?, ?, ?, ?, 'reactions')",
                    (room, number, seq, pos[0]),
                )
                msg = _row(db.execute(_MESSAGE, (room, seq)).fetchone())
                self._outbox_change(db, msg, number, pos[0], ms, reactions=True)
                db.execute("COMMIT")
                return Change(number, pos[0], msg, True), msg
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        return await self._run(write)

    def _outbox_change(
        self,
        db: sqlite3.Connection,
        msg: Message,
        number: int,
        after_seq: int,
        ms: int,
        *,
        reactions: bool = False,
    ) -> None:
        """A change's events, one row per receiver, in the caller's transaction; its
        place in the room's commit order is after_seq + number."""
        if not self._outbox_ids:
            return
        event_id, kind, data = change_event(msg, number, ms, reactions=reactions)
        db.executemany(
            "INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, "
            "pos, data, created_ms, next_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (e, event_id, kind, msg.room, msg.seq, after_seq + number, data, ms, ms)
                for e in self._outbox_ids
            ],
        )

    async def position(self, room: str) -> tuple[int, int]:
        row = await self._run(
            lambda db: db.execute(
                "SELECT last_seq, last_change FROM rooms WHERE room = ?", (room,)
            ).fetchone()
        )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def mark_read(self, user: str, room: str, seq: int) -> ReadPosition:
        def write(db: sqlite3.Connection) -> ReadPosition:
            row = db.execute(
                "INSERT INTO read_positions AS p (user_name, room, seq, updated_ms) "
                "SELECT ?, room, MIN(?, last_seq), ? FROM rooms WHERE room = ? "
                "ON CONFLICT (user_name, room) DO UPDATE SET seq = MAX(p.seq, excluded.seq), "
                "updated_ms = excluded.updated_ms RETURNING seq",
                (user, seq, int(time.time() * 1000), room),
            ).fetchone()
            last = db.execute("SELECT last_seq FROM rooms WHERE room = ?", (room,)).fetchone()
            now = int(row[0]) if row else 0
            mentioned = db.execute(_MENTIONS, (user, room, now)).fetchone()[0]
            return ReadPosition(room, now, int(last[0]) if last else 0, int(mentioned))

        return await self._run(write)

    async def read_position(self, user: str, room: str) -> ReadPosition:
        def read(db: sqlite3.Connection) -> ReadPosition:
            pos = db.execute(
                "SELECT seq FROM read_positions WHERE user_name = ? AND room = ?", (user, room)
            ).fetchone()
            last = db.execute("SELECT last_seq FROM rooms WHERE room = ?", (room,)).fetchone()
            now = int(pos[0]) if pos else 0
            mentioned = db.execute(_MENTIONS, (user, room, now)).fetchone()[0]
            return ReadPosition(room, now, int(last[0]) if last else 0, int(mentioned))

        return await self._run(read)

    async def read_positions(
        self, user: str, limit: int = 1000, rooms: RoomFilter | None = None
    ) -> list[ReadPosition]:
        kept, args = ("1", []) if rooms is None else rooms.sql_sqlite("p.room")
        rows = await self._run(
            lambda db: db.execute(
                "SELECT p.room, p.seq, coalesce(r.last_seq, 0), (SELECT count(*) FROM mentions x "
                "JOIN messages m ON m.room = x.room AND m.seq = x.seq WHERE x.user_name = "
                "p.user_name AND x.room = p.room AND x.seq > p.seq AND m.deleted_ms IS NULL "
                "AND m.author <> p.user_name) FROM read_positions p "
                f"LEFT JOIN rooms r ON r.room = p.room WHERE p.user_name = ? AND {kept} "
                "ORDER BY p.room LIMIT ?",
                (user, *args, limit),
            ).fetchall()
        )
        return [ReadPosition(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def search(
        self,
        query: Query,
        scope: RoomScope,
        *,
        limit: int,
        cursor: Cursor | None = None,
        timeout: float = 2.0,
    ) -> Page:
        sql, args = _search_sql(query, scope, limit, cursor)

        def read(db: sqlite3.Connection) -> Page:
            deadline = time.monotonic() + timeout
            # Called every few thousand VM steps: a true answer interrupts the query.
            db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                rows = db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise SearchTimeout(f"the search ran past {timeout:g} s") from exc
                if "fts5" in str(exc):
                    raise BadQuery(f"q cannot be searched: {exc}") from exc
                raise
            finally:
                db.set_progress_handler(None, 0)
            return Page([_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(read)

    # -- moderation ----------------------------------------------------------------

    async def room_moderations(self, rooms: list[str]) -> dict[str, RoomModeration]:
        def read(db: sqlite3.Connection) -> dict[str, RoomModeration]:
            found = {room: RoomModeration(room) for room in rooms}
            for i in range(0, len(rooms), _IN_CHUNK):
                chunk = rooms[i : i + _IN_CHUNK]
                for room, banned, muted, slow in db.execute(
                    "SELECT room, banned, muted, slow_mode FROM rooms WHERE room IN "
                    f"({', '.join('?' * len(chunk))})",
                    chunk,
                ):
                    found[room] = RoomModeration.of_row(room, banned, muted, slow)
            return found

        return await self._run(read)

    async def moderate(self, room: str, action: Action) -> ModerationEntry | None:
        def write(db: sqlite3.Connection) -> ModerationEntry | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                ms = now_ms()
                row = db.execute(
                    "SELECT last_seq, last_change, banned, muted, slow_mode FROM rooms "
                    "WHERE room = ?",
                    (room,),
                ).fetchone()
                last_seq, last_change = (row[0], row[1]) if row else (0, 0)
                before = RoomModeration.of_row(room, *row[2:]) if row else RoomModeration(room)
                after = apply(before, action, ms)
                if after is None:
                    db.execute("ROLLBACK")
                    return None
                db.execute(
                    "INSERT INTO rooms (room, last_seq, banned, muted, slow_mode) "
                    "VALUES (?, 0, ?, ?, ?) ON CONFLICT (room) DO UPDATE SET "
                    "banned = excluded.banned, muted = excluded.muted, "
                    "slow_mode = excluded.slow_mode",
                    (room, *after.stored()),
                )
                done = entry(room, action, ms)
                (entry_id,) = db.execute(
                    "INSERT INTO moderation_log (room, action, user_name, by_name, reason, "
                    "until_ms, slow_mode, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "RETURNING id",
                    (*log_row(done), ms),
                ).fetchone()
                done = replace(done, id=entry_id)
                if self._outbox_ids:  # queued with the room's events, at its position now
                    event_id, kind, data = done.event()
                    db.executemany(
                        "INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, "
                        "pos, data, created_ms, next_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                e,
                                event_id,
                                kind,
                                room,
                                last_seq,
                                last_seq + last_change,
                                data,
                                ms,
                                ms,
                            )
                            for e in self._outbox_ids
                        ],
                    )
                db.execute("COMMIT")
                return done
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def moderation_log(
        self, room: str, *, limit: int, before: int | None = None
    ) -> list[ModerationEntry]:
        def read(db: sqlite3.Connection) -> list[ModerationEntry]:
            rows = db.execute(
                "SELECT id, room, action, user_name, by_name, reason, until_ms, slow_mode, "
                "created_ms FROM moderation_log WHERE room = ? AND id < ? "
                "ORDER BY id DESC LIMIT ?",
                (room, 2**62 if before is None else before, limit),
            ).fetchall()
            return [ModerationEntry(*r) for r in rows]

        return await self._run(read)

    async def banned_rooms(self, user: str) -> list[str]:
        def read(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT room, banned FROM rooms, json_each(rooms.banned) AS j "
                "WHERE rooms.banned <> '{}' AND j.key = ?",
                (user,),
            ).fetchall()
            at = now_ms()
            return sorted(
                room
                for room, banned in rows
                if RoomModeration.of_row(room, banned, None, 0).ban(user, at) is not None
            )

        return await self._run(read)

    def stats(self) -> dict[str, Any]:
        return {"pool_size": 1, "pool_max": 1}


def _search_sql(
    query: Query, scope: RoomScope, limit: int, cursor: Cursor | None
) -> tuple[str, list[Any]]:
    """The search statement: FTS5 finds the rows, the scope and the cursor are
    conditions of the same statement, then the newest ``limit + 1``."""
    cols = ", ".join("m." + c for c in _COLUMNS.split(", "))
    where = ["messages_fts MATCH ?", "m.deleted_ms IS NULL"]
    args: list[Any] = [query.fts5()]
    if not scope.everything:
        where.append(
            "(m.room IN (SELECT value FROM json_each(?)) OR EXISTS (SELECT 1 FROM "
            "json_each(?) p WHERE substr(m.room, 1, length(p.value)) = p.value))"
        )
        args += [orjson.dumps(scope.names).decode(), orjson.dumps(scope.prefixes).decode()]
    if scope.excluded:
        where.append("m.room NOT IN (SELECT value FROM json_each(?))")
        args.append(orjson.dumps(scope.excluded).decode())
    if cursor is not None:
        where.append("(m.created_ms, m.room, m.seq) < (?, ?, ?)")
        args += [cursor.created_ms, cursor.room, cursor.seq]
    args.append(limit + 1)
    sql = (
        f"SELECT {cols} FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid "
        f"WHERE {' AND '.join(where)} ORDER BY m.created_ms DESC, m.room DESC, m.seq DESC "
        "LIMIT ?"
    )
    return sql, args

"""Posting from SQL: ``chat_post`` called by a backend inside its own transaction,
from a connection of its own, against real gateways, Postgres, Redis and a real
webhook receiver (docs/backends.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from chat_gateway.storage.listen_postgres import APPLICATION_NAME
from tests.harness import (
    Instance,
    RedisServer,
    SSEClient,
    WSClient,
    eventually,
    instances,
    metric,
    no_errors,
    post,
    t,
)
from tests.system.test_webhooks import ADMIN_KEY, Receiver, hook_env, new_secret

API = {"Authorization": f"Bearer {ADMIN_KEY}"}


@contextlib.asynccontextmanager
async def backend(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def sql_post(conn: asyncpg.Connection, room: str, author: str, text: str) -> int:
    """One post in a transaction of the backend's own, with a write of its own beside it."""
    async with conn.transaction():
        await conn.execute("CREATE TABLE IF NOT EXISTS orders (id serial, note text)")
        await conn.execute("INSERT INTO orders (note) VALUES ($1)", text)
        seq: int = await conn.fetchval("SELECT chat_post($1, $2, $3)", room, author, text)
    return seq


def texts_of_ws(ws: WSClient, room: str) -> list[tuple[int, str]]:
    return [
        (f["message"]["seq"], f["message"]["text"])
        for f in ws.frames
        if f.get("type") == "message" and f.get("room") == room
    ]


def texts_of_sse(sse: SSEClient) -> list[tuple[int, str]]:
    return [(int(e["id"]), e["json"]["text"]) for e in sse.events if e.get("event") == "message"]


async def test_committed_posts_reach_ws_and_sse_on_two_instances_in_order(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    # No position check for the test's length: only the LISTEN wake-up can deliver.
    env = {**gateway_env, "POSITION_INTERVAL": "600"}
    room = "sqlroom"
    async with instances(2, env) as (a, b), httpx.AsyncClient() as http, backend(pg_url) as db:
        async with (
            WSClient.connect(a.ws_url) as ws,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?since=0") as sse,
        ):
            await ws.subscribe(room, since=0)
            expected: list[tuple[int, str]] = []
            for i in range(6):
                r = await post(http, (a, b)[i % 2].url, room, f"http {i}")
                assert r.status_code == 201, r.text
                expected.append((r.json()["seq"], f"http {i}"))
                seq = await sql_post(db, room, "backend", f"sql {i}")
                expected.append((seq, f"sql {i}"))
            assert [s for s, _ in expected] == list(range(1, 13))
            await ws.messages(room, 12)
            await sse.wait_for(12)
            # A page read now is cached; a later SQL post raises its seq key, so no
            # instance serves that page as current once subscribers have the post.
            for gw in (a, b):
                page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages?limit=50")).json()
                assert [m["text"] for m in page["messages"]][-1] == "sql 5"
            expected.append((await sql_post(db, room, "backend", "last"), "last"))
            await ws.messages(room, 13)
            await sse.wait_for(13)
            await asyncio.sleep(0.3)  # anything doubled would have arrived by now
            assert texts_of_ws(ws, room) == expected
            assert texts_of_sse(sse) == expected
            for gw in (a, b):
                page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages?limit=50")).json()
                assert [m["text"] for m in page["messages"]][-1] == "last"
            assert await metric(a.url, "chat_gap_fills_total", reason="notified") > 0
        no_errors(a.log() + b.log())


async def test_nothing_is_visible_before_commit_and_nothing_after_rollback(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    env = {**gateway_env, "POSITION_INTERVAL": "0.2"}
    room = "rolled"
    async with instances(1, env) as (a,), httpx.AsyncClient() as http, backend(pg_url) as db:
        async with WSClient.connect(a.ws_url) as ws:
            await ws.subscribe(room, since=0)
            tx = db.transaction()
            await tx.start()
            assert await db.fetchval("SELECT chat_post($1, 'backend', 'never')", room) == 1
            page = (await http.get(f"{a.url}/v1/rooms/{room}/messages")).json()
            assert page["messages"] == []
            await tx.rollback()
            # The seq went with the rollback: the next post takes 1.
            r = await post(http, a.url, room, "after the rollback")
            assert r.json()["seq"] == 1
            committed = await sql_post(db, room, "backend", "committed")
            assert committed == 2
            await ws.messages(room, 2)
            await asyncio.sleep(1)  # position checks meanwhile find nothing more
            assert texts_of_ws(ws, room) == [(1, "after the rollback"), (2, "committed")]
            page = (await http.get(f"{a.url}/v1/rooms/{room}/messages")).json()
            assert [m["text"] for m in page["messages"]] == ["after the rollback", "committed"]


async def test_a_role_with_only_execute_can_post_and_keys_are_scoped_to_it(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    role = "cg_backend_" + os.urandom(4).hex()
    other = role + "_other"
    async with instances(1, gateway_env) as (a,), backend(pg_url) as admin:
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN")
            await admin.execute(f"CREATE ROLE {other} LOGIN")
            await admin.execute(
                f"GRANT EXECUTE ON FUNCTION chat_post(text, text, text, text) TO {role}"
            )
            base, _, db_name = pg_url.rpartition("/")
            as_role = f"postgresql://{role}@{base.rpartition('@')[2]}/{db_name}"
            as_other = f"postgresql://{other}@{base.rpartition('@')[2]}/{db_name}"
            async with backend(as_role) as db:
                first = await db.fetchval("SELECT chat_post('keyed', 'bob', 'once', 'k1')")
                again = await db.fetchval("SELECT chat_post('keyed', 'bob', 'twice', 'k1')")
                assert first == again == 1
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.execute("INSERT INTO rooms (room, last_seq) VALUES ('x', 1)")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.fetch("SELECT * FROM messages")
            # Without the grant, no call (EXECUTE is revoked from PUBLIC).
            async with backend(as_other) as db:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.fetchval("SELECT chat_post('keyed', 'eve', 'hi')")
            # The same key from another caller is another key.
            await admin.execute(
                f"GRANT EXECUTE ON FUNCTION chat_post(text, text, text, text) TO {other}"
            )
            async with backend(as_other) as db:
                assert await db.fetchval("SELECT chat_post('keyed', 'eve', 'mine', 'k1')") == 2
            rows = await admin.fetch("SELECT seq, text, idempotency_key FROM messages ORDER BY seq")
            assert [tuple(r) for r in rows] == [
                (1, "once", f"sql:{len(role)}:{role}:k1"),
                (2, "mine", f"sql:{len(other)}:{other}:k1"),
            ]
            async with httpx.AsyncClient() as http:
                page = (await http.get(f"{a.url}/v1/rooms/keyed/messages")).json()
            assert [m["text"] for m in page["messages"]] == ["once", "mine"]
        finally:
            await admin.execute(f"DROP OWNED BY {role}, {other}")
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.execute(f"DROP ROLE IF EXISTS {other}")


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        (("bad room!", "bob", "hi", None), asyncpg.InvalidParameterValueError, "room must match"),
        (("", "bob", "hi", None), asyncpg.InvalidParameterValueError, "room must match"),
        ((None, "bob", "hi", None), asyncpg.InvalidParameterValueError, "room must match"),
        (("r", "bob", "   ", None), asyncpg.InvalidParameterValueError, "text must be 1..4000"),
        (("r", "bob", "x" * 4001, None), asyncpg.InvalidParameterValueError, "text must be"),
        (("r", "bob", None, None), asyncpg.InvalidParameterValueError, "text must be"),
        (("r", " ", "hi", None), asyncpg.InvalidParameterValueError, "author must be"),
        (("r", "a" * 65, "hi", None), asyncpg.InvalidParameterValueError, "author must be"),
        (("r", "bob", "hi", "k" * 129), asyncpg.InvalidParameterValueError, "idempotency_key"),
        (("r", "bob", "hi", ""), asyncpg.InvalidParameterValueError, "idempotency_key"),
        (("r", "bob", "a\x00b", None), asyncpg.CharacterNotInRepertoireError, "0x00"),
    ],
)
async def test_bad_input_raises_a_clear_error_and_writes_nothing(
    pg_url: str, args: tuple[Any, ...], error: type[Exception], words: str
) -> None:
    from chat_gateway.storage.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.start()
    try:
        await store.migrate()
    finally:
        await store.close()
    async with backend(pg_url) as db:
        await db.execute("INSERT INTO webhook_endpoints (url, in_use) VALUES ('http://x/', true)")
        with pytest.raises(error) as raised:
            async with db.transaction():
                await db.fetchval("SELECT chat_post($1, $2, $3, $4)", *args)
        assert words in str(raised.value)
        counts = await db.fetchrow(
            "SELECT (SELECT count(*) FROM rooms) AS rooms, "
            "(SELECT count(*) FROM messages) AS messages, "
            "(SELECT count(*) FROM webhook_outbox) AS outbox"
        )
        assert tuple(counts) == (0, 0, 0)


async def test_a_banned_or_muted_author_is_refused(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    env = {**gateway_env, "API_KEYS": ADMIN_KEY}
    async with instances(1, env) as (a,), httpx.AsyncClient() as http, backend(pg_url) as db:
        assert await db.fetchval("SELECT chat_post('mod', 'eve', 'before')") == 1
        for kind in ("bans", "mutes"):
            r = await http.post(f"{a.url}/v1/rooms/mod/{kind}", json={"user": "eve"}, headers=API)
            assert r.status_code in (200, 201), r.text
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="eve may not post"):
                await db.fetchval("SELECT chat_post('mod', 'eve', 'refused')")
            r = await http.delete(f"{a.url}/v1/rooms/mod/{kind}/eve", headers=API)
            assert r.status_code in (200, 204), r.text
        assert await db.fetchval("SELECT chat_post('mod', 'eve', 'after')") == 2
        assert await db.fetchval("SELECT last_seq FROM rooms WHERE room = 'mod'") == 2


async def test_webhooks_get_message_created_for_sql_posts(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    receiver = await Receiver([new_secret()]).start()
    room = "hooked"
    try:
        env = hook_env(gateway_env, receiver, WEBHOOK_POLL_INTERVAL="600")
        async with instances(1, env) as (a,), httpx.AsyncClient() as http, backend(pg_url) as db:
            expected = []
            for i in range(3):
                r = await post(http, a.url, room, f"http {i}", author="ann")
                expected.append((r.json()["seq"], "ann", f"http {i}"))
                seq = await sql_post(db, room, "backend", f"sql {i}")
                expected.append((seq, "backend", f"sql {i}"))
            await eventually(lambda: len(receiver.seqs(room)) >= 6, timeout=20)
            got = [
                (h.payload["data"]["seq"], h.payload["data"]["author"], h.payload["data"]["text"])
                for h in receiver.delivered()
            ]
            assert got == expected
            assert {h.payload["type"] for h in receiver.delivered()} == {"message.created"}
            assert receiver.unverified == []
            sql_hit = receiver.delivered()[1].payload["data"]
            page = (await http.get(f"{a.url}/v1/rooms/{room}/messages")).json()
            assert sql_hit["id"] == page["messages"][1]["id"]
            assert sql_hit["created_at"] == page["messages"][1]["created_at"]
    finally:
        await receiver.stop()


async def _listening(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND datname = current_database()",
            APPLICATION_NAME,
        )
    )


async def _cut_listeners(db: asyncpg.Connection) -> None:
    """Keep every gateway's LISTEN session of this database cut."""
    while True:
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        await asyncio.sleep(0.02)


async def test_a_lost_notification_is_delivered_by_the_position_check(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    room = "lost"
    async with (
        instances(1, gateway_env) as (a,),
        httpx.AsyncClient() as http,
        backend(pg_url) as db,
        backend(pg_url) as killer,
    ):
        await eventually(lambda: _listening(db))
        async with WSClient.connect(a.ws_url) as ws:
            await ws.subscribe(room, since=0)
            r = await post(http, a.url, room, "through redis")
            assert r.json()["seq"] == 1
            await ws.messages(room, 1)
            before = await metric(a.url, "chat_gap_fills_total", reason="position")
            cutting = asyncio.create_task(_cut_listeners(killer))
            try:
                await eventually(lambda: _nobody_listens(db))
                assert await sql_post(db, room, "backend", "unheard") == 2
                await ws.messages(room, 2)
                assert texts_of_ws(ws, room) == [(1, "through redis"), (2, "unheard")]
                assert await metric(a.url, "chat_gap_fills_total", reason="position") > before
                assert await metric(a.url, "chat_gap_fills_total", reason="notified") == 0
            finally:
                cutting.cancel()
                await asyncio.gather(cutting, return_exceptions=True)
            # The listener comes back by itself, and wakes the room again.
            await eventually(lambda: _listening(db), timeout=20)
            assert await sql_post(db, room, "backend", "heard") == 3
            await ws.messages(room, 3)
            await eventually(lambda: _notified(a))


async def _nobody_listens(db: asyncpg.Connection) -> bool:
    return await _listening(db) == 0


async def _notified(gw: Instance) -> bool:
    return await metric(gw.url, "chat_gap_fills_total", reason="notified") > 0


class SqlWriter:
    """A backend committing ``chat_post`` rows in transactions of its own, one after
    another until stopped, every third one rolled back after its call; keeps the
    seq and text of each committed row."""

    def __init__(self, url: str, room: str) -> None:
        self.url, self.room = url, room
        self.committed: list[tuple[int, str]] = []
        self.rolled_back = 0
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with backend(self.url) as db:
            i = 0
            while not self.stop.is_set():
                if i % 3 == 2:
                    tx = db.transaction()
                    await tx.start()
                    await db.fetchval("SELECT chat_post($1, 'backend', $2)", self.room, f"rb {i}")
                    await tx.rollback()
                    self.rolled_back += 1
                else:
                    seq = await sql_post(db, self.room, "backend", f"c {i}")
                    self.committed.append((seq, f"c {i}"))
                i += 1
                await asyncio.sleep(0.01)

    def start(self) -> SqlWriter:
        self._task = asyncio.create_task(self._run())
        return self

    async def until(self, count: int) -> None:
        await eventually(lambda: len(self.committed) >= count or self._done(), 30)
        self._done()

    def _done(self) -> bool:
        if self._task is not None and self._task.done():
            self._task.result()  # its error
            return True
        return False

    async def finish(self) -> list[tuple[int, str]]:
        self.stop.set()
        assert self._task is not None
        await self._task
        assert [s for s, _ in self.committed] == list(range(1, len(self.committed) + 1))
        return self.committed


async def test_sql_posts_through_a_redis_restart_reach_every_subscriber_once_in_order(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    """Redis (a server of the test's own) is restarted, empty, while a backend commits
    chat_post rows (and rolls some back): every committed row reaches a WS and an
    SSE subscriber on each of two instances once, in seq order, and no rolled-back
    one; a page read afterwards ends with the last row."""
    rs = RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url}
    room = "restart"
    try:
        async with (
            instances(2, env) as gws,
            httpx.AsyncClient(timeout=30) as http,
            WSClient.connect(gws[0].ws_url, max_queue=None) as ws_a,
            WSClient.connect(gws[1].ws_url, max_queue=None) as ws_b,
            SSEClient.open(f"{gws[0].url}/v1/rooms/{room}/events?since=0") as sse_a,
            SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events?since=0") as sse_b,
        ):
            for ws in (ws_a, ws_b):
                await ws.subscribe(room, since=0)
            writer = SqlWriter(pg_url, room).start()
            await writer.until(10)
            rs.stop()
            at = len(writer.committed)
            await writer.until(at + 10)  # committed while Redis is down
            rs.start()
            at = len(writer.committed)
            await writer.until(at + 10)
            expected = await writer.finish()
            assert writer.rolled_back >= 10
            n = len(expected)
            for ws in (ws_a, ws_b):
                await ws.messages(room, n, timeout=30)
            for sse in (sse_a, sse_b):
                await sse.wait_for(n, timeout=30)
            await asyncio.sleep(t(1))  # anything doubled would have arrived by now
            for ws in (ws_a, ws_b):
                assert texts_of_ws(ws, room) == expected
            for sse in (sse_a, sse_b):
                assert texts_of_sse(sse) == expected

            async def last_on_every_page() -> bool:
                for gw in gws:
                    r = await http.get(f"{gw.url}/v1/rooms/{room}/messages?limit=5")
                    if r.json()["messages"][-1]["seq"] != n:
                        return False
                return True

            await eventually(last_on_every_page, 20)
        for gw in gws:
            no_errors(gw.log())
    finally:
        rs.stop()


async def test_sql_posts_through_an_instance_kill_reach_survivors_and_resumers_once(
    gateway_env: dict[str, str], pg_url: str
) -> None:
    """One of two instances is SIGKILLed while a backend commits chat_post rows (and
    rolls some back). A subscriber on the survivor gets every committed row once, in
    order; the killed instance's subscriber reconnects to the survivor with
    ``since`` its last seq and gets the rest once, in order: together, every row."""
    room = "killed"
    async with instances(2, gateway_env) as (a, b):
        async with WSClient.connect(b.ws_url, max_queue=None) as survivor:
            await survivor.subscribe(room, since=0)
            victim_ctx = WSClient.connect(a.ws_url, max_queue=None)
            victim = await victim_ctx.__aenter__()
            try:
                await victim.subscribe(room, since=0)
                writer = SqlWriter(pg_url, room).start()
                await writer.until(10)
                await victim.messages(room, 5)
                a.kill()
                await victim.read_all()  # what reached it before the kill
            finally:
                with contextlib.suppress(Exception):
                    await victim_ctx.__aexit__(None, None, None)
            before = texts_of_ws(victim, room)
            at = len(writer.committed)
            await writer.until(at + 15)
            async with WSClient.connect(b.ws_url, max_queue=None) as resumed:
                await resumed.subscribe(room, since=before[-1][0])
                at = len(writer.committed)
                await writer.until(at + 10)
                expected = await writer.finish()
                n = len(expected)
                await survivor.messages(room, n, timeout=30)
                await resumed.messages(room, n - len(before), timeout=30)
                await asyncio.sleep(t(1))  # anything doubled would have arrived by now
                assert texts_of_ws(survivor, room) == expected
                assert before == expected[: len(before)]
                assert texts_of_ws(resumed, room) == expected[len(before) :]
        no_errors(b.log())

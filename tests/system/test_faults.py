"""Faults an operator meets, against real processes: a frozen Redis, an instance cut
from Redis but not from Postgres, a frozen Postgres link, a locked SQLite file, and
what a freshly started instance makes its first posts wait for. Each test asserts
the promise that must hold, with generous bounds where there is time in it
(correctness, not speed: speed is the bench's)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time

import httpx

from tests.harness import (
    REDIS_URL,
    Instance,
    RedisServer,
    SSEClient,
    WSClient,
    eventually,
    instances,
    metric,
    post,
    t,
)
from tests.proxy import tcp_proxy


async def _timed(request) -> tuple[float, httpx.Response]:
    t0 = time.monotonic()
    r = await request
    return time.monotonic() - t0, r


async def _fallbacks(gws: list) -> list[float]:
    return [await metric(g.url, "chat_rate_limit_local_fallback") for g in gws]


async def test_a_redis_freeze_under_steady_posts_leaves_no_instance_off_redis(gateway_env):
    """Redis is frozen (SIGSTOP) for 2 s while posts keep coming over three instances.
    Every instance must be back on Redis within seconds of the thaw, while the posts
    go on, and then a post read at once on another instance is never stale. (Before,
    each post skipped while Redis cooled down moved the cooldown forward, so a busy
    instance stayed off Redis for as long as posts kept coming.)"""
    rs = RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url}
    try:
        async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
            done = asyncio.Event()
            acked = [0]

            async def poster(n: int) -> None:
                i = 0
                while not done.is_set():
                    r = await post(http, gws[(n + i) % 3].url, f"steady{n}", f"m{i}")
                    assert r.status_code == 201, r.text
                    acked[0] += 1
                    i += 1
                    await asyncio.sleep(0.02)

            posters = [asyncio.create_task(poster(n)) for n in range(4)]
            try:
                await asyncio.sleep(1)
                assert await _fallbacks(gws) == [0, 0, 0]
                assert rs.proc is not None
                rs.proc.send_signal(signal.SIGSTOP)
                frozen_at = time.monotonic()
                try:
                    # Every instance notices (its posts time out on Redis).
                    await eventually(lambda: _all_off(gws), timeout=10)
                    await asyncio.sleep(max(0.0, frozen_at + 2 - time.monotonic()))
                finally:
                    rs.proc.send_signal(signal.SIGCONT)
                before = acked[0]
                # Back on Redis while the posts go on (they do: see below).
                await eventually(lambda: _all_on(gws), timeout=5)
                # Post here, read there at once: the page holds the post.
                for i in range(30):
                    r = await post(http, gws[i % 3].url, "pairs", f"p{i}")
                    assert r.status_code == 201, r.text
                    mid = r.json()["id"]
                    page = (
                        await http.get(
                            f"{gws[(i + 1) % 3].url}/v1/rooms/pairs/messages", params={"limit": 5}
                        )
                    ).json()
                    assert mid in [m["id"] for m in page["messages"]], (i, page)
                assert acked[0] > before, "the posts went on all along"
            finally:
                done.set()
                await asyncio.gather(*posters)
    finally:
        if rs.proc is not None:
            rs.proc.send_signal(signal.SIGCONT)
        rs.stop()


async def _history(http: httpx.AsyncClient, base: str, room: str) -> list[int]:
    page = (await http.get(f"{base}/v1/rooms/{room}/messages")).json()
    return [m["seq"] for m in page["messages"]]


async def _history_is(http: httpx.AsyncClient, base: str, room: str, seqs: list[int]) -> bool:
    return await _history(http, base, room) == seqs


async def _all_off(gws: list) -> bool:
    return all(v == 1 for v in await _fallbacks(gws))


async def _all_on(gws: list) -> bool:
    return all(v == 0 for v in await _fallbacks(gws))


async def test_a_commit_whose_seq_raise_and_publish_were_lost_reaches_every_subscriber(gateway_env):
    """Instance A is cut from Redis but not from Postgres: it commits and answers 201,
    but neither raises the room's seq key nor publishes. The other instances'
    position checks read the store every few rounds, so the message reaches their
    subscribers with no further post, even after A is gone."""
    room = "cut"
    cut = {**gateway_env, "FAULT_CUT_FROM_REDIS": "1"}
    async with instances(1, cut) as (a,), instances(2, gateway_env) as (b, c):
        async with (
            WSClient.connect(b.ws_url) as ws,
            httpx.AsyncClient() as http,
            SSEClient.open(f"{c.url}/v1/rooms/{room}/events") as sse,
        ):
            await ws.subscribe(room)
            r = await post(http, b.url, room, "through Redis")
            assert r.status_code == 201 and r.json()["seq"] == 1
            assert await _history(http, c.url, room) == [1]  # the page for seq 1 is cached
            r = await post(http, a.url, room, "only in the store")
            assert r.status_code == 201 and r.json()["seq"] == 2
            assert await ws.messages(room, 2, timeout=10) == [1, 2]
            assert await sse.wait_for(2, timeout=10) == [1, 2]
            # The same once the cut instance is gone for good.
            r = await post(http, a.url, room, "and its last words")
            assert r.status_code == 201 and r.json()["seq"] == 3
            a.kill()
            assert await ws.messages(room, 3, timeout=10) == [1, 2, 3]
            assert await sse.wait_for(3, timeout=10) == [1, 2, 3]
            assert await metric(b.url, "chat_gap_fills_total", reason="position") >= 1
            # The cached page is no longer served as the latest: the seq key was
            # raised to the store's by the position check.
            await eventually(lambda: _history_is(http, c.url, room, [1, 2, 3]), timeout=10)


async def test_a_frozen_database_link_answers_posts_and_readyz_within_their_bounds(
    pg_url, redis_prefix
):
    """The link to Postgres is held (bytes wait, nothing is reset: a frozen server or
    network). Every post, with an Idempotency-Key or without, is answered 503
    ``unavailable`` within DB_COMMAND_TIMEOUT plus a margin, and /readyz within its
    own bound, however long the link stays frozen; afterwards posts work again.
    (Before, asyncpg's cancel and release went down the frozen link too, and a post
    with a key waited for several timeouts in a row.)"""
    timeout = 2.0
    bound = timeout + t(2)
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = Instance(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": REDIS_URL,
                "KEY_PREFIX": redis_prefix,
                "LOG_LEVEL": "warning",
                "DB_COMMAND_TIMEOUT": str(timeout),
                "DB_CONNECT_TIMEOUT": "10",
                "RATE_LIMIT": "100000/1s",
            }
        ).start()
        try:
            await inst.wait_ready()
            async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
                for i in range(3):
                    r = await post(
                        http,
                        inst.url,
                        "frozen",
                        f"warm{i}",
                        headers={"Idempotency-Key": f"warm{i}"},
                    )
                    assert r.status_code == 201, r.text
                    assert (await post(http, inst.url, "frozen", f"w{i}")).status_code == 201

                timed = _timed
                proxy.hold()
                answers = await asyncio.gather(
                    *(
                        timed(
                            post(
                                http,
                                inst.url,
                                "frozen",
                                f"k{i}",
                                headers={"Idempotency-Key": f"key-{i}"},
                            )
                        )
                        for i in range(4)
                    ),
                    *(timed(post(http, inst.url, "frozen", f"p{i}")) for i in range(4)),
                    timed(http.get("/v1/rooms/frozen/messages", params={"before": 3})),
                )
                for took, r in answers:
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "unavailable"
                    assert took < bound, (took, r.text)
                t0 = time.monotonic()
                r = await http.get("/readyz")
                took = time.monotonic() - t0
                assert r.status_code == 503 and r.json()["checks"]["database"]["ok"] is False
                assert took < t(3), took
                proxy.restore()
                r = await eventually(lambda: _posted(http, inst.url), timeout=20)
                assert r.json()["seq"] >= 7
        finally:
            inst.stop()


async def _posted(
    http: httpx.AsyncClient, base: str, room: str = "frozen"
) -> httpx.Response | None:
    r = await post(http, base, room, "after the thaw")
    return r if r.status_code == 201 else None


async def test_a_ready_instance_posts_without_waiting_for_type_lookups(pg_url, redis_prefix):
    """asyncpg looks a connection's array types up with a catalog query the first time
    a statement binds them; the group commit binds text[] and timestamptz[]. That
    lookup happens when a pooled connection is made, not in the first post through
    it (which waited for it: the cold start of an instance's first messages)."""
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = Instance(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": REDIS_URL,
                "KEY_PREFIX": redis_prefix,
                "LOG_LEVEL": "warning",
            }
        ).start()
        try:
            await inst.wait_ready()
            proxy.record()
            async with httpx.AsyncClient(base_url=inst.url, timeout=30) as http:
                for room in ("first", "second"):
                    r = await post(http, inst.url, room, "hello")
                    assert r.status_code == 201, r.text
            assert proxy.sent is not None and b"INSERT INTO messages" in proxy.sent
            assert b"pg_type" not in proxy.sent, "a post waited for a catalog lookup"
        finally:
            inst.stop()


async def test_a_locked_sqlite_file_answers_posts_within_the_command_timeout(tmp_path):
    """Another process holds the embedded database's write lock: a post is answered 503
    ``unavailable`` within DB_COMMAND_TIMEOUT plus a margin (SQLite's own wait was
    fixed at 10 s), and goes through once the lock is gone."""
    path = tmp_path / "chat.db"
    inst = Instance(
        {
            "DATABASE_URL": f"sqlite:///{path}",
            "REDIS_URL": "memory://",
            "LOG_LEVEL": "warning",
            "DB_COMMAND_TIMEOUT": "1",
        }
    ).start()
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
            assert (await post(http, inst.url, "locked", "before")).status_code == 201
            lock = sqlite3.connect(path, isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                t0 = time.monotonic()
                r = await post(http, inst.url, "locked", "while locked")
                took = time.monotonic() - t0
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
                assert took < 1 + t(2), took
                lock.execute("ROLLBACK")
            finally:
                lock.close()
            r = await post(http, inst.url, "locked", "after")
            assert r.status_code == 201 and r.json()["seq"] == 2, r.text
    finally:
        inst.stop()


async def test_a_post_answered_503_while_waiting_for_a_connection_is_not_stored_later(
    pg_url, redis_prefix
):
    """With the link frozen, a post that was still waiting for a pooled connection when
    its time ran out is answered 503 and withdrawn: it is not committed once the
    link thaws. (One already sent may still arrive; that one is not asserted on.)"""
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = Instance(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": REDIS_URL,
                "KEY_PREFIX": redis_prefix,
                "LOG_LEVEL": "warning",
                "DB_COMMAND_TIMEOUT": "2",
                "DB_POOL_MIN": "1",
                "DB_POOL_MAX": "1",
                "RATE_LIMIT": "100000/1s",
            }
        ).start()
        try:
            await inst.wait_ready()
            async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
                assert (await post(http, inst.url, "held", "before")).status_code == 201
                proxy.hold()
                sent = asyncio.create_task(post(http, inst.url, "held", "in flight"))
                # Its statement is held on the way: it holds the only connection.
                await eventually(lambda: proxy.waiting > 0, timeout=10)
                waiting = await post(http, inst.url, "held", "waiting")
                assert waiting.status_code == 503, waiting.text
                # Never sent: known not stored. Sent, no answer: it may be stored.
                assert "outcome" not in waiting.json()["error"], waiting.text
                assert "nothing was stored" in waiting.json()["error"]["message"]
                sent_answer = await sent
                assert sent_answer.status_code == 503
                assert sent_answer.json()["error"]["outcome"] == "unknown", sent_answer.text
                proxy.restore()
                await eventually(lambda: _posted(http, inst.url, "held"), timeout=20)
                await asyncio.sleep(t(1))
                page = (
                    await http.get("/v1/rooms/held/messages", params={"after": 0, "limit": 50})
                ).json()
                texts = [m["text"] for m in page["messages"]]
                assert "waiting" not in texts, texts
                assert texts[0] == "before" and "after the thaw" in texts
        finally:
            inst.stop()


def _db_instance(db_url: str, redis_prefix: str, **env: str) -> Instance:
    return Instance(
        {
            "DATABASE_URL": db_url,
            "REDIS_URL": REDIS_URL,
            "KEY_PREFIX": redis_prefix,
            "LOG_LEVEL": "warning",
            "DB_CONNECT_TIMEOUT": "10",
            "RATE_LIMIT": "100000/1s",
            **env,
        }
    ).start()


async def test_edits_and_deletes_on_a_frozen_database_link_answer_within_the_command_timeout(
    pg_url, redis_prefix
):
    """With the link to Postgres held, a PATCH and a DELETE of a message are answered
    503 ``unavailable`` within DB_COMMAND_TIMEOUT plus a margin, as posts are: one
    deadline over the whole change (connection, every statement of its transaction,
    the commit). (Before, each statement had its own timeout and the rollback and
    release went down the frozen link: 13.5 s and 14.6 s with the timeout at 10 s.)"""
    timeout = 4.0
    bound = timeout + t(1.5)
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = _db_instance(db_url, redis_prefix, DB_COMMAND_TIMEOUT=str(timeout))
        try:
            await inst.wait_ready()
            async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
                for i in range(2):
                    assert (await post(http, inst.url, "frozen", f"m{i}")).status_code == 201
                edit = {"text": "edited", "author": "tester"}
                r = await http.patch("/v1/rooms/frozen/messages/1", json=edit)
                assert r.status_code == 200, r.text
                proxy.hold()
                answers = await asyncio.gather(
                    _timed(
                        http.patch(
                            "/v1/rooms/frozen/messages/1",
                            json={"text": "again", "author": "tester"},
                        )
                    ),
                    _timed(
                        http.request(
                            "DELETE", "/v1/rooms/frozen/messages/2", json={"author": "tester"}
                        )
                    ),
                )
                for took, r in answers:
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "unavailable"
                    assert took < bound, (took, r.text)
                proxy.restore()

                async def deleted() -> bool:
                    r = await http.request(
                        "DELETE", "/v1/rooms/frozen/messages/2", json={"author": "tester"}
                    )
                    return r.status_code == 200

                await eventually(deleted, timeout=20)
        finally:
            inst.stop()


async def test_a_post_whose_statement_went_out_unanswered_may_be_stored_and_says_so(
    pg_url, redis_prefix
):
    """The insert reaches Postgres and commits, but its answer is held until after
    the post's deadline. The 503 does not say "nothing was stored": it says the
    outcome is unknown (``"outcome": "unknown"``) and that a retry with the same
    Idempotency-Key is safe; that retry returns the stored message (200, the same
    seq), never a second one. The same holds for a post without a key (grouped
    commits): it is in the history afterwards."""
    async with tcp_proxy(pg_url) as (proxy, db_url):
        inst = _db_instance(db_url, redis_prefix, DB_COMMAND_TIMEOUT="2")
        try:
            await inst.wait_ready()
            async with httpx.AsyncClient(base_url=inst.url, timeout=60) as http:
                assert (await post(http, inst.url, "lost", "before")).status_code == 201
                key = {"Idempotency-Key": "lost-answer"}
                proxy.hold_replies_after(b"keyed, answer lost")
                r = await post(http, inst.url, "lost", "keyed, answer lost", headers=key)
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "unavailable" and err["outcome"] == "unknown", err
                assert "nothing was stored" not in err["message"]
                assert "Idempotency-Key" in err["message"]
                proxy.restore()

                async def retried() -> httpx.Response | None:
                    r = await post(http, inst.url, "lost", "keyed, answer lost", headers=key)
                    return r if r.status_code < 500 else None

                again = await eventually(retried, timeout=20)
                assert again.status_code == 200, again.text
                assert again.json()["seq"] == 2 and again.json()["text"] == "keyed, answer lost"

                proxy.hold_replies_after(b"keyless, answer lost")
                r = await post(http, inst.url, "lost", "keyless, answer lost")
                assert r.status_code == 503, r.text
                assert r.json()["error"]["outcome"] == "unknown", r.text
                proxy.restore()

                async def page() -> list[str] | None:
                    r = await http.get("/v1/rooms/lost/messages", params={"after": 0})
                    texts = [m["text"] for m in r.json()["messages"]] if r.is_success else []
                    return texts if "keyless, answer lost" in texts else None

                texts = await eventually(page, timeout=20)
                assert texts == ["before", "keyed, answer lost", "keyless, answer lost"], texts
        finally:
            inst.stop()

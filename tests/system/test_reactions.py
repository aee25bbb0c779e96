"""Reactions on real gateways, on Postgres (with Redis) and on SQLite alone: a
user's own reaction added once or removed over HTTP and WebSocket, the summary on
the message (counts, at most ten users named), ``reactions_updated`` in the
ordered change stream (live on every instance, replayed once by a resume), a
deleted message refusing them, their own rate bucket, moderation and read-only
grants, and the ``message.reactions_updated`` webhook; and the ordering proof:
posts, replies (``thread_updated``), edits, deletes and reactions racing over three
instances, every subscriber (one resuming on another instance) seeing each once in
commit order."""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.harness import CHAT_SECRET as SECRET
from tests.harness import (
    Instance,
    SSEClient,
    WSClient,
    carried_in_order,
    eventually,
    instances,
    post,
    t,
)
from tests.harness import chat_bearer as token
from tests.system.test_webhooks import Receiver, hook_env, new_secret

KEY = "reactions-api-key"
THUMBS = "\N{THUMBS UP SIGN}"


def reactions_url(base: str, room: str, seq: int, reaction: str | None = None) -> str:
    url = f"{base}/v1/rooms/{room}/messages/{seq}/reactions"
    return url if reaction is None else f"{url}/{quote(reaction, safe='')}"


async def react(
    http: httpx.AsyncClient, base: str, room: str, seq: int, reaction: str, user: str
) -> httpx.Response:
    return await http.post(
        reactions_url(base, room, seq), json={"reaction": reaction, "user": user}
    )


async def unreact(
    http: httpx.AsyncClient, base: str, room: str, seq: int, reaction: str, user: str
) -> httpx.Response:
    return await http.delete(reactions_url(base, room, seq, reaction), params={"user": user})


def reactions_of(frames: list[dict[str, Any]], room: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == "reactions_updated" and f["room"] == room]


async def test_reactions_are_distinct_per_user_over_http_and_ws(any_env):
    room = "react.basic"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        assert (await post(http, gw.url, room, "hello", author="ana")).status_code == 201
        r = await react(http, gw.url, room, 1, THUMBS, "bo")
        assert r.status_code == 200, r.text
        assert r.json()["reactions"] == {THUMBS: {"count": 1, "users": ["bo"]}}
        assert "RateLimit-Remaining" in r.headers
        again = await react(http, gw.url, room, 1, f"  {THUMBS} ", "bo")  # trimmed: the same
        assert again.json()["reactions"] == r.json()["reactions"], "once per user"
        r = await react(http, gw.url, room, 1, "party", "cy")
        assert r.json()["reactions"] == {
            THUMBS: {"count": 1, "users": ["bo"]},
            "party": {"count": 1, "users": ["cy"]},
        }
        async with WSClient.connect(f"{gw.ws_url}?user=ana") as ws:
            await ws.send(
                {"type": "react", "room": room, "seq": 1, "reaction": THUMBS, "ref": "a1"}
            )
            ack = await ws.expect("ack")
            assert ack["ref"] == "a1"
            assert ack["message"]["reactions"][THUMBS] == {"count": 2, "users": ["bo", "ana"]}
            await ws.send(
                {"type": "unreact", "room": room, "seq": 1, "reaction": "party", "ref": "a2"}
            )
            ack = await ws.expect("ack")
            assert "party" in ack["message"]["reactions"], "ana never reacted with party"
            await ws.send({"type": "react", "room": room, "seq": 1, "reaction": "", "ref": 3})
            err = await ws.expect("error")
            assert (err["code"], err["ref"]) == ("invalid_request", 3)
        r = await unreact(http, gw.url, room, 1, "party", "cy")
        assert r.status_code == 200 and set(r.json()["reactions"]) == {THUMBS}
        r = await unreact(http, gw.url, room, 1, THUMBS, "bo")
        r = await unreact(http, gw.url, room, 1, THUMBS, "ana")
        assert r.status_code == 200 and "reactions" not in r.json(), "absent when none"
        # Bad input: 422 or 404, and nothing changes.
        for body in ({"reaction": ""}, {"reaction": "x" * 33}, {"reaction": "a\x00b"}, {}):
            r = await http.post(reactions_url(gw.url, room, 1), json={**body, "user": "bo"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", body
        r = await http.post(reactions_url(gw.url, room, 1), json={"reaction": THUMBS})
        assert r.status_code == 422 and "user is required" in r.json()["error"]["message"]
        r = await react(http, gw.url, room, 9, THUMBS, "bo")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert "reactions" not in page[0] and page[0].get("version", 1) == 1


async def test_the_summary_names_at_most_ten_users(any_env):
    room = "react.many"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "popular", author="ana")
        # The history page is cached before the reactions: it must not stay stale.
        assert (
            "reactions"
            not in (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"][0]
        )
        users = [f"user{i:02d}" for i in range(12)]
        for user in users:
            assert (await react(http, gw.url, room, 1, THUMBS, user)).status_code == 200
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert page[0]["reactions"] == {THUMBS: {"count": 12, "users": users[:10]}}
        await unreact(http, gw.url, room, 1, THUMBS, "user00")
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert page[0]["reactions"] == {THUMBS: {"count": 11, "users": users[1:11]}}


async def test_a_deleted_message_takes_no_reactions(any_env):
    room = "react.deleted"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "soon gone", author="ana")
        assert (await react(http, gw.url, room, 1, THUMBS, "bo")).status_code == 200
        r = await http.request(
            "DELETE", f"{gw.url}/v1/rooms/{room}/messages/1", json={"author": "ana"}
        )
        assert r.status_code == 200 and "reactions" not in r.json(), "the tombstone has none"
        r = await react(http, gw.url, room, 1, THUMBS, "cy")
        assert r.status_code == 409 and r.json()["error"]["code"] == "message_deleted"
        r = await unreact(http, gw.url, room, 1, THUMBS, "bo")
        assert r.status_code == 409 and r.json()["error"]["code"] == "message_deleted"
        async with WSClient.connect(f"{gw.ws_url}?user=cy") as ws:
            await ws.send({"type": "react", "room": room, "seq": 1, "reaction": "x", "ref": 1})
            assert (await ws.expect("error"))["code"] == "message_deleted"


async def test_reactions_have_their_own_rate_bucket(any_env):
    room = "react.rate"
    env = {**any_env, "REACTION_RATE_LIMIT": "3/60s"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "hi", author="ana")
        for reaction in ("a", "b", "c"):
            assert (await react(http, gw.url, room, 1, reaction, "bo")).status_code == 200
        r = await react(http, gw.url, room, 1, "d", "bo")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert "Retry-After" in r.headers
        assert (await post(http, gw.url, room, "posts still go", author="bo")).status_code == 201
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert set(page[0]["reactions"]) == {"a", "b", "c"}, "the refused one changed nothing"


async def test_muted_banned_and_read_only_users_cannot_react(any_env):
    room = "react.mod"
    env = {**any_env, "AUTH_SECRET": SECRET, "API_KEYS": KEY}
    api = {"Authorization": f"Bearer {KEY}"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        url = reactions_url(gw.url, room, 1)
        r = await http.post(
            f"{gw.url}/v1/rooms/{room}/messages", json={"text": "hi"}, headers=token("ana")
        )
        assert r.status_code == 201
        r = await http.post(url, json={"reaction": "ro"}, headers=token("ro", read_rooms=[room]))
        assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
        for action, user in (("mutes", "mu"), ("bans", "ba")):
            r = await http.post(
                f"{gw.url}/v1/rooms/{room}/{action}", json={"user": user}, headers=api
            )
            assert r.status_code == 201, r.text
        r = await http.post(url, json={"reaction": "m"}, headers=token("mu"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "muted"
        r = await http.post(url, json={"reaction": "b"}, headers=token("ba"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "banned"
        async with WSClient.connect(f"{gw.ws_url}?token={token('mu')['Authorization'][7:]}") as ws:
            await ws.send({"type": "react", "room": room, "seq": 1, "reaction": "m", "ref": 1})
            assert (await ws.expect("error"))["code"] == "muted"
        r = await http.post(url, json={"reaction": "ok"}, headers=token("bo"))
        assert r.status_code == 200 and r.json()["reactions"] == {
            "ok": {"count": 1, "users": ["bo"]}
        }, "only bo's went in; a token's sub is who reacts"


async def test_reactions_updated_reach_two_instances_in_order_and_a_resume_replays_once(
    gateway_env,
):
    room = "react.order"
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(a.ws_url) as wa,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?since=0&changes_since=0") as sse,
        ):
            await wa.subscribe(room, since=0, changes_since=0)
            task = asyncio.create_task(wa.read_all())
            await post(http, a.url, room, "m1", author="ana")
            assert (await react(http, b.url, room, 1, THUMBS, "bo")).status_code == 200  # c1
            r = await http.patch(
                f"{a.url}/v1/rooms/{room}/messages/1", json={"text": "m1 v2", "author": "ana"}
            )
            assert r.status_code == 200  # change 2
            await post(http, b.url, room, "m2", author="bo")
            assert (await react(http, a.url, room, 2, "ok", "ana")).status_code == 200  # c3
            assert (await unreact(http, b.url, room, 1, THUMBS, "bo")).status_code == 200  # c4
            expected = [
                ("message", 1),
                ("reactions_updated", 1),
                ("message_updated", 2),
                ("message", 2),
                ("reactions_updated", 3),
                ("reactions_updated", 4),
            ]

            await carried_in_order(wa, sse, room, expected, task)
            live = reactions_of(wa.frames, room)
            assert live[0] == {
                "type": "reactions_updated",
                "room": room,
                "change": 1,
                "seq": 1,
                "reactions": {THUMBS: {"count": 1, "users": ["bo"]}},
            }
            assert live[-1]["reactions"] == {} and live[-1]["seq"] == 1
            sse_change = [e for e in sse.events if e.get("event") == "reactions_updated"][0]
            assert sse_change["json"] == live[0]
        # A resume after change 1 replays changes 2..4 once each, in order.
        async with WSClient.connect(b.ws_url) as ws:
            subscribed = await ws.subscribe(room, since=2, changes_since=1)
            assert subscribed["change"] == 4
            while len([f for f in ws.frames if "change" in f and f["type"] != "subscribed"]) < 3:
                await ws.recv()
            with pytest.raises(asyncio.TimeoutError):
                await ws.recv(timeout=1)  # nothing more, nothing twice
            changes = [
                (f["type"], f["change"])
                for f in ws.frames
                if "change" in f and f["type"] != "subscribed"
            ]
            assert changes == [
                ("message_updated", 2),
                ("reactions_updated", 3),
                ("reactions_updated", 4),
            ]


async def test_reactions_send_a_webhook_scrubbed_with_the_message(any_env):
    open_ = False
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (200, {}, 0.0) if open_ else (500, {}, 0.0)
    ).start()
    gw = Instance(hook_env(any_env, receiver, WEBHOOK_BREAKER_FAILURES="100000")).start()
    room = "react.hooks"
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(timeout=t(20)) as http:
            await post(http, gw.url, room, "secret text", author="ana")
            r = await react(http, gw.url, room, 1, THUMBS, "bo")
            assert r.status_code == 200
            await react(http, gw.url, room, 1, THUMBS, "bo")  # there already: no event
            r = await http.request(
                "DELETE", f"{gw.url}/v1/rooms/{room}/messages/1", json={"author": "ana"}
            )
            deleted_at = r.json()["deleted_at"]
        await eventually(lambda: len(receiver.hits) >= 1, 20)
        open_ = True
        await eventually(lambda: len(receiver.delivered()) >= 3, 20)
        await asyncio.sleep(0.5)  # nothing more may come
        assert receiver.unverified == []
        got = [(h.payload["type"], h.payload["data"]) for h in receiver.delivered()]
        assert [kind for kind, _ in got] == [
            "message.created",
            "message.reactions_updated",
            "message.deleted",
        ]
        data = got[1][1]
        assert data["reactions"] == {THUMBS: {"count": 1, "users": ["bo"]}}
        assert (data["seq"], data["change"]) == (1, 1)
        assert (data["text"], data["deleted_at"]) == ("", deleted_at), "scrubbed by the delete"
    finally:
        gw.stop()
        await receiver.stop()


CHANGE_FRAMES = ("message_updated", "message_deleted", "reactions_updated", "thread_updated")


def stream_of(frames: list[dict[str, Any]], room: str) -> list[tuple[str, dict[str, Any]]]:
    """A WS subscriber's messages and changes of ``room``, as received."""
    return [
        (f["type"], f["message"] if f["type"] == "message" else f)
        for f in frames
        if f.get("room") == room and f.get("type") in ("message", *CHANGE_FRAMES)
    ]


def sse_stream(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e["event"], e["json"]) for e in events if e.get("event") in ("message", *CHANGE_FRAMES)
    ]


def replay(
    stream: list[tuple[str, dict[str, Any]]],
) -> tuple[dict[int, dict[str, Any]], list[tuple[str, int]]]:
    """A subscriber's view (each message with the changes it was sent applied in
    order) and its order: ("m", seq) and ("c", change) as received. A change must
    never come before its message."""
    view: dict[int, dict[str, Any]] = {}
    order: list[tuple[str, int]] = []
    for kind, body in stream:
        if kind == "message":
            view[body["seq"]] = body
            order.append(("m", body["seq"]))
            continue
        summary = {"reactions_updated": "reactions", "thread_updated": "thread"}.get(kind)
        seq = body["seq"] if summary else body["message"]["seq"]
        assert seq in view, f"change {body['change']} came before message {seq}"
        if summary:
            msg = {k: v for k, v in view[seq].items() if k != summary}
            if body[summary]:
                msg[summary] = body[summary]
            view[seq] = msg
        else:
            view[seq] = body["message"]
        order.append(("c", body["change"]))
    return view, order


async def test_posts_replies_edits_deletes_and_reactions_racing_keep_order_on_three_instances(
    gateway_env, pg_url
):
    """Posts, replies (each raising its parent's thread), edits, deletes and
    reactions (added and removed by several users) race on one room through three
    instances; a subscriber drops off halfway and resumes on another instance with
    ``since`` and ``changes_since``. Every subscriber sees each message and each
    change (``thread_updated`` among them) once, in the store's commit order (a
    change right after the message it was committed after), and ends with the
    store's state, each parent's ``thread`` summary included."""
    room = "react.race"
    posts = 45
    env = {**gateway_env, "REACTION_RATE_LIMIT": "100000/1s"}
    async with instances(3, env) as gws, httpx.AsyncClient(timeout=t(30)) as http:
        async with (
            WSClient.connect(gws[0].ws_url, max_queue=None) as ws0,
            WSClient.connect(gws[2].ws_url, max_queue=None) as ws2,
            SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events?changes_since=0") as sse1,
        ):
            for ws in (ws0, ws2):
                await ws.subscribe(room, since=0, changes_since=0)
            readers = [asyncio.create_task(ws.read_all()) for ws in (ws0, ws2)]
            acked: list[int] = []
            authors: dict[int, str] = {}
            half = asyncio.Event()
            done = asyncio.Event()
            statuses: dict[str, list[int]] = {"edit": [], "delete": [], "react": [], "reply": []}

            async def writer() -> None:
                for i in range(posts):
                    r = await post(http, gws[i % 3].url, room, f"post {i}", author=f"u{i % 3}")
                    assert r.status_code == 201, r.text
                    acked.append(r.json()["seq"])
                    authors[acked[-1]] = f"u{i % 3}"
                    if i + 1 == posts // 2:
                        half.set()

            async def replier(n: int) -> None:
                rnd = random.Random(200 + n)
                for j in range(12):
                    while len(acked) < 3 * (j + 1):
                        await asyncio.sleep(0.01)
                    parent = rnd.choice(acked[-10:])  # a reply among them: its parent's thread
                    r = await http.post(
                        f"{gws[rnd.randrange(3)].url}/v1/rooms/{room}/messages",
                        json={"text": f"reply {n}.{j}", "author": f"p{n}", "reply_to": parent},
                    )
                    statuses["reply"].append(r.status_code)
                    assert r.status_code in (201, 409), r.text  # 409: a deleted parent
                    if r.status_code == 201:
                        acked.append(r.json()["seq"])
                        authors[acked[-1]] = f"p{n}"

            async def editor(n: int) -> None:
                rnd = random.Random(n)
                for j in range(12):
                    while len(acked) < 3 * (j + 1):
                        await asyncio.sleep(0.01)
                    seq = rnd.choice(acked[-8:])
                    base = f"{gws[rnd.randrange(3)].url}/v1/rooms/{room}/messages/{seq}"
                    author = {"author": authors[seq]}
                    if rnd.random() < 0.2:
                        r = await http.request("DELETE", base, json=author)
                        statuses["delete"].append(r.status_code)
                    else:
                        r = await http.patch(base, json={"text": f"edit {n}.{j}", **author})
                        statuses["edit"].append(r.status_code)
                    assert r.status_code in (200, 404), r.text  # 404: an edit of a deleted one

            async def reactor(n: int) -> None:
                rnd = random.Random(100 + n)
                user = f"r{n}"
                mine: set[tuple[int, str]] = set()
                for j in range(20):
                    while len(acked) < 2 * (j + 1):
                        await asyncio.sleep(0.01)
                    key = (rnd.choice(acked[-8:]), rnd.choice((THUMBS, "ok", "tada")))
                    base = gws[rnd.randrange(3)].url
                    if key in mine:
                        r = await unreact(http, base, room, *key, user)
                    else:
                        r = await react(http, base, room, *key, user)
                    statuses["react"].append(r.status_code)
                    assert r.status_code in (200, 409), r.text  # 409: a deleted message
                    if r.status_code == 200:
                        mine.symmetric_difference_update({key})

            resumed: list[dict[str, Any]] = []

            async def resumer() -> None:
                async with WSClient.connect(gws[1].ws_url, max_queue=None) as first:
                    await first.subscribe(room, since=0, changes_since=0)
                    task = asyncio.create_task(first.read_all())
                    await half.wait()
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(first.frames)
                await asyncio.sleep(0.5)  # the race goes on meanwhile
                order = replay(stream_of(first.frames, room))[1]
                since = max((n for kind, n in order if kind == "m"), default=0)
                changes_since = max((n for kind, n in order if kind == "c"), default=0)
                async with WSClient.connect(gws[2].ws_url, max_queue=None) as second:
                    await second.subscribe(room, since=since, changes_since=changes_since)
                    task = asyncio.create_task(second.read_all())
                    await done.wait()
                    await eventually(lambda: complete(resumed + second.frames), 30)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(second.frames)

            expected: list[tuple[str, int]] = []

            def complete(frames: list[dict[str, Any]]) -> bool:
                return len(replay(stream_of(frames, room))[1]) >= len(expected) > 0

            resume_task = asyncio.create_task(resumer())
            await asyncio.gather(
                writer(),
                *(replier(n) for n in range(2)),
                *(editor(n) for n in range(2)),
                *(reactor(n) for n in range(4)),
            )
            page = (
                await http.get(f"{gws[0].url}/v1/rooms/{room}/messages", params={"limit": 200})
            ).json()
            final = {m["seq"]: m for m in page["messages"]}
            conn = await asyncpg.connect(pg_url)
            try:
                changes = await conn.fetch(
                    "SELECT change, after_seq, kind FROM message_changes WHERE room = $1", room
                )
            finally:
                await conn.close()
            expected.extend(
                e[0]
                for e in sorted(
                    [(("m", s), (s, 0, 0)) for s in sorted(authors)]
                    + [(("c", c["change"]), (c["after_seq"], 1, c["change"])) for c in changes],
                    key=lambda e: e[1],
                )
            )
            done.set()
            assert statuses["react"].count(200) >= 40, statuses
            assert 200 in statuses["edit"] and 200 in statuses["delete"], statuses
            assert statuses["reply"].count(201) >= 12, statuses
            assert sorted(final) == sorted(authors), "every acked message, and only those"
            assert any(m.get("reactions") for m in final.values()), "some reactions stayed"
            threads = {m["seq"]: m["thread"] for m in final.values() if m.get("thread")}
            replies = statuses["reply"].count(201)
            assert sum(th["replies"] for th in threads.values()) == replies, threads
            assert sum(c["kind"] == "thread" for c in changes) == replies, "one each"

            await eventually(lambda: complete(ws0.frames) and complete(ws2.frames), 30)
            await eventually(lambda: len(replay(sse_stream(sse1.events))[1]) >= len(expected), 30)
            await asyncio.wait_for(resume_task, t(60))
            await asyncio.sleep(0.5)  # nothing more may come
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for name, stream in (
                ("ws0", stream_of(ws0.frames, room)),
                ("sse1", sse_stream(sse1.events)),
                ("ws2", stream_of(ws2.frames, room)),
                ("resumed", stream_of(resumed, room)),
            ):
                view, order = replay(stream)
                assert order == expected, name
                assert view == final, name

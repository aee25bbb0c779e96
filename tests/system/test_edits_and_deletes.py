"""Edits and deletes on three real gateway processes: every subscriber's view (its
messages, with the changes it was sent applied in order) must equal the store's
final state, with contiguous seqs, through racing posts, lost publishes, a Redis
restart, an instance kill and a resume.

The other surfaces of chat have their own files: test_chat_store.py (the store's
and the cache's part), test_change_permissions.py, test_typing.py, test_read_state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from tests import harness
from tests.harness import SSEClient, WSClient, all_ready, eventually, instances, post

# -- the whole path on real gateways ------------------------------------------------


def view_of(
    events: list[tuple[str, dict[str, Any]]],
) -> tuple[dict[int, dict[str, Any]], list[int], list[int]]:
    """A subscriber's view: its messages with the changes it was sent applied in
    order, the seqs of its message frames and the numbers of its change frames.
    A change must never come before the message it changes."""
    view: dict[int, dict[str, Any]] = {}
    seqs: list[int] = []
    changes: list[int] = []
    for kind, body in events:
        if kind == "message":
            seqs.append(body["seq"])
            view[body["seq"]] = body
        elif kind in ("message_updated", "message_deleted"):
            msg = body["message"]
            assert msg["seq"] in view, f"change {body['change']} came before message {msg['seq']}"
            assert (kind == "message_deleted") == (msg.get("deleted_at") is not None)
            changes.append(body["change"])
            view[msg["seq"]] = msg
    return view, seqs, changes


def ws_events(frames: list[dict[str, Any]], room: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in frames:
        if f.get("room") != room:
            continue
        if f.get("type") == "message":
            out.append(("message", f["message"]))
        elif f.get("type") in ("message_updated", "message_deleted"):
            out.append((f["type"], f))
    return out


def sse_events(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e["event"], e["json"])
        for e in events
        if e.get("event") in ("message", "message_updated", "message_deleted")
    ]


async def test_edits_and_deletes_racing_posts_reach_every_subscriber_once_in_order(
    gateway_env, pg_url, redis_prefix
):
    room = "chat.race"
    posts = 60
    texts: dict[int, list[str]] = {}  # every text each seq ever had
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=30) as http:
        async with (
            WSClient.connect(gws[0].ws_url) as ws0,
            WSClient.connect(gws[2].ws_url) as ws2,
            SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events?changes_since=0") as sse1,
        ):
            assert (await ws0.subscribe(room, changes_since=0))["change"] == 0
            await ws2.subscribe(room)  # live changes only: the room is empty anyway
            readers = [asyncio.create_task(c.read_all()) for c in (ws0, ws2)]
            acked: list[int] = []
            half = asyncio.Event()

            async def writer() -> None:
                for i in range(posts):
                    text = f"post {i} secret-{i}"
                    r = await post(http, gws[i % 3].url, room, text, author=f"u{i % 3}")
                    assert r.status_code == 201, r.text
                    texts[r.json()["seq"]] = [text]
                    acked.append(r.json()["seq"])
                    if len(acked) == posts // 2:
                        half.set()

            async def editor(n: int) -> None:
                rnd = random.Random(n)
                for j in range(20):
                    while len(acked) < 3 * (j + 1):  # spread over the whole run of posts
                        await asyncio.sleep(0.01)
                    seq = rnd.choice(acked[-10:])
                    author = f"u{(seq - 1) % 3}"
                    base = f"{gws[rnd.randrange(3)].url}/v1/rooms/{room}/messages/{seq}"
                    if rnd.random() < 0.25:
                        r = await http.request("DELETE", base, json={"author": author})
                    else:
                        text = f"edit {n}.{j} secret-{seq}-{n}-{j}"
                        r = await http.patch(base, json={"text": text, "author": author})
                        if r.status_code == 200:
                            texts[seq].append(text)
                    assert r.status_code in (200, 404), r.text  # 404: an edit of a deleted one

            resumed: list[dict[str, Any]] = []
            first_in = asyncio.Event()  # the resumer's first socket holds the room

            async def resumer() -> None:
                # Holds the room from the start, drops off halfway, resumes elsewhere.
                async with WSClient.connect(gws[1].ws_url) as first:
                    await first.subscribe(room, changes_since=0)
                    first_in.set()
                    task = asyncio.create_task(first.read_all())
                    await half.wait()
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(first.frames)
                await asyncio.sleep(1)  # posts, edits and deletes go on meanwhile
                _, seqs, changes = view_of(ws_events(first.frames, room))
                since = seqs[-1] if seqs else 0
                async with WSClient.connect(gws[2].ws_url) as second:
                    await second.subscribe(
                        room, since=since, changes_since=changes[-1] if changes else 0
                    )
                    task = asyncio.create_task(second.read_all())
                    await done.wait()
                    await eventually(lambda: final_view(resumed + second.frames), timeout=30)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(second.frames)

            done = asyncio.Event()
            final: dict[int, dict[str, Any]] = {}

            def final_view(frames: list[dict[str, Any]]) -> bool:
                return done.is_set() and view_of(ws_events(frames, room))[0] == final

            resume_task = asyncio.create_task(resumer())
            # It holds the room before the first post: subscribed live after a post, it
            # would rightly get changes to a message it was never sent.
            await eventually(lambda: first_in.is_set() or resume_task.done())
            assert first_in.is_set(), resume_task.result()
            await asyncio.gather(writer(), *(editor(n) for n in range(3)))
            page = (
                await http.get(f"{gws[0].url}/v1/rooms/{room}/messages", params={"limit": 200})
            ).json()
            final.update({m["seq"]: m for m in page["messages"]})
            done.set()
            assert sorted(final) == list(range(1, posts + 1)), "seqs stay contiguous"
            deleted = [s for s, m in final.items() if m.get("deleted_at")]
            edited = [s for s, m in final.items() if m.get("edited_at") and not m.get("deleted_at")]
            assert deleted and edited, "the race edited and deleted something"
            for seq in deleted:
                assert final[seq]["text"] == "" and final[seq]["version"] >= 2
            # The same state from every instance right after the writes.
            for gw in gws[1:]:
                other = (
                    await http.get(f"{gw.url}/v1/rooms/{room}/messages", params={"limit": 200})
                ).json()["messages"]
                assert other == page["messages"]

            await eventually(lambda: view_of(ws_events(ws0.frames, room))[0] == final, 30)
            await eventually(lambda: view_of(sse_events(sse1.events))[0] == final, 30)
            await eventually(lambda: view_of(ws_events(ws2.frames, room))[0] == final, 30)
            await asyncio.wait_for(resume_task, harness.t(60))
            await asyncio.sleep(0.5)  # nothing more may come
            for name, events in (
                ("ws0", ws_events(ws0.frames, room)),
                ("sse1", sse_events(sse1.events)),
                ("ws2", ws_events(ws2.frames, room)),
                ("resumed", ws_events(resumed, room)),
            ):
                view, seqs, changes = view_of(events)
                assert view == final, name
                assert seqs == list(range(1, posts + 1)), f"{name}: {seqs}"
                assert changes == sorted(set(changes)), f"{name}: a change twice or out of order"
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            # The resumed subscriber got the changes it missed, not only messages.
            _, _, resumed_changes = view_of(ws_events(resumed, room))
            _, _, all_changes = view_of(ws_events(ws0.frames, room))
            assert all_changes == list(range(1, len(all_changes) + 1))
            assert set(resumed_changes) <= set(all_changes)

    gone = [text for seq in deleted for text in texts[seq]]
    conn = await asyncpg.connect(pg_url)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM messages WHERE text = ANY($1)", gone) == 0
        ), "deleted text is still in the store"
        assert await conn.fetchval(
            "SELECT count(*) FROM messages WHERE room = $1 AND deleted_at IS NOT NULL", room
        ) == len(deleted)
    finally:
        await conn.close()
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        cached = b""
        async for key in client.scan_iter(match=f"{redis_prefix}*"):
            kind = await client.type(key)
            if kind == b"string":
                cached += await client.get(key) or b""
            elif kind == b"hash":
                cached += b"".join((await client.hgetall(key)).values())
        assert b"post " in cached, "the reads above cached the room's window"
        assert not [text for text in gone if text.encode() in cached], (
            "deleted text is still in the history cache"
        )
    finally:
        await client.aclose()


async def test_changes_whose_publish_was_lost_are_filled_from_the_store(gateway_env):
    """Instance A commits changes but never publishes them (as if killed after each
    commit); changes alternate between A and B, so B's and C's subscribers see a gap in
    change numbers (gap fill) and a silent tail (the change position check)."""
    room = "chat.lost"
    env_a = {**gateway_env, "FAULT_SKIP_PUBLISH": "1"}
    async with (
        instances(1, env_a) as (a,),
        instances(2, gateway_env) as (b, c),
        httpx.AsyncClient(timeout=10) as http,
    ):
        for i in range(5):
            assert (await post(http, b.url, room, f"m{i}", author="ana")).status_code == 201
        async with (
            WSClient.connect(b.ws_url) as ws,
            SSEClient.open(f"{c.url}/v1/rooms/{room}/events?since=0") as sse,
        ):
            await ws.subscribe(room, since=0)
            task = asyncio.create_task(ws.read_all())
            for i in range(12):
                target = a if i % 2 == 0 or i >= 9 else b
                seq = i % 5 + 1
                url = f"{target.url}/v1/rooms/{room}/messages/{seq}"
                r = await http.patch(url, json={"text": f"edit {i}", "author": "ana"})
                assert r.status_code == 200, r.text
            final = {
                m["seq"]: m
                for m in (await http.get(f"{b.url}/v1/rooms/{room}/messages")).json()["messages"]
            }
            await eventually(lambda: len(view_of(ws_events(ws.frames, room))[2]) == 12, 20)
            await eventually(lambda: len(view_of(sse_events(sse.events))[2]) == 12, 20)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for events in (ws_events(ws.frames, room), sse_events(sse.events)):
                view, seqs, changes = view_of(events)
                assert changes == list(range(1, 13))
                assert view == final and seqs == [1, 2, 3, 4, 5]
            # A never published: what B delivered of it came from the store.
            fills = sum(
                [
                    await harness.metric(b.url, "chat_gap_fills_total", reason=reason)
                    for reason in ("change", "change_position")
                ]
            )
            assert fills >= 1


async def _posts_and_edits(
    http: httpx.AsyncClient, gws: list[harness.Instance], room: str, start: int, count: int
) -> None:
    """``count`` posts over the instances in turn, each followed by an edit of the
    message before it and, every third, a delete of the one before that."""
    for i in range(start, start + count):
        gw = gws[i % len(gws)]
        r = await post(http, gw.url, room, f"m{i}", author="ana")
        assert r.status_code == 201, r.text
        seq = r.json()["seq"]
        if seq > 1:
            r = await http.patch(
                f"{gw.url}/v1/rooms/{room}/messages/{seq - 1}",
                json={"text": f"m{i - 1} edited", "author": "ana"},
            )
            assert r.status_code in (200, 404), r.text
        if seq > 2 and i % 3 == 0:
            r = await http.request(
                "DELETE", f"{gw.url}/v1/rooms/{room}/messages/{seq - 2}", json={"author": "ana"}
            )
            assert r.status_code == 200, r.text
        await asyncio.sleep(0.01)


async def test_changes_survive_a_redis_restart_and_an_instance_kill(gateway_env):
    rs = harness.RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url, "BROKER_PROBE_INTERVAL": "0.5"}
    room = "chat.outage"
    try:
        async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
            async with contextlib.AsyncExitStack() as stack:
                wss = [await stack.enter_async_context(WSClient.connect(g.ws_url)) for g in gws[:2]]
                sses = [
                    await stack.enter_async_context(
                        SSEClient.open(f"{g.url}/v1/rooms/{room}/events?changes_since=0")
                    )
                    for g in gws[:2]
                ]
                for ws in wss:
                    await ws.subscribe(room, changes_since=0)
                readers = [asyncio.create_task(ws.read_all()) for ws in wss]
                victim_frames: list[dict[str, Any]] = []
                async with WSClient.connect(gws[2].ws_url) as victim:
                    await victim.subscribe(room, changes_since=0)
                    victim_reader = asyncio.create_task(victim.read_all())
                    await _posts_and_edits(http, gws, room, 0, 12)
                    rs.stop()
                    await _posts_and_edits(http, gws, room, 12, 12)  # committed meanwhile
                    rs.start()
                    await eventually(lambda: all_ready(http, gws), timeout=15)
                    await _posts_and_edits(http, gws, room, 24, 6)
                    gws[2].kill()
                    await asyncio.wait_for(victim_reader, harness.t(10))
                    victim_frames = list(victim.frames)
                # The victim resumes on another instance from what it had.
                _, seqs, changes = view_of(ws_events(victim_frames, room))
                async with WSClient.connect(gws[1].ws_url) as resumed:
                    await resumed.subscribe(
                        room,
                        since=seqs[-1] if seqs else 0,
                        changes_since=changes[-1] if changes else 0,
                    )
                    resumed_reader = asyncio.create_task(resumed.read_all())
                    await _posts_and_edits(http, gws[:2], room, 30, 6)
                    page = (await http.get(f"{gws[0].url}/v1/rooms/{room}/messages")).json()
                    final = {m["seq"]: m for m in page["messages"]}
                    assert sorted(final) == list(range(1, 37))
                    other = (await http.get(f"{gws[1].url}/v1/rooms/{room}/messages")).json()
                    assert other == page, "a stale page after the outage"

                    def converged() -> bool:
                        views = [view_of(ws_events(ws.frames, room))[0] for ws in wss]
                        views += [view_of(sse_events(s.events))[0] for s in sses]
                        views.append(view_of(ws_events(victim_frames + resumed.frames, room))[0])
                        return all(v == final for v in views)

                    await eventually(converged, timeout=30)
                    await asyncio.sleep(0.5)
                    resumed_reader.cancel()
                    await asyncio.gather(resumed_reader, return_exceptions=True)
                    streams = [ws_events(ws.frames, room) for ws in wss]
                    streams += [sse_events(s.events) for s in sses]
                    streams.append(ws_events(victim_frames + resumed.frames, room))
                    for events in streams:
                        view, seqs, changes = view_of(events)
                        assert view == final and seqs == list(range(1, 37))
                        assert changes == sorted(set(changes))
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
    finally:
        rs.stop()


async def test_a_resume_interleaves_missed_changes_in_commit_order(gateway_env):
    room = "chat.resume"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"

        async def edit(seq: int, text: str | None) -> None:
            if text is None:
                r = await http.request("DELETE", f"{url}/{seq}", json={"author": "ana"})
            else:
                r = await http.patch(f"{url}/{seq}", json={"text": text, "author": "ana"})
            assert r.status_code == 200, r.text

        await post(http, gw.url, room, "m1", author="ana")
        await post(http, gw.url, room, "m2", author="ana")
        await edit(1, "m1 v2")  # change 1, after message 2
        await post(http, gw.url, room, "m3", author="ana")
        await edit(2, "m2 v2")  # change 2, after message 3
        await edit(1, None)  # change 3, after message 3
        await post(http, gw.url, room, "m4", author="ana")
        await edit(4, "m4 v2")  # change 4, after message 4
        expected = [
            ("message", 2, "m2 v2"),
            ("message", 3, "m3"),
            ("message_updated", 2, "m2 v2"),
            ("message_deleted", 1, ""),
            ("message", 4, "m4 v2"),
            ("message_updated", 4, "m4 v2"),
        ]

        def summary(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int, str]]:
            return [
                (
                    kind,
                    (body if kind == "message" else body["message"])["seq"],
                    (body if kind == "message" else body["message"])["text"],
                )
                for kind, body in events
            ]

        # Holding message 1 and change 1: the rest, each change after the messages
        # committed before it (replayed messages already show their current text).
        async with WSClient.connect(gw.ws_url) as ws:
            subscribed = await ws.subscribe(room, since=1, changes_since=1)
            assert (subscribed["seq"], subscribed["change"]) == (4, 4)
            while len(ws_events(ws.frames, room)) < len(expected):
                await ws.recv()
            assert summary(ws_events(ws.frames, room)) == expected
            assert [
                f["change"] for f in ws.frames if "change" in f and f["type"] != "subscribed"
            ] == [2, 3, 4]
        async with SSEClient.open(
            f"{url[: -len('/messages')]}/events?changes_since=1", headers={"Last-Event-ID": "1"}
        ) as sse:
            await eventually(lambda: len(sse_events(sse.events)) >= len(expected))
            assert summary(sse_events(sse.events)) == expected
            assert [e.get("id") for e in sse.events if e.get("event") != "presence"] == [
                "2",
                "3",
                None,
                None,
                "4",
                None,
            ], "change events carry no id"


def commit_order(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int]]:
    """A subscriber's frames as ("m", seq) and ("c", change), in the order received."""
    return [
        ("m", body["seq"]) if kind == "message" else ("c", body["change"]) for kind, body in events
    ]


async def test_messages_and_changes_reach_subscribers_in_commit_order(gateway_env, pg_url):
    """Posts and edits interleave on one room through three instances, one of which
    never publishes (as if killed after each commit): a message committed right
    after a change must not overtake it, whether the change arrives live or only
    from the store. Every subscriber's frames follow the store's commit order."""
    room = "chat.order"
    rounds = 12
    env_a = {**gateway_env, "FAULT_SKIP_PUBLISH": "1"}
    async with (
        instances(1, env_a) as (a,),
        instances(2, gateway_env) as (b, c),
        httpx.AsyncClient(timeout=30) as http,
    ):
        assert (await post(http, b.url, room, "m0", author="ana")).status_code == 201
        latest = 1

        async def edit(gw: harness.Instance, seq: int, text: str) -> None:
            r = await http.patch(
                f"{gw.url}/v1/rooms/{room}/messages/{seq}", json={"text": text, "author": "ana"}
            )
            assert r.status_code == 200, r.text

        async def posted(gw: harness.Instance, text: str) -> int:
            r = await post(http, gw.url, room, text, author="ana")
            assert r.status_code == 201, r.text
            return int(r.json()["seq"])

        async with (
            WSClient.connect(c.ws_url) as ws,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?since=0&changes_since=0") as sse,
        ):
            await ws.subscribe(room, since=0, changes_since=0)
            task = asyncio.create_task(ws.read_all())
            for i in range(rounds):
                # A change that reaches no one live, then a post that does.
                await edit(a, latest, f"edit {i} by a")
                latest = max(latest, await posted(b, f"m{i} after a's edit"))
                # A change and posts racing for the room's lock.
                seqs = await asyncio.gather(
                    edit(b, latest, f"edit {i} by b"),
                    posted(c, f"m{i} racing c"),
                    posted(b, f"m{i} racing b"),
                )
                latest = max(latest, *(s for s in seqs if s is not None))
            conn = await asyncpg.connect(pg_url)
            try:
                changes = await conn.fetch(
                    "SELECT change, after_seq FROM message_changes WHERE room = $1", room
                )
            finally:
                await conn.close()
            assert len(changes) == 2 * rounds
            expected = sorted(
                [(("m", s), (s, 0, 0)) for s in range(1, latest + 1)]
                + [(("c", r["change"]), (r["after_seq"], 1, r["change"])) for r in changes],
                key=lambda e: e[1],
            )
            order = [e[0] for e in expected]
            await eventually(
                lambda: len(commit_order(ws_events(ws.frames, room))) >= len(order), 30
            )
            await eventually(lambda: len(commit_order(sse_events(sse.events))) >= len(order), 30)
            await asyncio.sleep(0.5)  # nothing more may come
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert commit_order(ws_events(ws.frames, room)) == order
            assert commit_order(sse_events(sse.events)) == order

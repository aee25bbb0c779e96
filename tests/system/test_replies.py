"""Replies on real gateways, on Postgres (with Redis) and on SQLite alone: a post's
``reply_to`` over HTTP and WebSocket, the parent's ``thread`` summary, the
``thread_updated`` change in the ordered change stream (live on every instance,
replayed once by a resume), the replies route with its pages, refusals (no such
parent, a deleted one), and a deleted reply keeping its place in the thread."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.harness import (
    SSEClient,
    WSClient,
    carried_in_order,
    instances,
    post,
    t,
)


async def reply(
    http: httpx.AsyncClient, base: str, room: str, parent: int, text: str, author: str = "bo"
) -> httpx.Response:
    return await http.post(
        f"{base}/v1/rooms/{room}/messages",
        json={"text": text, "author": author, "reply_to": parent},
    )


def history_of(http: httpx.AsyncClient, base: str, room: str) -> Any:
    return http.get(f"{base}/v1/rooms/{room}/messages")


async def test_a_reply_is_a_message_and_its_parent_carries_the_thread(any_env):
    room = "replies.basic"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        assert (await post(http, gw.url, room, "parent", author="ana")).status_code == 201
        # History read (and cached) before the reply: it must not stay stale.
        first = (await history_of(http, gw.url, room)).json()["messages"]
        assert "thread" not in first[0] and "reply_to" not in first[0]
        r = await reply(http, gw.url, room, 1, "first answer")
        assert r.status_code == 201, r.text
        child = r.json()
        assert (child["seq"], child["reply_to"], child["text"]) == (2, 1, "first answer")
        assert "thread" not in child
        await post(http, gw.url, room, "unrelated", author="cy")  # seq 3
        r = await reply(http, gw.url, room, 1, "second answer", author="cy")
        assert r.json()["seq"] == 4
        page = (await history_of(http, gw.url, room)).json()["messages"]
        assert [m["seq"] for m in page] == [1, 2, 3, 4], "replies are in the room's history"
        thread = page[0]["thread"]
        assert (thread["replies"], thread["last_seq"]) == (2, 4)
        assert thread["last_at"] == r.json()["created_at"]
        assert page[1]["reply_to"] == 1 and "reply_to" not in page[2]
        # A reply to a reply is a reply to that message: its own thread.
        r = await reply(http, gw.url, room, 2, "nested")
        assert r.status_code == 201 and r.json()["reply_to"] == 2
        page = (await history_of(http, gw.url, room)).json()["messages"]
        assert page[1]["thread"]["replies"] == 1 and page[0]["thread"]["replies"] == 2


async def test_replies_come_in_pages_with_a_next_cursor(any_env):
    room = "replies.pages"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "parent", author="ana")
        for i in range(5):
            assert (await reply(http, gw.url, room, 1, f"r{i}")).status_code == 201
            await post(http, gw.url, room, f"noise{i}", author="cy")
        url = f"{gw.url}/v1/rooms/{room}/messages/1/replies"
        r = await http.get(url, params={"limit": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [m["text"] for m in body["messages"]] == ["r0", "r1"]
        assert body["has_more"] is True and body["next"] == body["messages"][-1]["seq"]
        seen = [m["text"] for m in body["messages"]]
        while body["has_more"]:
            body = (await http.get(url, params={"limit": 2, "after": body["next"]})).json()
            seen += [m["text"] for m in body["messages"]]
        assert seen == ["r0", "r1", "r2", "r3", "r4"]
        assert body["next"] is None
        r = await http.get(f"{gw.url}/v1/rooms/{room}/messages/2/replies")
        assert r.json() == {"messages": [], "has_more": False, "next": None}
        r = await http.get(f"{gw.url}/v1/rooms/{room}/messages/99/replies")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.get(url, params={"limit": 0})
        assert r.status_code == 422
        r = await http.get(url, params={"x": 1})
        assert r.status_code == 422


async def test_a_reply_needs_a_live_parent_in_the_same_room(any_env):
    room = "replies.refused"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "parent", author="ana")
        await post(http, gw.url, "replies.other", "elsewhere", author="ana")
        r = await reply(http, gw.url, room, 7, "to nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await reply(http, gw.url, "replies.empty", 1, "to an empty room")
        assert r.status_code == 404
        for bad in (0, -1, "1", True, 1.5, None):
            r = await http.post(
                f"{gw.url}/v1/rooms/{room}/messages",
                json={"text": "x", "author": "bo", "reply_to": bad},
            )
            assert r.status_code == 422, bad
            assert r.json()["error"]["field"] == "reply_to"
        last = (await history_of(http, gw.url, room)).json()["messages"][-1]["seq"]
        r = await http.request(
            "DELETE", f"{gw.url}/v1/rooms/{room}/messages/1", json={"author": "ana"}
        )
        assert r.status_code == 200
        r = await reply(http, gw.url, room, 1, "to a tombstone")
        assert r.status_code == 409 and r.json()["error"]["code"] == "message_deleted"
        # The deleted parent's replies are gone with it, as the fuzzer expects of a
        # deleted resource.
        r = await http.get(f"{gw.url}/v1/rooms/{room}/messages/1/replies")
        assert r.status_code == 404
        async with WSClient.connect(f"{gw.ws_url}?user=bo") as ws:
            await ws.send({"type": "publish", "room": room, "text": "x", "reply_to": 1, "ref": "d"})
            err = await ws.expect("error")
            assert (err["code"], err["ref"]) == ("message_deleted", "d")
            await ws.send(
                {"type": "publish", "room": room, "text": "x", "reply_to": 77, "ref": "n"}
            )
            assert (await ws.expect("error"))["code"] == "not_found"
            await ws.send(
                {"type": "publish", "room": room, "text": "x", "reply_to": "1", "ref": "s"}
            )
            assert (await ws.expect("error"))["code"] == "invalid_request"
        page = (await history_of(http, gw.url, room)).json()["messages"]
        assert page[-1]["seq"] == last, "nothing refused was stored"


async def test_a_deleted_reply_keeps_its_place_in_the_thread_without_its_text(any_env):
    room = "replies.deleted"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "parent", author="ana")
        await reply(http, gw.url, room, 1, "secret reply", author="bo")
        await reply(http, gw.url, room, 1, "kept reply", author="cy")
        r = await http.request(
            "DELETE", f"{gw.url}/v1/rooms/{room}/messages/2", json={"author": "bo"}
        )
        assert r.status_code == 200
        body = (await http.get(f"{gw.url}/v1/rooms/{room}/messages/1/replies")).json()
        assert [m["seq"] for m in body["messages"]] == [2, 3]
        gone = body["messages"][0]
        assert gone["text"] == "" and gone["deleted_at"] and gone["reply_to"] == 1
        assert "secret reply" not in (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).text
        parent = (await history_of(http, gw.url, room)).json()["messages"][0]
        assert parent["thread"]["replies"] == 2, "a tombstone keeps its place"


async def test_a_ws_publish_replies_and_acks_with_reply_to(any_env):
    room = "replies.ws"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "parent", author="ana")
        async with WSClient.connect(f"{gw.ws_url}?user=bo") as ws:
            await ws.subscribe(room, since=1, changes_since=0)
            # plain posts around the reply: the reply keeps its place in the order
            for ref, extra in (("a", {}), ("b", {"reply_to": 1}), ("c", {})):
                await ws.send({"type": "publish", "room": room, "text": ref, "ref": ref, **extra})
            acks = [await ws.expect("ack") for _ in range(3)]
            assert [a["ref"] for a in acks] == ["a", "b", "c"]
            assert [a["message"]["seq"] for a in acks] == [2, 3, 4]
            assert acks[1]["message"]["reply_to"] == 1 and "reply_to" not in acks[0]["message"]
            while not [f for f in ws.frames if f["type"] == "thread_updated"]:
                await ws.recv()
            got = [f for f in ws.frames if f["type"] == "thread_updated"][0]
            assert got == {
                "type": "thread_updated",
                "room": room,
                "change": 1,
                "seq": 1,
                "thread": {
                    "replies": 1,
                    "last_seq": 3,
                    "last_at": acks[1]["message"]["created_at"],
                },
            }


async def test_thread_updated_reaches_two_instances_in_order_and_a_resume_replays_once(
    gateway_env,
):
    room = "replies.order"
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(a.ws_url) as wa,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?since=0&changes_since=0") as sse,
        ):
            await wa.subscribe(room, since=0, changes_since=0)
            task = asyncio.create_task(wa.read_all())
            await post(http, a.url, room, "m1", author="ana")
            assert (await reply(http, b.url, room, 1, "r1")).status_code == 201  # seq 2, c1
            r = await http.patch(
                f"{a.url}/v1/rooms/{room}/messages/1", json={"text": "m1 v2", "author": "ana"}
            )
            assert r.status_code == 200  # change 2
            assert (await reply(http, a.url, room, 1, "r2")).status_code == 201  # seq 3, c3
            expected = [
                ("message", 1),
                ("message", 2),
                ("thread_updated", 1),
                ("message_updated", 2),
                ("message", 3),
                ("thread_updated", 3),
            ]

            await carried_in_order(wa, sse, room, expected, task)
            live = [f for f in wa.frames if f.get("type") == "thread_updated"]
            assert live[0]["thread"]["replies"] == 1 and live[0]["thread"]["last_seq"] == 2
            assert live[1]["thread"]["replies"] == 2 and live[1]["thread"]["last_seq"] == 3
            updated = [f for f in wa.frames if f.get("type") == "message_updated"][0]
            assert updated["message"]["thread"]["replies"] >= 1, "an edit keeps the thread"
            sse_change = [e for e in sse.events if e.get("event") == "thread_updated"][0]
            assert sse_change["json"]["type"] == "thread_updated"
            assert sse_change["json"]["seq"] == 1
        # A resume after change 1 replays changes 2 and 3 once each, in order.
        async with WSClient.connect(b.ws_url) as ws:
            subscribed = await ws.subscribe(room, since=3, changes_since=1)
            assert subscribed["change"] == 3
            while len([f for f in ws.frames if "change" in f and f["type"] != "subscribed"]) < 2:
                await ws.recv()
            with pytest.raises(asyncio.TimeoutError):
                await ws.recv(timeout=1)  # nothing more, nothing twice
            changes = [
                (f["type"], f["change"])
                for f in ws.frames
                if "change" in f and f["type"] != "subscribed"
            ]
            assert changes == [("message_updated", 2), ("thread_updated", 3)]
            last = [f for f in ws.frames if f["type"] == "thread_updated"][0]
            assert last["thread"]["replies"] == 2


async def test_an_idempotent_reply_repeated_adds_no_second_reply(any_env):
    room = "replies.idem"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, "parent", author="ana")
        for expected in (201, 200):
            r = await http.post(
                f"{gw.url}/v1/rooms/{room}/messages",
                json={"text": "once", "author": "bo", "reply_to": 1},
                headers={"Idempotency-Key": "k1"},
            )
            assert r.status_code == expected and r.json()["seq"] == 2
        parent = (await history_of(http, gw.url, room)).json()["messages"][0]
        assert parent["thread"]["replies"] == 1

"""Mentions on real gateways, on Postgres (with Redis) and on SQLite alone: a
post's ``mentions`` validated and deduplicated over HTTP and WebSocket, carried by
the message, counted per room as the caller's unread mentions in the read routes
(dropping once read, never counting a deleted message or the caller's own; a room
never marked read listed when it holds unread mentions), and
carried by the ``message.created`` webhook."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt

from tests.harness import CHAT_SECRET as SECRET
from tests.harness import Instance, WSClient, eventually, instances, t
from tests.harness import chat_bearer as token
from tests.system.test_webhooks import Receiver, hook_env, new_secret


async def say(
    http: httpx.AsyncClient, base: str, room: str, text: str, author: str, mentions: Any
) -> httpx.Response:
    return await http.post(
        f"{base}/v1/rooms/{room}/messages",
        json={"text": text, "author": author, "mentions": mentions},
    )


def counts(body: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {p["room"]: (p["unread"], p["mentions"]) for p in body["rooms"]}


async def test_mentions_are_checked_kept_once_and_carried_by_the_message(any_env):
    room = "mentions.basic"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        r = await say(http, gw.url, room, "hi both", "ana", ["bob", "cy", "bob"])
        assert r.status_code == 201, r.text
        assert r.json()["mentions"] == ["bob", "cy"]
        r = await say(http, gw.url, room, "nobody", "ana", [])
        assert r.status_code == 201 and "mentions" not in r.json()
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert page[0]["mentions"] == ["bob", "cy"] and "mentions" not in page[1]
        for bad in (
            [f"user{i}" for i in range(51)],
            [""],
            ["   "],
            ["a\x00b"],
            ["x" * 129],
            [1],
            "bob",
            {"bob": 1},
            None,
        ):
            r = await say(http, gw.url, room, "refused", "ana", bad)
            assert r.status_code == 422, bad
            assert r.json()["error"]["field"] == "mentions"
        r = await say(http, gw.url, room, "fifty", "ana", [f"user{i}" for i in range(50)])
        assert r.status_code == 201 and len(r.json()["mentions"]) == 50
        async with WSClient.connect(f"{gw.ws_url}?user=ana") as ws:
            await ws.send(
                {"type": "publish", "room": room, "text": "ws", "mentions": ["cy", "cy"], "ref": 1}
            )
            ack = await ws.expect("ack")
            assert ack["message"]["mentions"] == ["cy"]
            await ws.send(
                {"type": "publish", "room": room, "text": "ws", "mentions": [""], "ref": 2}
            )
            err = await ws.expect("error")
            assert (err["code"], err["field"], err["ref"]) == ("invalid_request", "mentions", 2)
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert [m["text"] for m in page] == ["hi both", "nobody", "fifty", "ws"], "none refused"


async def test_unread_mentions_count_per_room_and_drop_once_read(any_env):
    room, other = "mentions.read", "mentions.other"
    env = {**any_env, "AUTH_SECRET": SECRET}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:

        async def post_as(user: str, where: str, text: str, mentions: list[str]) -> int:
            r = await http.post(
                f"{gw.url}/v1/rooms/{where}/messages",
                json={"text": text, "mentions": mentions},
                headers=token(user),
            )
            assert r.status_code == 201, r.text
            return int(r.json()["seq"])

        await post_as("ana", room, "before", ["bob"])  # 1
        await post_as("ana", other, "there", ["cy"])  # other room, 1
        for where in (room, other):
            r = await http.post(
                f"{gw.url}/v1/rooms/{where}/read", json={"seq": 1}, headers=token("bob")
            )
            assert r.status_code == 200 and r.json()["mentions"] == 0, "read: nothing unread"
        await post_as("ana", room, "hey bob", ["bob"])  # 2: counts
        await post_as("ana", room, "hey cy", ["cy"])  # 3: not bob
        await post_as("bob", room, "me, myself", ["bob"])  # 4: his own: never counts
        gone = await post_as("cy", room, "bob, soon deleted", ["bob", "cy"])  # 5
        await post_as("cy", room, "bob again", ["bob"])  # 6: counts
        await post_as("ana", other, "bob elsewhere", ["bob"])  # other 2: counts there
        r = await http.get(f"{gw.url}/v1/read", headers=token("bob"))
        assert counts(r.json()) == {room: (5, 3), other: (1, 1)}
        r = await http.request(
            "DELETE", f"{gw.url}/v1/rooms/{room}/messages/{gone}", headers=token("cy")
        )
        assert r.status_code == 200
        r = await http.get(f"{gw.url}/v1/read", headers=token("bob"))
        assert counts(r.json()) == {room: (5, 2), other: (1, 1)}, "a deleted one no longer"
        r = await http.get(f"{gw.url}/v1/rooms/{room}/read", headers=token("bob"))
        assert r.json()["mentions"] == 2
        r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 2}, headers=token("bob"))
        assert r.json() == {"room": room, "seq": 2, "unread": 4, "mentions": 1}
        r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 6}, headers=token("bob"))
        assert r.json()["mentions"] == 0
        r = await http.get(f"{gw.url}/v1/read", headers=token("bob"))
        assert counts(r.json()) == {room: (0, 0), other: (1, 1)}
        r = await http.get(f"{gw.url}/v1/read", headers=token("cy"))
        # no read position anywhere: listed where mentioned (3 in room, 1 in other)
        assert counts(r.json()) == {room: (6, 1), other: (2, 1)}


async def test_mentions_in_open_mode_are_counted_for_the_user_named(any_env):
    room = "mentions.open"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await say(http, gw.url, room, "first", "ana", [])
        await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 1, "user": "bob"})
        await say(http, gw.url, room, "bob!", "ana", ["bob"])
        r = await http.get(f"{gw.url}/v1/read", params={"user": "bob"})
        assert counts(r.json()) == {room: (1, 1)}
        r = await http.get(f"{gw.url}/v1/read", params={"user": "ana"})
        assert counts(r.json()) == {}


async def test_message_created_webhooks_carry_mentions(any_env):
    receiver = await Receiver([new_secret()]).start()
    gw = Instance(hook_env(any_env, receiver)).start()
    room = "mentions.hooks"
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(timeout=t(20)) as http:
            assert (await say(http, gw.url, room, "hi", "ana", ["bob", "bob"])).status_code == 201
            r = await http.post(
                f"{gw.url}/v1/rooms/{room}/messages", json={"text": "plain", "author": "ana"}
            )
            assert r.status_code == 201
        await eventually(lambda: len(receiver.delivered()) >= 2, 20)
        await asyncio.sleep(0.3)
        got = [h.payload for h in receiver.delivered()]
        assert [p["type"] for p in got] == ["message.created", "message.created"]
        assert got[0]["data"]["mentions"] == ["bob"] and got[0]["data"]["text"] == "hi"
        assert "mentions" not in got[1]["data"]
    finally:
        gw.stop()
        await receiver.stop()


async def test_a_room_never_marked_read_is_listed_while_it_holds_unread_mentions(any_env):
    quiet, mentioned, hidden = "mentions.quiet", "mentions.never", "secret.never"
    env = {**any_env, "AUTH_SECRET": SECRET}
    granted = jwt.encode(
        {"sub": "bob", "exp": int(time.time()) + 600, "rooms": ["mentions.*"]},
        SECRET,
        algorithm="HS256",
    )
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:

        async def post_as(user: str, where: str, mentions: list[str]) -> int:
            r = await http.post(
                f"{gw.url}/v1/rooms/{where}/messages",
                json={"text": "hi", "mentions": mentions},
                headers=token(user),
            )
            assert r.status_code == 201, r.text
            return int(r.json()["seq"])

        async def listed(headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
            r = await http.get(f"{gw.url}/v1/read", headers=headers or token("bob"))
            assert r.status_code == 200, r.text
            return list(r.json()["rooms"])

        await post_as("ana", quiet, ["cy"])  # bob not mentioned: not listed
        await post_as("bob", quiet, ["bob"])  # his own mention: not listed
        await post_as("ana", mentioned, [])  # 1
        first = await post_as("ana", mentioned, ["bob"])  # 2
        await post_as("cy", mentioned, ["bob", "ana"])  # 3
        await post_as("ana", hidden, ["bob"])
        assert await listed() == [
            {"room": mentioned, "seq": 0, "unread": 3, "mentions": 2},
            {"room": hidden, "seq": 0, "unread": 1, "mentions": 1},
        ]
        auth = {"Authorization": f"Bearer {granted}"}
        assert [p["room"] for p in await listed(auth)] == [mentioned], "only granted rooms"
        # a deleted mention no longer counts; with none left the room is not listed
        r = await http.delete(f"{gw.url}/v1/rooms/{hidden}/messages/1", headers=token("ana"))
        assert r.status_code == 200, r.text
        assert [p["room"] for p in await listed()] == [mentioned]
        # marked read: a position as before, listed with no mention left
        r = await http.post(
            f"{gw.url}/v1/rooms/{mentioned}/read", json={"seq": first}, headers=token("bob")
        )
        assert r.json() == {"room": mentioned, "seq": 2, "unread": 1, "mentions": 1}
        r = await http.post(
            f"{gw.url}/v1/rooms/{mentioned}/read", json={"seq": 3}, headers=token("bob")
        )
        assert await listed() == [{"room": mentioned, "seq": 3, "unread": 0, "mentions": 0}]

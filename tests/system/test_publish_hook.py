"""The publish hook (PUBLISH_HOOK_URL) against a real HTTP receiver and real gateways.

The receiver is the webhook tests' (a small HTTP/1.1 server on a loopback port
that verifies every request with the ``standardwebhooks`` package); here it
answers each post by its room and text: accept, reject, modify, stall, fail,
or talk nonsense.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from tests.harness import Instance, WSClient, eventually, metric, post, t
from tests.system.test_webhooks import Answer, Hit, Receiver, new_secret

KEY = "backend-key-for-tests"
REASON = "no swearing in the lobby"


def verdict(hit: Hit) -> bytes:
    """Reject texts with "darn", shout texts with "shout", accept the rest; the
    rooms of the failure tests answer badly, each in its own way."""
    room, text = hit.payload["room"], hit.payload["text"]
    if room == "junk":
        return b"<html>not json</html>"
    if room == "huge":
        return orjson.dumps({"action": "accept", "pad": "x" * 70_000})
    if room == "unknown":
        return b'{"action": "maybe"}'
    if room == "badtext":
        return b'{"action": "modify", "text": "   "}'
    if "darn" in text:
        return orjson.dumps({"action": "reject", "reason": REASON})
    if "shout" in text:
        return orjson.dumps({"action": "modify", "text": text.upper()})
    return b'{"action": "accept"}'


def behaviour(hit: Hit) -> Answer:
    room = hit.payload["room"]
    if room == "stall":
        return 200, {"content-type": "application/json"}, t(30)
    if room == "err":
        return 500, {}, 0.0
    return 200, {"content-type": "application/json"}, 0.0


def hook_env(base: dict[str, str], receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        **base,
        "PUBLISH_HOOK_URL": receiver.url,
        "WEBHOOK_SECRET": receiver.secrets[0],
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "API_KEYS": KEY,
        **extra,
    }


def hits_in(receiver: Receiver, room: str) -> list[dict[str, Any]]:
    return [h.payload for h in receiver.hits if h.payload["room"] == room]


async def texts(http: httpx.AsyncClient, base: str, room: str) -> list[str]:
    r = await http.get(f"{base}/v1/rooms/{room}/messages")
    assert r.status_code == 200, r.text
    return [m["text"] for m in r.json()["messages"]]


async def test_accept_reject_and_modify_posts_and_edits(gateway_env, tmp_path: Path) -> None:
    spaces = tmp_path / "namespaces.toml"
    spaces.write_text("[namespaces.free]\npublish_hook = false\n")
    receiver = await Receiver([new_secret()], reply=verdict).start()
    gw = Instance(hook_env(gateway_env, receiver, NAMESPACES_FILE=str(spaces))).start()
    try:
        await gw.wait_ready()
        async with (
            httpx.AsyncClient(timeout=t(20)) as http,
            WSClient.connect(gw.ws_url) as watcher,
            WSClient.connect(gw.ws_url) as writer,
        ):
            await watcher.subscribe("lobby")
            # accept: stored as given, the hook told who posts what where
            r = await post(http, gw.url, "lobby", "hello", author="ann")
            assert r.status_code == 201, r.text
            assert hits_in(receiver, "lobby") == [
                {"type": "message.publish", "room": "lobby", "author": "ann", "text": "hello"}
            ]
            # reject: 403 with the backend's reason, nothing stored
            r = await post(http, gw.url, "lobby", "darn it", author="ann")
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "rejected"
            assert r.json()["error"]["message"] == REASON
            # modify: the stored and delivered text is the hook's
            r = await post(http, gw.url, "lobby", "shout this", author="ann")
            assert r.status_code == 201, r.text
            assert r.json()["text"] == "SHOUT THIS"
            await watcher.messages("lobby", 2)
            delivered = [f["message"]["text"] for f in watcher.frames if f["type"] == "message"]
            assert delivered == ["hello", "SHOUT THIS"]
            # the same over WebSocket
            await writer.send(
                {"type": "publish", "room": "lobby", "text": "darn", "author": "bo", "ref": 1}
            )
            refused = await writer.expect("error")
            assert (refused["ref"], refused["code"], refused["message"]) == (1, "rejected", REASON)
            await writer.send(
                {"type": "publish", "room": "lobby", "text": "shout", "author": "bo", "ref": 2}
            )
            ack = await writer.expect("ack")
            assert (ack["ref"], ack["message"]["text"]) == (2, "SHOUT")
            # edits: PATCH and the WS edit frame ask the hook too, with the seq
            seq = ack["message"]["seq"]
            url = f"{gw.url}/v1/rooms/lobby/messages/{seq}"
            r = await http.patch(url, json={"text": "darn edit", "author": "bo"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "rejected", r.text
            r = await http.patch(url, json={"text": "shout edit", "author": "bo"})
            assert r.status_code == 200 and r.json()["text"] == "SHOUT EDIT", r.text
            edit = {"type": "edit", "room": "lobby", "seq": seq, "author": "bo"}
            await writer.send({**edit, "text": "darn again", "ref": 3})
            refused = await writer.expect("error")
            assert (refused["ref"], refused["code"], refused["message"]) == (3, "rejected", REASON)
            assert hits_in(receiver, "lobby")[-1] == {
                "type": "message.edit",
                "room": "lobby",
                "author": "bo",
                "text": "darn again",
                "seq": seq,
            }
            assert await texts(http, gw.url, "lobby") == ["hello", "SHOUT THIS", "SHOUT EDIT"]
            # a namespace with publish_hook = false is not asked
            r = await post(http, gw.url, "free:talk", "darn free", author="ann")
            assert r.status_code == 201, r.text
            assert hits_in(receiver, "free:talk") == []
            # an API key's post and edit are the backend's own: not asked
            asked = len(receiver.hits)
            auth = {"Authorization": f"Bearer {KEY}"}
            r = await post(http, gw.url, "lobby", "darn key", author="shop", headers=auth)
            assert r.status_code == 201 and r.json()["text"] == "darn key", r.text
            r = await http.patch(url, json={"text": "darn key edit"}, headers=auth)
            assert r.status_code == 200 and r.json()["text"] == "darn key edit", r.text
            assert len(receiver.hits) == asked
            # the refusal is in the contract the gateway serves
            spec = (await http.get(gw.url + "/openapi.json")).json()
            for path, method in (
                ("/v1/rooms/{room}/messages", "post"),
                ("/v1/rooms/{room}/messages/{seq}", "patch"),
            ):
                assert "rejected:" in spec["paths"][path][method]["responses"]["403"]["description"]
            deleting = spec["paths"]["/v1/rooms/{room}/messages/{seq}"]["delete"]
            assert "rejected:" not in deleting["responses"]["403"]["description"]
        # every request was signed with WEBHOOK_SECRET, per Standard Webhooks
        assert receiver.unverified == []
        hit = receiver.hits[0]
        assert Webhook(receiver.secrets[0]).verify(hit.body, hit.headers) == hit.payload
        assert await metric(gw.url, "chat_publish_hook_total", outcome="reject") == 4
        assert await metric(gw.url, "chat_publish_hook_total", outcome="modify") == 3
        assert await metric(gw.url, "chat_publish_hook_duration_seconds_count") == 8
    finally:
        gw.stop()
        await receiver.stop()


async def test_failing_hook_closed_refuses_and_stalls_only_its_own_posts(gateway_env) -> None:
    """Fail-closed (the default): a stall past the timeout, a 500, nonsense, an
    oversized answer, an unknown action, an invalid modified text and a refused
    connection each give 503 with nothing stored, and the log says so once. A
    post waiting on a stalled hook holds up no post of another room."""
    receiver = await Receiver([new_secret()], answer=behaviour, reply=verdict).start()
    gw = Instance(hook_env(gateway_env, receiver, PUBLISH_HOOK_TIMEOUT=str(t(3)))).start()
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(timeout=t(30)) as http:
            stalled = asyncio.create_task(post(http, gw.url, "stall", "wait for me"))
            await eventually(lambda: hits_in(receiver, "stall"), 20)
            r = await post(http, gw.url, "quick", "not held up")
            assert r.status_code == 201, r.text
            assert not stalled.done()  # acked while the other room's post still waits
            r = await stalled
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
            for room in ("err", "junk", "huge", "unknown", "badtext"):
                r = await post(http, gw.url, room, "anything")
                assert r.status_code == 503, (room, r.text)
                assert r.json()["error"]["code"] == "unavailable"
            await receiver.stop()  # the port now refuses connections
            r = await post(http, gw.url, "down", "anything")
            assert r.status_code == 503, r.text
            for room in ("stall", "err", "junk", "huge", "unknown", "badtext", "down"):
                assert await texts(http, gw.url, room) == [], room
            assert await texts(http, gw.url, "quick") == ["not held up"]
        for outcome, count in (
            ("timeout", 1),
            ("http_error", 1),
            ("bad_answer", 4),
            ("unreachable", 1),
        ):
            assert await metric(gw.url, "chat_publish_hook_total", outcome=outcome) == count
        warned = [line for line in gw.log().splitlines() if "publish hook" in line]
        assert len(warned) == 1, warned  # seven failures, one warning
    finally:
        gw.stop()
        await receiver.stop()


async def test_failing_hook_open_stores_as_given(gateway_env) -> None:
    receiver = await Receiver([new_secret()], answer=behaviour, reply=verdict).start()
    env = hook_env(
        gateway_env, receiver, PUBLISH_HOOK_TIMEOUT=str(t(1)), PUBLISH_HOOK_FAILURE="open"
    )
    gw = Instance(env).start()
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(timeout=t(30)) as http:
            for room in ("stall", "err", "junk"):
                r = await post(http, gw.url, room, "as given")
                assert r.status_code == 201, (room, r.text)
            await receiver.stop()
            r = await post(http, gw.url, "down", "as given")
            assert r.status_code == 201, r.text
            for room in ("stall", "err", "junk", "down"):
                assert await texts(http, gw.url, room) == ["as given"], room
        assert await metric(gw.url, "chat_publish_hook_total", outcome="unreachable") == 1
    finally:
        gw.stop()
        await receiver.stop()

"""Versions: each edit keeps the text it replaces, readable by the message's author,
a moderator of the room or an API key, and a delete removes every version's text
from every path: the store, the history caches (Redis and each instance's own), the
change log, the webhook outbox (pending, delivered and dead events) and search."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from chat_gateway.storage import MessageDeleted, Store
from chat_gateway.storage.postgres import PostgresStore
from chat_gateway.storage.search import RoomScope, parse_query
from chat_gateway.storage.sqlite import SQLiteStore
from tests.harness import CHAT_SECRET as SECRET
from tests.harness import SSEClient, eventually, instances, post, t
from tests.harness import chat_bearer as token
from tests.system.test_privacy import carrying, outbox_rows
from tests.system.test_webhooks import Receiver, hook_env, new_secret

KEY = "versions-api-key"
FIRST, SECOND = "zebra first draft", "walrus second draft"


async def version_rows(store: Store) -> list[tuple[Any, ...]]:
    query = "SELECT room, seq, version, text FROM message_versions ORDER BY room, seq, version"
    if isinstance(store, PostgresStore):
        return [tuple(r) for r in await store._call("fetch", query)]
    if isinstance(store, SQLiteStore):
        return list(await store._run(lambda db: db.execute(query).fetchall()))
    raise TypeError(type(store).__name__)


async def test_each_edit_keeps_the_text_it_replaces(any_env):
    room = "versions.basic"
    async with instances(1, any_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, room, FIRST, author="ana")
        await post(http, gw.url, room, "never edited", author="ana")
        url = f"{gw.url}/v1/rooms/{room}/messages/1/versions"
        r = await http.get(url, params={"user": "ana"})
        assert r.status_code == 200, r.text
        assert r.json() == {"room": room, "seq": 1, "version": 1, "versions": []}
        edits = []
        for text in (SECOND, "third and current", "third and current"):  # the last: no change
            r = await http.patch(
                f"{gw.url}/v1/rooms/{room}/messages/1", json={"text": text, "author": "ana"}
            )
            assert r.status_code == 200
            edits.append(r.json()["edited_at"])
        r = await http.get(url, params={"user": "ana"})
        assert r.json() == {
            "room": room,
            "seq": 1,
            "version": 3,
            "versions": [
                {"version": 1, "text": FIRST, "edited_at": edits[0]},
                {"version": 2, "text": SECOND, "edited_at": edits[1]},
            ],
        }
        r = await http.get(url, params={"user": "bo"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert FIRST not in r.text
        r = await http.get(url)
        assert r.status_code == 422, "open mode: whose request this is"
        r = await http.get(f"{gw.url}/v1/rooms/{room}/messages/9/versions", params={"user": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.get(url, params={"user": "ana", "x": "1"})
        assert r.status_code == 422


async def test_versions_are_for_the_author_a_moderator_or_an_api_key(any_env):
    room = "versions.who"
    env = {**any_env, "AUTH_SECRET": SECRET, "API_KEYS": KEY}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        r = await http.post(
            f"{gw.url}/v1/rooms/{room}/messages", json={"text": FIRST}, headers=token("ana")
        )
        assert r.status_code == 201
        r = await http.patch(
            f"{gw.url}/v1/rooms/{room}/messages/1", json={"text": SECOND}, headers=token("ana")
        )
        assert r.status_code == 200
        url = f"{gw.url}/v1/rooms/{room}/messages/1/versions"
        allowed = {
            "author": token("ana"),
            "moderator": token("mod", moderate=[room]),
            "api key": {"Authorization": f"Bearer {KEY}"},
        }
        for who, headers in allowed.items():
            r = await http.get(url, headers=headers)
            assert r.status_code == 200, (who, r.text)
            assert [v["text"] for v in r.json()["versions"]] == [FIRST], who
        refused = {
            "another user": token("bo"),
            "a moderator of another room": token("mod", moderate=["elsewhere"]),
            "a token without the room": token("ana", rooms=["elsewhere"]),
        }
        for who, headers in refused.items():
            r = await http.get(url, headers=headers)
            assert r.status_code == 403, (who, r.text)
            assert FIRST not in r.text
        r = await http.get(url)
        assert r.status_code == 401
        r = await http.get(url, params={"user": "a\x00b"}, headers=allowed["api key"])
        assert r.status_code == 422, "a user given is checked whoever asks"
        # The author named in the query is not who asks: the token's sub is.
        r = await http.get(url, params={"user": "ana"}, headers=token("bo"))
        assert r.status_code == 403


async def test_a_delete_removes_every_version_from_the_store_change_log_outbox_and_search(
    store,
):
    outbox = store.outbox()
    (endpoint,) = await outbox.register(["https://a.example/"])
    store.write_outbox([endpoint.id])
    msg, _ = await store.append("r", "ana", FIRST)
    await store.append("r", "bo", "keep me")
    await store.change("r", msg.seq, SECOND, author=None)
    await store.change("r", msg.seq, "current text", author=None)
    await store.change("r", 2, "kept, edited", author=None)
    _, found = await store.versions("r", msg.seq)
    assert [v.text for v in found] == [FIRST, SECOND]
    # One event delivered and kept, one dead, the rest pending.
    (head,) = await outbox.claim([endpoint.id], 10, lease=30)
    following = await outbox.delivered(head, 200, lease=30, chain=True)
    assert following is not None
    await outbox.dead(following, 500, "HTTP 500")
    rows = await outbox_rows(store)
    assert carrying(rows, FIRST) and carrying(rows, SECOND)

    await store.change("r", msg.seq, None, author=None)
    assert await version_rows(store) == [("r", 2, 1, "keep me")], "only the other message's"
    with pytest.raises(MessageDeleted):
        await store.versions("r", msg.seq)
    rows = await outbox_rows(store)
    for text in (FIRST, SECOND, "current text"):
        assert carrying(rows, text) == [], rows
    assert carrying(rows, "keep me"), "another message's events keep their text"
    for change in await store.changes("r", after=0):
        body = change.body().decode()
        assert FIRST not in body and SECOND not in body and "current text" not in body
    for words in ("zebra", "walrus", "current"):
        page = await store.search(parse_query(words), RoomScope(everything=True), limit=10)
        assert page.messages == [], words
    # A purge and retention remove versions too.
    await store.append("p", "ana", FIRST)
    await store.change("p", 1, SECOND, author=None)
    assert await store.purge_room("p") == 1
    await store.append("old", "ana", FIRST)
    await store.change("old", 1, SECOND, author=None)
    assert await store.delete_before(int(time.time() * 1000) + 86_400_000, 100) >= 1
    assert await version_rows(store) == []


async def test_a_delete_removes_every_version_on_every_path_of_two_gateways(gateway_env):
    """Two instances on Postgres and Redis, their caches warm, the webhook receiver
    failing: after the delete no path shows any version's text."""
    failing = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (500 if failing else 204, {}, 0.0)
    ).start()
    env = hook_env(gateway_env, receiver, WEBHOOK_BREAKER_FAILURES="100000")
    room = "versions.gone"
    try:
        async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(20)) as http:
            await post(http, a.url, room, FIRST, author="ana")
            await post(http, a.url, room, "bystander", author="bo")
            r = await http.patch(
                f"{b.url}/v1/rooms/{room}/messages/1", json={"text": SECOND, "author": "ana"}
            )
            assert r.status_code == 200
            for gw in (a, b):  # each instance's cache holds the edited page
                page = await http.get(f"{gw.url}/v1/rooms/{room}/messages")
                assert SECOND in page.text
            r = await http.get(
                f"{a.url}/v1/rooms/{room}/messages/1/versions", params={"user": "ana"}
            )
            assert [v["text"] for v in r.json()["versions"]] == [FIRST]
            await eventually(lambda: len(receiver.hits) >= 1, 20)  # events are pending
            r = await http.request(
                "DELETE", f"{a.url}/v1/rooms/{room}/messages/1", json={"author": "ana"}
            )
            assert r.status_code == 200
            for gw in (a, b):
                page = await http.get(f"{gw.url}/v1/rooms/{room}/messages")
                assert FIRST not in page.text and SECOND not in page.text
                assert page.json()["messages"][0]["text"] == ""
                r = await http.get(
                    f"{gw.url}/v1/rooms/{room}/messages/1/versions", params={"user": "ana"}
                )
                assert r.status_code == 404
                for words in ("zebra", "walrus"):
                    found = await http.get(f"{gw.url}/v1/search", params={"q": words})
                    assert found.status_code == 200 and found.json()["results"] == [], words
            # The change log replayed from its start carries no version's text.
            async with SSEClient.open(
                f"{b.url}/v1/rooms/{room}/events?since=0&changes_since=0"
            ) as sse:
                await eventually(
                    lambda: any(e.get("event") == "message_deleted" for e in sse.events), 20
                )
                raw = orjson.dumps(sse.events).decode()
                assert FIRST not in raw and SECOND not in raw
            failing = False
            await eventually(lambda: len(receiver.delivered()) >= 4, 30)
            await asyncio.sleep(0.3)
            sent = orjson.dumps([h.payload for h in receiver.hits]).decode()
            delivered = [h.payload["type"] for h in receiver.delivered()]
            assert delivered.count("message.created") == 2 and "message.deleted" in delivered
            late = orjson.dumps([h.payload for h in receiver.delivered()]).decode()
            assert FIRST not in late and SECOND not in late, "redacted in the outbox"
            assert "bystander" in sent
    finally:
        await receiver.stop()

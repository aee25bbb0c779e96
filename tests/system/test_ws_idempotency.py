"""A keyed WebSocket publish is idempotent like a keyed HTTP post: a repeat of the
key in the room by the same identity, on any connection or instance, is acked
with the first message and stores nothing, so a client may retry a publish whose
ack it never saw; the key with another text is an ``idempotency_conflict``."""

from __future__ import annotations

import httpx

from tests.harness import WSClient, instances


async def test_keyed_publish_repeat_is_acked_with_the_first_message(gateway_env):
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(a.ws_url) as ws:
            # keyless publishes around a keyed one keep their order and seqs
            for ref, extra in (("p1", {}), ("p2", {"key": "k-1"}), ("p3", {})):
                await ws.send({"type": "publish", "room": "r", "text": ref, "ref": ref, **extra})
            acks = [await ws.expect("ack") for _ in range(3)]
            assert [(x["ref"], x["message"]["seq"]) for x in acks] == [
                ("p1", 1),
                ("p2", 2),
                ("p3", 3),
            ]
            first = acks[1]["message"]
        # the same key again, on another instance: the first message; another text: 409
        async with WSClient.connect(b.ws_url) as ws:
            await ws.send({"type": "publish", "room": "r", "text": "p2", "ref": "r1", "key": "k-1"})
            ack = await ws.expect("ack")
            assert ack["ref"] == "r1" and ack["message"] == first
            await ws.send(
                {"type": "publish", "room": "r", "text": "again", "ref": "r0", "key": "k-1"}
            )
            err = await ws.expect("error")
            assert err["ref"] == "r0" and err["code"] == "idempotency_conflict"
            # the key is per room: in another room it stores a new message
            await ws.send({"type": "publish", "room": "s", "text": "x", "ref": "r2", "key": "k-1"})
            assert (await ws.expect("ack"))["message"]["seq"] == 1
        # and the HTTP header shares the same keys
        r = await http.post(
            a.url + "/v1/rooms/r/messages", json={"text": "p2"}, headers={"Idempotency-Key": "k-1"}
        )
        assert r.status_code == 200 and r.json() == first
        page = (await http.get(a.url + "/v1/rooms/r/messages")).json()
        assert [m["text"] for m in page["messages"]] == ["p1", "p2", "p3"]


async def test_keyed_edit_and_delete_frames_change_a_message_once(gateway_env):
    """``key`` on WS edit/delete means what Idempotency-Key means on PATCH/DELETE: a
    repeat in the room, on any connection or over HTTP, changes nothing and is acked
    with the message as it is now."""
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        url = a.url + "/v1/rooms/r/messages"
        for text in ("one", "two"):
            assert (await http.post(url, json={"text": text})).status_code == 201
        async with WSClient.connect(a.ws_url) as ws, WSClient.connect(b.ws_url) as watcher:
            await watcher.subscribe("r")
            await ws.send(
                {"type": "edit", "room": "r", "seq": 1, "text": "uno", "ref": "e1", "key": "k-e"}
            )
            first = await ws.expect("ack")
            assert first["ref"] == "e1" and first["message"]["version"] == 2
            # a lost ack retried, here with another text: nothing changes again
            await ws.send(
                {"type": "edit", "room": "r", "seq": 1, "text": "eins", "ref": "e2", "key": "k-e"}
            )
            ack = await ws.expect("ack")
            assert ack["ref"] == "e2" and ack["message"] == first["message"]
            await ws.send({"type": "delete", "room": "r", "seq": 2, "ref": "d1", "key": "k-d"})
            gone = (await ws.expect("ack"))["message"]
            assert gone["deleted_at"] and gone["version"] == 2
            # the same key over HTTP and on another instance: the same key, no change
            r = await http.patch(
                url + "/1", json={"text": "ein"}, headers={"Idempotency-Key": "k-e"}
            )
            assert r.status_code == 200 and r.json()["text"] == "uno", r.text
            # the delete's key on an edit of another message: the deleted one, as it is
            async with WSClient.connect(b.ws_url) as other:
                await other.send(
                    {"type": "edit", "room": "r", "seq": 1, "text": "un", "ref": "e3", "key": "k-d"}
                )
                assert (await other.expect("ack"))["message"] == gone
                for bad in ("", "x" * 129, 5):
                    await other.send(
                        {
                            "type": "edit",
                            "room": "r",
                            "seq": 1,
                            "text": "bad",
                            "ref": "b",
                            "key": bad,
                        }
                    )
                    err = await other.expect("error")
                    assert (err["code"], err.get("field")) == ("invalid_request", "key")
            # the next change is numbered 3: none of the repeats made one
            await ws.send(
                {
                    "type": "edit",
                    "room": "r",
                    "seq": 1,
                    "text": "last",
                    "ref": "e4",
                    "key": "k-last",
                }
            )
            assert (await ws.expect("ack"))["message"]["version"] == 3
            changes = [
                await watcher.expect(kind)
                for kind in ("message_updated", "message_deleted", "message_updated")
            ]
            assert [(c["change"], c["message"]["seq"], c["message"]["text"]) for c in changes] == [
                (1, 1, "uno"),
                (2, 2, ""),
                (3, 1, "last"),
            ]
            page = (await http.get(url)).json()["messages"]
            assert [(m["text"], m["version"]) for m in page] == [("last", 3), ("", 2)]

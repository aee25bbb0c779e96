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
                ("p1", 1), ("p2", 2), ("p3", 3)]
            first = acks[1]["message"]
        # the same key again, on another instance: the first message; another text: 409
        async with WSClient.connect(b.ws_url) as ws:
            await ws.send({"type": "publish", "room": "r", "text": "p2", "ref": "r1",
                           "key": "k-1"})
            ack = await ws.expect("ack")
            assert ack["ref"] == "r1" and ack["message"] == first
            await ws.send({"type": "publish", "room": "r", "text": "again", "ref": "r0",
                           "key": "k-1"})
            err = await ws.expect("error")
            assert err["ref"] == "r0" and err["code"] == "idempotency_conflict"
            # the key is per room: in another room it stores a new message
            await ws.send({"type": "publish", "room": "s", "text": "x", "ref": "r2",
                           "key": "k-1"})
            assert (await ws.expect("ack"))["message"]["seq"] == 1
        # and the HTTP header shares the same keys
        r = await http.post(a.url + "/v1/rooms/r/messages", json={"text": "p2"},
                            headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 200 and r.json() == first
        page = (await http.get(a.url + "/v1/rooms/r/messages")).json()
        assert [m["text"] for m in page["messages"]] == ["p1", "p2", "p3"]

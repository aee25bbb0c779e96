"""The embedded default: no environment, no servers; messages survive a restart."""

from __future__ import annotations

import httpx

from tests.harness import Instance, SSEClient, WSClient, instances, post


async def test_serve_with_no_environment_delivers_live_and_keeps_messages(tmp_path):
    inst = Instance({}, cwd=str(tmp_path), inherit_env=False)
    inst.start()
    try:
        await inst.wait_ready()
        async with (
            httpx.AsyncClient() as http,
            WSClient.connect(inst.ws_url) as ws,
            SSEClient.open(f"{inst.url}/v1/rooms/lobby/events") as sse,
        ):
            assert (await ws.subscribe("lobby"))["seq"] == 0
            for i in range(3):
                r = await post(http, inst.url, "lobby", f"hello {i}", author="ana")
                assert r.status_code == 201 and r.json()["seq"] == i + 1
            assert await ws.messages("lobby", 3) == [1, 2, 3]
            assert await sse.wait_for(3) == [1, 2, 3]
            ready = (await http.get(inst.url + "/readyz")).json()
            assert ready["checks"]["database"]["ok"] and ready["checks"]["broker"]["ok"]
    finally:
        assert inst.stop() == 0
    assert (tmp_path / "chat-gateway.db").exists()

    inst.start()
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient() as http:
            page = (await http.get(f"{inst.url}/v1/rooms/lobby/messages")).json()
            assert [m["text"] for m in page["messages"]] == [f"hello {i}" for i in range(3)]
            r = await post(http, inst.url, "lobby", "after restart")
            assert r.json()["seq"] == 4
    finally:
        inst.stop()


async def test_embedded_store_edits_deletes_types_and_reads_with_no_servers(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "warning",
    }
    room = "solo"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(gw.ws_url + "?user=bo") as bo,
            WSClient.connect(gw.ws_url + "?user=ana") as ana,
        ):
            await bo.subscribe(room, changes_since=0)
            await ana.subscribe(room)
            assert (await post(http, gw.url, room, "helo", author="ana")).status_code == 201
            url = f"{gw.url}/v1/rooms/{room}/messages/1"
            r = await http.patch(
                url, json={"text": "hello", "author": "ana"}, headers={"Idempotency-Key": "fix-1"}
            )
            assert r.status_code == 200 and r.json()["version"] == 2
            r = await http.patch(
                url,
                json={"text": "hello again", "author": "ana"},
                headers={"Idempotency-Key": "fix-1"},
            )
            assert (r.status_code, r.json()["text"], r.json()["version"]) == (200, "hello", 2)
            assert (await bo.expect("message_updated"))["message"]["text"] == "hello"
            for _ in range(3):
                await ana.send({"type": "typing", "room": room})
            assert await bo.expect("typing") == {"type": "typing", "room": room, "user": "ana"}
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": "x"})
            refused = await ana.expect("error")  # open mode: the author given must match
            assert (refused["ref"], refused["code"]) == ("x", "forbidden")
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": "d", "author": "ana"})
            assert (await ana.expect("ack"))["message"]["text"] == ""
            deleted = await bo.expect("message_deleted")
            assert deleted["change"] == 2 and deleted["message"]["deleted_at"]
            assert [f for f in bo.frames if f.get("type") == "typing"] == [
                {"type": "typing", "room": room, "user": "ana"}
            ], "one per 2 s"
            r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 1, "user": "bo"})
            assert r.json() == {"room": room, "seq": 1, "unread": 0, "mentions": 0}
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert [(m["seq"], m["text"], m["version"]) for m in page] == [(1, "", 3)]

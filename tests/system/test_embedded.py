"""The embedded default: no environment, no servers; messages survive a restart."""

from __future__ import annotations

import httpx

from tests.harness import Instance, SSEClient, WSClient, post


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

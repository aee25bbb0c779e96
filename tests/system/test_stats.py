"""GET /v1/stats/events: the instance's figures as a stream of JSON snapshots."""

from __future__ import annotations

import time

import httpx
import jwt

from tests.harness import Instance, SSEClient, WSClient, eventually, instances, post


async def test_stats_stream_reports_clients_rooms_rates_latency_and_cache(gateway_env):
    inst = Instance(dict(gateway_env)).start()
    try:
        await inst.wait_ready()
        async with (
            SSEClient.open(f"{inst.url}/v1/stats/events?interval=1") as stats,
            WSClient.connect(inst.ws_url) as ws,
            httpx.AsyncClient() as http,
        ):
            assert stats.status == 200
            await ws.subscribe("stats.room")

            def snapshots() -> list[dict]:
                return [e["json"] for e in stats.events if e.get("event") == "stats"]

            # The room is listed (seq 0) once held; its rate is counted from there.
            await eventually(lambda: any(s["rooms"] for s in snapshots()))
            for i in range(5):
                assert (await post(http, inst.url, "stats.room", f"m{i}")).status_code == 201
            await http.get(f"{inst.url}/v1/rooms/stats.room/messages")
            await http.get(f"{inst.url}/v1/rooms/stats.room/messages")
            await ws.messages("stats.room", 5)

            def caught_up() -> dict | None:
                snap = snapshots()[-1]
                return (
                    snap
                    if snap
                    and snap["messages"]["delivered_total"] >= 5
                    and snap["cache"]["lookups_total"] >= 2
                    else None
                )

            snap = await eventually(caught_up)
            assert snap["clients"] == {"ws": 1, "sse": 0, "total": 1}
            assert snap["messages"]["accepted_total"] == 5
            assert snap["subscriptions"] == 1
            assert [r["room"] for r in snap["rooms"]] == ["stats.room"]
            assert snap["rooms"][0]["seq"] == 5 and snap["rooms"][0]["subscribers"] == 1
            assert snap["cache"]["hits_total"] >= 1
            assert 0 < snap["cache"]["hit_rate_total"] <= 1
            snaps = snapshots()
            assert sum(s["latency_ms"]["count"] for s in snaps) == 5
            assert any(s["messages"]["accepted_per_s"] > 0 for s in snaps)
            assert any(s["rooms"] and s["rooms"][0]["per_s"] > 0 for s in snaps)
            assert all(s["rate_limited"]["total"] == 0 for s in snaps)
    finally:
        inst.stop()


async def test_stats_stream_refuses_a_bad_interval(gateway_env):
    inst = Instance(dict(gateway_env)).start()
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient() as http:
            for bad in ("0", "0.2", "0.99", "abc", "61", "-1"):
                r = await http.get(f"{inst.url}/v1/stats/events", params={"interval": bad})
                assert r.status_code == 422, bad
                assert r.json()["error"]["code"] == "invalid_request"
            r = await http.get(f"{inst.url}/v1/stats/events", params={"scope": "world"})
            assert r.status_code == 422 and r.json()["error"]["field"] == "scope"
            r = await http.get(f"{inst.url}/v1/stats/events", params={"intervall": "5"})
            assert r.status_code == 422 and r.json()["error"]["fields"] == ["intervall"]
    finally:
        inst.stop()


async def test_cluster_scope_adds_up_every_instance_and_drops_one_that_stops(gateway_env):
    room = "stats.cluster"
    async with instances(3, gateway_env) as (a, b, c):
        async with (
            SSEClient.open(f"{a.url}/v1/stats/events?interval=1&scope=cluster") as whole,
            SSEClient.open(f"{a.url}/v1/stats/events?interval=1") as own,
            WSClient.connect(b.ws_url) as on_b,
            WSClient.connect(c.ws_url) as on_c,
            httpx.AsyncClient() as http,
        ):
            await on_b.subscribe(room)
            await on_c.subscribe(room)
            for i, inst in enumerate((a, b, c, a)):
                assert (await post(http, inst.url, room, f"m{i}")).status_code == 201
            await on_b.messages(room, 4)
            await on_c.messages(room, 4)

            def last(stream: SSEClient) -> dict:
                snaps = [e["json"] for e in stream.events if e.get("event") == "stats"]
                return snaps[-1] if snaps else {}

            def summed() -> dict | None:
                snap = last(whole)
                return (
                    snap
                    if snap
                    and len(snap["instances"]) == 3
                    and snap["messages"]["delivered_total"] >= 8
                    else None
                )

            snap = await eventually(summed)
            assert snap["scope"] == "cluster"
            assert snap["clients"] == {"ws": 2, "sse": 0, "total": 2}
            assert snap["messages"]["accepted_total"] == 4  # two on a, one each on b, c
            assert snap["messages"]["delivered_total"] == 8  # 4 to each subscriber
            assert snap["rooms"] == [
                {"room": room, "seq": 4, "subscribers": 2, "per_s": snap["rooms"][0]["per_s"]}
            ]
            by_pid = {i["pid"] for i in snap["instances"]}
            assert by_pid == {a.proc.pid, b.proc.pid, c.proc.pid}
            # the instance's own stream still counts it alone
            mine = last(own)
            assert mine["scope"] == "instance" and mine["clients"]["total"] == 0
            assert [i["pid"] for i in mine["instances"]] == [a.proc.pid]

            c.stop()  # a graceful stop removes its entry at once
            gone = await eventually(
                lambda: last(whole) if len(last(whole)["instances"]) == 2 else None
            )
            assert {i["pid"] for i in gone["instances"]} == {a.proc.pid, b.proc.pid}
            assert gone["clients"]["total"] == 1


API_KEY = "stats-api-key-0123456789"
SECRET = "stats-test-secret-of-at-least-32-bytes"


async def test_in_auth_mode_the_figures_need_an_api_key_and_count_as_connections(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
        "REDIS_URL": "memory://",
        "AUTH_SECRET": SECRET,
        "API_KEYS": API_KEY,
        "LOG_LEVEL": "warning",
        "MAX_CONNECTIONS_PER_IDENTITY": "2",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/stats/events"
        user = jwt.encode({"sub": "ana", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
        for headers, params in (
            ({}, {}),
            ({"Authorization": "Bearer nope"}, {}),
            ({}, {"key": "nope"}),
            ({"Authorization": f"Bearer {user}"}, {}),
        ):
            r = await http.get(url, headers=headers, params=params)
            assert r.status_code == 401, (headers, params, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
        # with the key, as a header or (EventSource) as ?key=: two streams, then refused
        async with (
            SSEClient.open(url, {"Authorization": f"Bearer {API_KEY}"}) as one,
            SSEClient.open(f"{url}?key={API_KEY}") as two,
        ):
            assert one.status == two.status == 200
            await eventually(lambda: one.events and two.events)
            assert one.events[0]["event"] == "stats"
            r = await http.get(url, params={"key": API_KEY})
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_connections"

        async def admitted() -> bool:  # the ended streams gave their places back
            async with SSEClient.open(f"{url}?key={API_KEY}") as again:
                await eventually(lambda: again.events or again.ended.is_set())
                return bool(again.events)

        assert await eventually(admitted)

    # auth mode with no API key configured: nobody sees the figures
    env = {**env, "API_KEYS": "", "DATABASE_URL": f"sqlite:///{tmp_path}/s2.db"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{gw.url}/v1/stats/events", params={"key": "anything"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

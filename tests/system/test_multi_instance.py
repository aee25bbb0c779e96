"""The whole path on three real gateway processes sharing one Postgres and one Redis."""

from __future__ import annotations

import asyncio
import itertools

import httpx

from tests.harness import SSEClient, WSClient, instances, post


async def test_posts_on_every_instance_reach_every_subscriber_in_order_once(gateway_env):
    room = "multi.room"
    async with instances(3, gateway_env) as gws:
        async with (
            WSClient.connect(gws[0].ws_url) as ws0,
            WSClient.connect(gws[1].ws_url) as ws1,
            WSClient.connect(gws[2].ws_url) as ws2,
            SSEClient.open(f"{gws[0].url}/v1/rooms/{room}/events") as sse0,
            SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events") as sse1,
            SSEClient.open(f"{gws[2].url}/v1/rooms/{room}/events") as sse2,
            httpx.AsyncClient() as http,
        ):
            for ws in (ws0, ws1, ws2):
                assert (await ws.subscribe(room))["seq"] == 0
            for sse in (sse0, sse1, sse2):
                assert sse.status == 200

            n = 0
            for round_no, inst in itertools.product(range(4), range(3)):
                # over HTTP on one instance, then history read on the next one at once
                r = await post(http, gws[inst].url, room, f"http {round_no}/{inst}")
                assert r.status_code == 201, r.text
                n += 1
                assert r.json()["seq"] == n
                other = gws[(inst + 1) % 3]
                page = (await http.get(f"{other.url}/v1/rooms/{room}/messages")).json()
                assert page["messages"][-1]["seq"] == n, "history is stale after an ack"
                # over WS on the same instance
                sender = (ws0, ws1, ws2)[inst]
                await sender.send(
                    {
                        "type": "publish",
                        "room": room,
                        "text": f"ws {n}",
                        "ref": f"r{n}",
                        "author": "ws",
                    }
                )
                ack = await sender.expect("ack")
                n += 1
                assert ack["ref"] == f"r{n - 1}" and ack["message"]["seq"] == n
                page = (
                    await http.get(f"{gws[(inst + 2) % 3].url}/v1/rooms/{room}/messages")
                ).json()
                assert page["messages"][-1]["seq"] == n, "history is stale after a WS ack"

            expected = list(range(1, n + 1))
            for ws in (ws0, ws1, ws2):
                assert await ws.messages(room, n) == expected
            for sse in (sse0, sse1, sse2):
                assert await sse.wait_for(n) == expected
            # and nothing more arrives afterwards (no late duplicates)
            await asyncio.sleep(0.5)
            for ws in (ws0, ws1, ws2):
                assert ws.seqs(room) == expected
            for sse in (sse0, sse1, sse2):
                assert sse.seqs() == expected
            # messages carry the same bytes everywhere
            texts = [f["message"]["text"] for f in ws0.frames if f.get("type") == "message"]
            assert texts == [e["json"]["text"] for e in sse2.events if e.get("event") == "message"]


async def test_concurrent_writers_on_several_instances_get_gapless_seqs(gateway_env):
    room = "race"
    per_writer = 40
    async with instances(3, gateway_env) as gws:
        async with httpx.AsyncClient(timeout=30) as http:

            async def writer(w: int) -> list[int]:
                base = gws[w % 3].url
                seqs = []
                for i in range(per_writer):
                    r = await post(http, base, room, f"w{w} m{i}")
                    assert r.status_code == 201, r.text
                    seqs.append(r.json()["seq"])
                return seqs

            results = await asyncio.gather(*(writer(w) for w in range(6)))
            all_seqs = sorted(itertools.chain.from_iterable(results))
            assert all_seqs == list(range(1, 6 * per_writer + 1))
            for seqs in results:
                assert seqs == sorted(seqs), "one writer's seqs must increase"
            page = (
                await http.get(f"{gws[1].url}/v1/rooms/{room}/messages", params={"limit": 200})
            ).json()
            assert [m["seq"] for m in page["messages"]] == list(range(41, 241))
            assert page["has_more"] is True


async def test_concurrent_idempotent_retries_on_several_instances_store_one(gateway_env):
    room = "idem"
    async with instances(3, gateway_env) as gws:
        async with httpx.AsyncClient(timeout=30) as http:
            key = {"Idempotency-Key": "order-42"}
            rs = await asyncio.gather(
                *(post(http, gws[i % 3].url, room, "once", headers=key) for i in range(12))
            )
            assert sorted(r.status_code for r in rs) == [200] * 11 + [201]
            assert len({r.json()["id"] for r in rs}) == 1
            assert {r.json()["seq"] for r in rs} == {1}
            r = await post(http, gws[0].url, room, "next")
            assert r.json()["seq"] == 2, "a rejected duplicate must not consume a seq"

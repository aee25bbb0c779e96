"""Read positions and receipts across real gateway processes."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time

import httpx
import jwt

from tests.harness import (
    WSClient,
    embedded_env,
    eventually,
    instances,
    post,
)


async def test_read_positions_never_move_back_and_receipts_go_out(gateway_env):
    room = "chat.read"
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=10) as http:
        for i in range(30):
            assert (await post(http, gws[0].url, room, f"m{i}")).status_code == 201
        assert (await post(http, gws[0].url, "chat.other", "x")).status_code == 201
        async with WSClient.connect(gws[2].ws_url + "?user=watcher") as watcher:
            await watcher.subscribe(room)
            reader_task = asyncio.create_task(watcher.read_all())
            rnd = random.Random(7)
            marks = [rnd.randrange(0, 31) for _ in range(60)]
            seen: list[int] = []

            async def mark(i: int, seq: int) -> None:
                r = await http.post(
                    f"{gws[i % 3].url}/v1/rooms/{room}/read", json={"seq": seq, "user": "bo"}
                )
                assert r.status_code == 200, r.text
                seen.append(r.json()["seq"])

            async def watch() -> None:
                last = 0
                for _ in range(20):
                    r = await http.get(f"{gws[1].url}/v1/rooms/{room}/read", params={"user": "bo"})
                    assert r.json()["seq"] >= last, "a read position moved back"
                    last = r.json()["seq"]

            await asyncio.gather(watch(), *(mark(i, s) for i, s in enumerate(marks)))
            top = max(marks)
            r = await http.get(f"{gws[0].url}/v1/rooms/{room}/read", params={"user": "bo"})
            assert r.json() == {"room": room, "seq": top, "unread": 30 - top, "mentions": 0}
            assert max(seen) == top
            # Every answer is at least the mark it answered (GREATEST, never lower).
            r = await http.post(f"{gws[1].url}/v1/rooms/{room}/read", json={"seq": 1, "user": "bo"})
            assert r.json()["seq"] == top
            # A WS read frame (open mode: the connection's ?user=) and the list in one call.
            async with WSClient.connect(gws[1].ws_url + "?user=bo") as bo:
                await bo.send({"type": "read", "room": "chat.other", "seq": 1, "ref": 9})
                ack = await bo.expect("ack")
                assert ack == {
                    "type": "ack",
                    "ref": 9,
                    "read": {"room": "chat.other", "seq": 1, "unread": 0, "mentions": 0},
                }
            r = await http.get(f"{gws[2].url}/v1/read", params={"user": "bo"})
            assert r.json() == {
                "rooms": [
                    {"room": "chat.other", "seq": 1, "unread": 0, "mentions": 0},
                    {"room": room, "seq": top, "unread": 30 - top, "mentions": 0},
                ]
            }
            # Read receipts reach the room's subscribers, debounced to a few.
            await eventually(
                lambda: [f for f in watcher.frames if f.get("type") == "read" and f["seq"] == top]
            )
            receipts = [f for f in watcher.frames if f.get("type") == "read"]
            assert all(f["user"] == "bo" and f["room"] == room for f in receipts)
            assert len(receipts) <= 6, f"not debounced: {len(receipts)} receipts for 61 marks"
            reader_task.cancel()
            await asyncio.gather(reader_task, return_exceptions=True)
        # Bad input changes nothing.
        for body in (
            {"seq": -1, "user": "bo"},
            {"seq": "x", "user": "bo"},
            {"user": "bo"},
            {"seq": 3},
            {"seq": 3, "user": "bo", "extra": 1},
        ):
            r = await http.post(f"{gws[0].url}/v1/rooms/{room}/read", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", body
        r = await http.get(f"{gws[0].url}/v1/rooms/{room}/read", params={"user": "bo"})
        assert r.json()["seq"] == top


async def test_read_positions_are_filtered_before_their_limit(tmp_path):
    secret = "s" * 40
    env = embedded_env(tmp_path, AUTH_SECRET=secret, READ_RATE_LIMIT="100/1s")
    tok = jwt.encode(
        {"sub": "ana", "exp": int(time.time()) + 600, "rooms": ["zz-*", "mine"]},
        secret,
        algorithm="HS256",
    )
    auth = {"Authorization": f"Bearer {tok}"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url) as http:
        for room in ("zz-granted", "mine"):
            assert (
                await http.post(f"/v1/rooms/{room}/messages", json={"text": "x"}, headers=auth)
            ).status_code == 201
            r = await http.post(f"/v1/rooms/{room}/read", json={"seq": 1}, headers=auth)
            assert r.status_code == 200
        # 1,000 positions in rooms the token does not grant, all sorting first
        with sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
            db.executemany(
                "INSERT INTO read_positions (user_name, room, seq, updated_ms) VALUES (?, ?, 1, 0)",
                [("ana", f"aa-{i:04d}") for i in range(1000)],
            )
        r = await http.get("/v1/read", headers=auth)
        assert r.status_code == 200
        assert [p["room"] for p in r.json()["rooms"]] == ["mine", "zz-granted"]

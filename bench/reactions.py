"""Reactions: what they cost a room with many subscribers.

Gateway instances on one Postgres database and Redis; ``subscribers`` WebSocket
subscribers of one room, spread over the instances, each following its changes
(``changes_since``), so every reaction added or removed reaches each of them as
a ``reactions_updated`` frame. A client in this process adds and removes
reactions over HTTP at ``rate`` per second for ``seconds``, open loop, spread
over ``users`` users, the room's ``messages`` messages and a few reactions
(each request flips one user's reaction on one message: an add, or the remove of
one it added). Reported: the frames delivered against those due, the
instances' CPU per reaction and per frame, and the change-log pages the instances
read from the store in gap fills and catch-ups (``chat_change_log_reads_total``,
``chat_gap_fills_total`` on their ``/metrics``).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import httpx
import orjson

from bench.procs import Server
from bench.targets import Gateway
from bench.wsclient import WSClient

ROOM = "reactions-bench"
REACTIONS = ("+1", "tada", "heart", "eyes")
READ_PATHS = ("fill", "change_fill", "catch_up")
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


async def _metrics(http: httpx.AsyncClient, servers: list[Server]) -> dict[str, float]:
    """``name:label`` -> the sum over the instances of the samples of the change-log
    reads (by path) and the gap fills (by reason)."""
    out: dict[str, float] = {}
    for s in servers:
        text = (await http.get(f"http://127.0.0.1:{s.port}/metrics")).text
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m is None or m[1] not in ("chat_change_log_reads_total", "chat_gap_fills_total"):
                continue
            label = (m[2] or "").partition('"')[2].rstrip('"')
            key = f"{m[1]}:{label}"
            out[key] = out.get(key, 0.0) + float(m[3])
    return out


async def run(
    *,
    instances: int = 2,
    subscribers: int = 200,
    rate: float = 50.0,
    seconds: float = 10.0,
    messages: int = 20,
    users: int = 100,
) -> list[dict[str, Any]]:
    target = Gateway()
    rng = random.Random(28)
    try:
        servers = await target.start(instances, {"REACTION_RATE_LIMIT": "1000000/1s"})
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(messages):
                r = await http.post(
                    f"http://127.0.0.1:{servers[i % instances].port}/v1/rooms/{ROOM}/messages",
                    json={"text": f"m{i}", "author": "bench"},
                )
                r.raise_for_status()

            frames = 0
            subscribed = 0
            all_in = asyncio.get_running_loop().create_future()

            def on_frame(_client: WSClient, data: bytes) -> None:
                nonlocal frames, subscribed
                if b'"reactions_updated"' in data:
                    frames += 1
                elif b'"subscribed"' in data:
                    subscribed += 1
                    if subscribed == subscribers and not all_in.done():
                        all_in.set_result(None)

            clients = []
            for k in range(subscribers):
                server = servers[k % instances]
                ws = await WSClient.connect(
                    "127.0.0.1", server.port, target.ws_path(ROOM), on_frame
                )
                ws.send_text(
                    orjson.dumps(
                        {
                            "type": "subscribe",
                            "room": ROOM,
                            "since": messages,
                            "changes_since": 0,
                        }
                    )
                )
                clients.append(ws)
            await asyncio.wait_for(all_in, 60)

            before = await _metrics(http, servers)
            cpu0 = target.cpu()
            held: set[tuple[str, int, str]] = set()  # reactions present now
            busy: set[tuple[str, int, str]] = set()  # requests in flight
            outcomes: list[int] = []

            async def one(i: int, key: tuple[str, int, str]) -> None:
                user, seq, reaction = key
                base = f"http://127.0.0.1:{servers[i % instances].port}/v1/rooms/{ROOM}"
                if key in held:
                    r = await http.delete(
                        f"{base}/messages/{seq}/reactions/{reaction}", params={"user": user}
                    )
                else:
                    r = await http.post(
                        f"{base}/messages/{seq}/reactions",
                        json={"reaction": reaction, "user": user},
                    )
                outcomes.append(r.status_code)
                if r.status_code == 200:
                    held.symmetric_difference_update({key})
                busy.discard(key)

            tasks = []
            start = time.perf_counter()
            total = int(rate * seconds)
            for i in range(total):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                while True:
                    key = (
                        f"u{rng.randrange(users)}",
                        rng.randrange(1, messages + 1),
                        rng.choice(REACTIONS),
                    )
                    if key not in busy:
                        break
                busy.add(key)
                tasks.append(asyncio.create_task(one(i, key)))
            await asyncio.gather(*tasks)
            window = time.perf_counter() - start
            changed = outcomes.count(200)
            due = changed * subscribers
            deadline = time.monotonic() + 30
            while frames < due and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # frames past those due would show now
            cpu = target.cpu() - cpu0
            after = await _metrics(http, servers)
            for ws in clients:
                if ws.transport is not None:
                    ws.transport.close()

        def delta(key: str) -> int:
            return round(after.get(key, 0.0) - before.get(key, 0.0))

        reads = {path: delta(f"chat_change_log_reads_total:{path}") for path in READ_PATHS}
        fills = {
            key.partition(":")[2]: delta(key)
            for key in after
            if key.startswith("chat_gap_fills_total:") and delta(key)
        }
        return [
            {
                "instances": instances,
                "subscribers": subscribers,
                "offered_per_s": rate,
                "reactions": len(outcomes),
                "changed": changed,
                "errors": len(outcomes) - changed,
                "reactions_per_s": round(changed / window, 1),
                "frames": frames,
                "frames_due": due,
                "delivery_ratio": round(frames / due, 4) if due else None,
                "server_cpu_s": round(cpu, 2),
                "server_cpu_ms_per_reaction": round(cpu / changed * 1000, 3) if changed else None,
                "server_cpu_us_per_frame": round(cpu / frames * 1e6, 2) if frames else None,
                "change_log_reads": sum(reads.values()),
                **{f"change_log_reads_{path}": n for path, n in reads.items()},
                "gap_fills": sum(fills.values()),
                "gap_fills_by_reason": fills,
            }
        ]
    finally:
        await target.stop()

"""A failover drill against a Postgres you run (pg_auto_failover, Patroni, a
managed service): two gateways on ``DATABASE_URL``, a WS and an SSE subscriber
per gateway on two fresh rooms, keyed posts back to back (a 503 is retried with
the same ``Idempotency-Key``). Kill or switch the primary however you like
while it runs; once ``--after`` posts have been acknowledged past the outage it
checks that every subscriber got every acknowledged message in order, once,
and prints how long posts were refused.

    python -m bench.failover_drill 'postgresql://postgres@h1:5432,h2:5432/chat?target_session_attrs=read-write'

Redis is the machine's (``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/0``)
under a throwaway key prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from bench.acknowledged import Writer, delivered_in_order_once, subscribers
from bench.procs import REDIS_URL
from tests.harness import delete_prefix, eventually, instances, new_prefix


async def drill(database_url: str, before: int, after: int, give_up: float) -> None:
    prefix = new_prefix("drill")
    rooms = [prefix.replace(":", "") + "-a", prefix.replace(":", "") + "-b"]
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "KEY_PREFIX": prefix,
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "PUBLISH_RATE_LIMIT": "100000/1s",
        "LOG_LEVEL": "warning",
        "POSITION_INTERVAL": "1",
    }
    try:
        async with (
            instances(2, env) as gws,
            httpx.AsyncClient(timeout=30) as http,
            subscribers(gws, rooms) as (wss, sses),
        ):
            writer = Writer(gws, http, rooms, keyed=True, give_up=give_up).start()
            await writer.until(before)
            print(f"{before} posts acknowledged: stop or switch the primary now", flush=True)
            await eventually(lambda: writer.failed, timeout=3600)
            refused = time.monotonic()
            print("posts refused (503): the outage began", flush=True)
            at = writer.count()
            await writer.until(at + after, timeout=give_up + 60)
            await writer.finish()
            back = min(
                a
                for a, status in zip(writer.acked_at, writer.statuses, strict=True)
                if a > refused and status == 201
            )
            await delivered_in_order_once(writer, wss, sses)
            print(
                f"posts refused for {back - refused:.2f} s (first 503 to the first new "
                f"message stored); {writer.count()} posts acknowledged, "
                f"{len(writer.failed)} answers 503 retried with their key, "
                f"{writer.count(200)} retries answered with the message already stored; "
                "every subscriber got every acknowledged message in order, once"
            )
    finally:
        await delete_prefix(prefix, REDIS_URL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database_url")
    parser.add_argument(
        "--before",
        type=int,
        default=30,
        help="posts acknowledged before you are asked to fail over",
    )
    parser.add_argument(
        "--after",
        type=int,
        default=30,
        help="posts acknowledged after the outage before the checks",
    )
    parser.add_argument(
        "--give-up",
        type=float,
        default=300,
        help="seconds one post is retried before the drill fails",
    )
    args = parser.parse_args()
    asyncio.run(drill(args.database_url, args.before, args.after, args.give_up))


if __name__ == "__main__":
    main()

"""Fan-out through one Redis against a three-primary Redis Cluster, measured.

Starts its own redis-server and its own three-primary cluster on free
loopback ports, then for each broker: one subscribing broker holds ROOMS room
channels, PUBLISHERS tasks publish MESSAGES payloads round-robin over the
rooms, and the time until the subscriber has them all gives messages/s. For
the cluster it also reads the cluster bus counters: how many copies of each
message the primaries sent each other, for sharded (SPUBLISH) and for plain
cluster-wide PUBLISH.

    python -m bench.cluster_pubsub [--rooms 60] [--messages 20000] [--publishers 16]

Figures depend on the machine: the cluster's three redis-servers share its
cores, so on a small machine this shows the cost of the cluster path, not the
capacity of three machines.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from chat_gateway.pubsub.base import Broker
from chat_gateway.pubsub.cluster import ClusterBroker
from chat_gateway.pubsub.redis import RedisBroker
from tests.harness import RedisClusterServers, RedisServer


async def fanout(
    broker: Broker, publisher: Broker, rooms: int, messages: int, publishers: int
) -> float:
    got = 0
    done = asyncio.Event()

    def on_message(channel: str, data: bytes) -> None:
        nonlocal got
        got += 1
        if got == messages:
            done.set()

    broker.on_message(on_message)
    channels = [f"bench:room:{{r{i}}}" for i in range(rooms)]
    for ch in channels:
        await broker.subscribe(ch)
    await asyncio.sleep(0.2)
    payload = b"m:1:1:" + b"x" * 200

    async def publish(k: int) -> None:
        for n in range(k, messages, publishers):
            await publisher.publish(channels[n % rooms], payload)

    t0 = time.perf_counter()
    await asyncio.gather(*(publish(k) for k in range(publishers)))
    await asyncio.wait_for(done.wait(), 120)
    return messages / (time.perf_counter() - t0)


def bus_sent(cluster: RedisClusterServers) -> int:
    total = 0
    for i in range(len(cluster.nodes)):
        for line in cluster.info(i, "cluster", "info").splitlines():
            if line.startswith(
                ("cluster_stats_messages_publish_sent", "cluster_stats_messages_publishshard_sent")
            ):
                total += int(line.split(":")[1])
    return total


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rooms", type=int, default=60)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--publishers", type=int, default=16)
    args = ap.parse_args()
    single = RedisServer()
    single.start()
    cluster = RedisClusterServers(3).start()
    try:
        results = {}
        for name, make in (
            ("one redis-server, PUBLISH", lambda: RedisBroker(single.url)),
            ("3-primary cluster, SPUBLISH", lambda: ClusterBroker(cluster.url)),
        ):
            sub, pub = make(), make()
            await sub.start()
            await pub.start()
            try:
                await asyncio.wait_for(sub.connected.wait(), 10)  # type: ignore[attr-defined]
                before = bus_sent(cluster)
                rate = await fanout(sub, pub, args.rooms, args.messages, args.publishers)
                bus = (bus_sent(cluster) - before) / args.messages
                results[name] = rate
                print(
                    f"{name:32s} {rate:9.0f} msg/s delivered"
                    + (f"   {bus:.2f} bus copies/msg" if "cluster" in name else "")
                )
            finally:
                await sub.close()
                await pub.close()
        # Plain PUBLISH on a cluster is broadcast over the bus to every node.
        pub = ClusterBroker(cluster.url)
        await pub.start()
        try:
            before = bus_sent(cluster)
            for i in range(1000):
                await pub.redis.publish(f"bench:room:{{r{i % args.rooms}}}", b"x")
            print(
                f"{'3-primary cluster, PUBLISH':32s} {'':9s}"
                f"   {(bus_sent(cluster) - before) / 1000:.2f} bus copies/msg"
            )
        finally:
            await pub.close()
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    asyncio.run(main())

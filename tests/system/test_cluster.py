"""The gateway on a real three-primary Redis Cluster of the test's own.

Rooms are picked so that their slots land on every primary. Fan-out uses
sharded Pub/Sub: one subscriber connection per primary per instance, channels
regrouped by owner after a restart or a slot move, with the gap filled from
the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.crc import key_slot

from chat_gateway.access.ratelimit import RateLimiter
from chat_gateway.config import Rate
from chat_gateway.pubsub import BrokerUnavailable
from chat_gateway.pubsub.cluster import ClusterBroker
from chat_gateway.storage import RedisHistoryCache, create_store
from tests.harness import Instance, RedisClusterServers, WSClient, eventually, instances, post, t


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(3)
    try:
        yield servers.start()
    finally:
        servers.stop()


def rooms_by_node(
    cluster: RedisClusterServers, per_node: int, stem: str = "room-"
) -> list[list[str]]:
    """``per_node`` room names for each primary, by where the room's hash tag falls."""
    ranges = cluster.slot_ranges()
    found: dict[int, list[str]] = {n: [] for _first, _last, n in ranges}  # primaries only
    for i in itertools.count():
        name = f"{stem}{i}"
        slot = key_slot(name.encode())
        node = next(n for first, last, n in ranges if first <= slot <= last)
        if len(found[node]) < per_node:
            found[node].append(name)
        if all(len(f) == per_node for f in found.values()):
            return [found[n] for n in sorted(found)]
    raise AssertionError("unreachable")


def channel(room: str) -> str:
    return f"t:room:{{{room}}}"


def shard_channels(cluster: RedisClusterServers, i: int) -> set[str]:
    return set(cluster.info(i, "pubsub", "shardchannels").split())


def cluster_stat(cluster: RedisClusterServers, i: int, name: str) -> int:
    for line in cluster.info(i, "cluster", "info").splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":")[1])
    return 0


# -- the broker on its own -------------------------------------------------------------


async def test_one_link_per_primary_and_messages_stay_in_their_shard(cluster):
    rooms = rooms_by_node(cluster, 2)
    got: list[tuple[str, bytes]] = []
    broker = ClusterBroker(cluster.url, probe_interval=0.5)
    broker.on_message(lambda ch, data: got.append((ch, data)))
    await broker.start()
    try:
        await asyncio.wait_for(broker.placed.wait(), t(10))
        for room in itertools.chain.from_iterable(rooms):
            await broker.subscribe(channel(room))
        # one connection per primary, carrying exactly that primary's rooms
        ports = [n.port for n in cluster.nodes]
        assert broker.links == {
            f"127.0.0.1:{ports[i]}": {channel(r) for r in rooms[i]} for i in range(3)
        }
        for i in range(3):
            assert shard_channels(cluster, i) == {channel(r) for r in rooms[i]}

        sent = []
        for room in itertools.chain.from_iterable(rooms):
            for k in range(3):
                sent.append((channel(room), f"{room}/{k}".encode()))
                await broker.publish(*sent[-1])
        await eventually(lambda: len(got) >= len(sent))
        # one publisher, one link per shard: the order is kept per channel (links to
        # different shards may interleave with each other)
        assert sorted(got) == sorted(sent)
        for ch in {c for c, _ in sent}:
            assert [d for c, d in got if c == ch] == [d for c, d in sent if c == ch]
        # SPUBLISH stays in the shard: nothing was broadcast over the cluster bus
        assert all(
            cluster_stat(cluster, i, "cluster_stats_messages_publish_sent") == 0 for i in range(3)
        )

        # the last room of a primary gone: its link goes, the others stay
        for room in rooms[1]:
            await broker.unsubscribe(channel(room))
        assert set(broker.links) == {f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[2]}"}
        await eventually(lambda: not shard_channels(cluster, 1))
        assert broker.reconnects == 0
    finally:
        await broker.close()


async def test_restart_and_slot_move_regroup_channels_and_report_a_reconnect(cluster):
    rooms = rooms_by_node(cluster, 2)
    got: list[tuple[str, bytes]] = []
    reconnects: list[int] = []
    broker = ClusterBroker(cluster.url, probe_interval=0.5)
    broker.on_message(lambda ch, data: got.append((ch, data)))
    broker.on_reconnect(lambda: reconnects.append(broker.reconnects))
    await broker.start()
    try:
        await asyncio.wait_for(broker.placed.wait(), t(10))
        for room in itertools.chain.from_iterable(rooms):
            await broker.subscribe(channel(room))
        reconnects.clear()
        ports = [n.port for n in cluster.nodes]

        # a primary restarts: its link is rebuilt, the others are kept as they are
        kept = {
            name: broker._links[name] for name in broker.links if name != f"127.0.0.1:{ports[2]}"
        }
        cluster.restart(2)
        await eventually(lambda: reconnects and broker.connected.is_set(), timeout=20)
        assert {name: broker._links[name] for name in kept} == kept
        assert shard_channels(cluster, 2) == {channel(r) for r in rooms[2]}
        await broker.publish(channel(rooms[2][0]), b"after restart")
        await eventually(lambda: (channel(rooms[2][0]), b"after restart") in got)

        # a slot moves from primary 0 to primary 1: the server ends the channel
        # there (sunsubscribe), and it is resubscribed on its new owner
        moved = rooms[0][0]
        slot = str(key_slot(moved.encode()))
        ids = [cluster.info(i, "cluster", "myid").strip() for i in range(3)]
        cluster.info(1, "cluster", "setslot", slot, "importing", ids[0])
        cluster.info(0, "cluster", "setslot", slot, "migrating", ids[1])
        for i in range(3):
            cluster.info(i, "cluster", "setslot", slot, "node", ids[1])
        before = len(reconnects)
        await eventually(lambda: len(reconnects) > before and broker.connected.is_set(), timeout=20)
        assert broker.links[f"127.0.0.1:{ports[1]}"] == {channel(r) for r in [moved, *rooms[1]]}
        assert broker.links[f"127.0.0.1:{ports[0]}"] == {channel(rooms[0][1])}
        await broker.publish(channel(moved), b"after move")
        await eventually(lambda: (channel(moved), b"after move") in got)
    finally:
        await broker.close()


async def test_cache_and_rate_limit_keys_work_across_shards(cluster, tmp_path):
    rooms = [r for group in rooms_by_node(cluster, 1) for r in group]
    broker = ClusterBroker(cluster.url)
    store = create_store(f"sqlite:///{tmp_path}/m.db")
    await broker.start()
    await store.start()
    await store.migrate()
    try:
        cache = RedisHistoryCache(store, broker.context, prefix="t:")
        for n, room in enumerate(rooms, 1):
            for k in range(n):
                await cache.committed((await store.append(room, "a", f"m{k}"))[0])
        # one pipeline of GETs over three shards; the store is not asked
        await store.append(rooms[0], "a", "not cached")
        assert await cache.latest_seqs(rooms) == {room: n for n, room in enumerate(rooms, 1)}
        # the history script touches a room's two keys, in one slot
        page = await cache.history(rooms[2])
        assert [m.text for m in page.messages] == ["m0", "m1", "m2"]
        assert (await cache.history(rooms[2])).messages == page.messages  # from the cache

        limiter = RateLimiter(broker.context, prefix="t:", rates={"post": Rate(2, 60)})
        decisions = [await limiter.hit("post", f"user-{i % 3}") for i in range(9)]
        assert [d.allowed for d in decisions] == [True] * 6 + [False] * 3
        assert not limiter.fallback  # decided by the shared buckets on the cluster
        assert (
            await broker.context.client.exists(*(f"t:rl:post:{{user-{i}}}" for i in range(3))) == 3
        )
    finally:
        await store.close()
        await broker.close()


async def test_a_down_primary_is_skipped_alone(cluster, tmp_path):
    """After a call to a dead primary fails, the cache and rate limiter fall back at
    once for its keys (store reads, local buckets) while the other shards' keys
    keep using the cluster."""
    (down,), (up,), _ = rooms_by_node(cluster, 1)
    broker = ClusterBroker(cluster.url)
    store = create_store(f"sqlite:///{tmp_path}/m.db")
    await broker.start()
    await store.start()
    await store.migrate()
    outcomes: list[tuple[str, str]] = []

    class Outcomes:
        room = ""

        def cache(self, outcome: str) -> None:
            outcomes.append((self.room, outcome))

    seen = Outcomes()
    try:
        await asyncio.wait_for(broker.placed.wait(), t(10))
        guard = broker.context.guard
        assert guard is not None
        cache = RedisHistoryCache(store, broker.context, prefix="t:", metrics=seen)
        limiter = RateLimiter(broker.context, prefix="t:", rates={"post": Rate(2, 60)})
        for room in (down, up):
            await cache.committed((await store.append(room, "a", f"in {room}"))[0])
            await cache.history(room)  # warm
        outcomes.clear()

        cluster.nodes[0].stop()
        for room in (down, up, down, up, down):
            seen.room = room
            page = await cache.history(room)
            assert [m.text for m in page.messages] == [f"in {room}"]
        # one failure on the dead shard, then no more calls to it; the live one hits
        assert outcomes == [(down, "error"), (up, "hit"), (up, "hit")]
        assert not guard.usable(cache._keys(down)[0]) and guard.usable(cache._keys(up)[0])
        # the position check's read: the dead shard's room from the store, alone
        await store.append(up, "a", "not raised")  # the cache still says 1 for it
        assert await cache.latest_seqs([down, up]) == {down: 1, up: 1}

        # buckets: the dead shard's identity is limited locally, the live one's shared,
        # though its shard never had the script (no SCRIPT LOAD to every primary)
        for who in (down, up):
            assert [(await limiter.hit("post", who)).allowed for _ in range(3)] == [
                True,
                True,
                False,
            ]
        assert limiter.fallback
        assert await broker.context.client.exists(limiter.key("post", up)) == 1

        # publishing is still tried on the dead shard (see ClusterBroker.publish)
        with pytest.raises(BrokerUnavailable, match="publish failed"):
            await broker.publish(channel(down), b"x")
        await broker.publish(channel(up), b"y")
    finally:
        await store.close()
        await broker.close()


# -- gateways on the cluster -------------------------------------------------------------


class Traffic:
    """Gateways on a cluster, a WS subscriber per gateway on every room, and the
    posts made so far: rounds post to every room, spread over the gateways."""

    def __init__(self, gws: list[Instance], http: httpx.AsyncClient, rooms: list[str]) -> None:
        self.gws, self.http, self.rooms = gws, http, rooms
        self.sent = {room: 0 for room in rooms}
        self.wss: list[WSClient] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def on(
        cls, cluster: RedisClusterServers, pg_url: str, rooms: list[str], n: int, **env: str
    ) -> AsyncIterator[Traffic]:
        env = {
            "DATABASE_URL": pg_url,
            "REDIS_URL": cluster.url,
            "KEY_PREFIX": "cg:",
            "RATE_LIMIT": "100000/1s",
            "CONNECT_RATE_LIMIT": "100000/1s",
            "PUBLISH_RATE_LIMIT": "100000/1s",
            "SUBSCRIBE_RATE_LIMIT": "100000/1s",
            "LOG_LEVEL": "warning",
            "BROKER_PROBE_INTERVAL": "0.5",
            **env,
        }
        async with (
            instances(n, env) as gws,
            httpx.AsyncClient(timeout=30) as http,
            contextlib.AsyncExitStack() as stack,
        ):
            traffic = cls(gws, http, rooms)
            for g in gws:
                ws = await stack.enter_async_context(WSClient.connect(g.ws_url))
                for room in rooms:
                    assert (await ws.subscribe(room))["seq"] == 0
                traffic.wss.append(ws)
            yield traffic

    async def round(self, tag: str, k: int = 0) -> None:
        for i, room in enumerate(self.rooms):
            r = await post(self.http, self.gws[(i + k) % len(self.gws)].url, room, tag)
            assert r.status_code == 201, r.text  # the store is the truth
            self.sent[room] += 1
            assert r.json()["seq"] == self.sent[room]

    async def all_delivered(self) -> None:
        for ws in self.wss:
            for room in self.rooms:
                assert await ws.messages(room, self.sent[room], timeout=30) == list(
                    range(1, self.sent[room] + 1)
                ), f"room {room}"

    async def delivered_once_and_history_agrees(self) -> None:
        await self.all_delivered()
        await asyncio.sleep(t(1))  # and nothing arrives twice later
        for ws in self.wss:
            for room in self.rooms:
                assert ws.seqs(room) == list(range(1, self.sent[room] + 1))
        # history (through the cluster cache) agrees on every instance
        for g, room in zip(itertools.cycle(self.gws), self.rooms):
            page = (await self.http.get(f"{g.url}/v1/rooms/{room}/messages")).json()
            assert [m["seq"] for m in page["messages"]] == list(range(1, self.sent[room] + 1))
        for g in self.gws:
            ready = await self.http.get(f"{g.url}/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["broker"]["ok"]


async def test_gateways_deliver_in_order_once_across_shards_while_a_primary_restarts(
    cluster, pg_url
):
    rooms = list(itertools.chain.from_iterable(rooms_by_node(cluster, 2)))
    # No periodic position check: the refill after a restored link must do it.
    async with Traffic.on(cluster, pg_url, rooms, 3, POSITION_INTERVAL="600") as traffic:
        for k in range(2):
            await traffic.round("before", k)
        await traffic.all_delivered()
        # Primary 1 goes down: posts are still committed, their live copies
        # to its rooms are lost, and it comes back empty (no seq keys for the
        # position check to notice): only the refill after the links are
        # restored can deliver the last ones.
        cluster.nodes[1].stop()
        await traffic.round("during")
        for g in traffic.gws:  # the other shards serve: every instance stays ready
            assert (await traffic.http.get(f"{g.url}/readyz")).status_code == 200
        cluster.nodes[1].start()
        await traffic.all_delivered()
        for k in range(2):
            await traffic.round("after", k)
        await traffic.delivered_once_and_history_agrees()


async def test_gateways_deliver_in_order_once_while_a_replica_takes_over(pg_url):
    """Production's layout: each primary has a replica. A primary is killed for
    good; its replica is promoted, and every subscriber still gets every room's
    messages in order, once, with history agreeing afterwards."""
    cluster = RedisClusterServers(3, node_timeout_ms=1000, replicas=1).start()
    try:
        primaries = sorted({n for *_, n in cluster.slot_ranges()})
        rooms = list(itertools.chain.from_iterable(rooms_by_node(cluster, 1)))
        async with Traffic.on(cluster, pg_url, rooms, 2, POSITION_INTERVAL="1") as traffic:
            await traffic.round("before")
            cluster.nodes[primaries[0]].stop()  # for good; it owns rooms[0]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + t(30)
            # posts keep being committed while the replica is promoted
            while not any(
                cluster.role(i) == "master" for i in range(len(cluster.nodes)) if i not in primaries
            ):
                assert loop.time() < deadline, "no replica was promoted"
                await traffic.round("during")
                await asyncio.sleep(0.2)
            for k in range(2):
                await traffic.round("after", k)
            await traffic.delivered_once_and_history_agrees()
    finally:
        cluster.stop()

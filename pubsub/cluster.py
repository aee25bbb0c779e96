"""Redis Cluster broker: sharded Pub/Sub (SSUBSCRIBE / SPUBLISH, Redis 7+).

A room's channel carries the room as its hash tag, so it lives in one slot and
SPUBLISH sends each message only through the shard that owns that slot, not
across the whole cluster as plain PUBLISH would.

This instance keeps one subscriber connection per primary that owns a held
channel (a ``_Link``), never one per room. Channels are placed by the slot map
of the ``RedisCluster`` client that also serves publishing and keys (cache,
rate limits). A link is probed like the single-Redis one (PING after
``probe_interval`` of silence). When a link fails (the node died or
restarted), the node answers MOVED, or the server ends a channel with a
``sunsubscribe`` push (its slot moved), the supervisor re-reads the slot map,
regroups the held channels by owner, resubscribes only what changed (links to
healthy nodes keep their channels), and calls ``on_reconnect`` so the gateway
fills from the store whatever was published meanwhile.

URL: ``redis+cluster://[user:password@]host:port[,host:port…][/0]``
(``rediss+cluster://`` for TLS). The listed nodes are only the starting
points; the rest of the cluster is discovered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from pubsub.base import Broker, BrokerUnavailable, RedisGuard
from pubsub.urls import credentials, hosts

log = logging.getLogger("pubsub.cluster")

SCHEMES = ("redis+cluster://", "rediss+cluster://")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2[/0]`` -> (startup nodes, connection options)."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    if "?" in rest:
        raise ValueError("REDIS_URL: query options are not supported for redis+cluster://")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    userinfo, _, host_list = netloc.rpartition("@")
    options: dict[str, Any] = {"ssl": scheme == "rediss+cluster", **credentials(userinfo)}
    nodes = hosts(host_list, 6379)
    if not nodes:
        raise ValueError("REDIS_URL: redis+cluster:// needs at least one host:port")
    return nodes, options


class _ChannelMoved(RedisError):
    """The server ended a channel we still hold: its slot now lives elsewhere."""


class _Link:
    """One subscriber connection to one primary, for the held channels it owns."""

    def __init__(self, broker: ClusterBroker, name: str, host: str, port: int) -> None:
        self.broker = broker
        self.name = name
        self.client = aioredis.Redis(
            host=host,
            port=port,
            socket_connect_timeout=broker.connect_timeout,
            socket_timeout=broker.command_timeout,
            # A dropped link must surface, not reconnect
            # quietly: what was published meanwhile is lost.
            retry=Retry(NoBackoff(), 0),
            **broker.conn_options,
        )
        self.pubsub: Any = self.client.pubsub()
        self.channels: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.dead = False

    async def sync(self, channels: set[str]) -> None:
        """Hold exactly ``channels`` on this link: one SSUBSCRIBE per slot (the server
        wants one slot per command), one SUNSUBSCRIBE for what left."""
        gone, new = self.channels - channels, channels - self.channels
        self.channels = set(channels)
        if gone:
            await self.pubsub.sunsubscribe(*sorted(gone))
        by_slot: dict[int, list[str]] = defaultdict(list)
        for channel in sorted(new):
            by_slot[self.broker.redis.keyslot(channel)].append(channel)
        for group in by_slot.values():
            await self.pubsub.ssubscribe(*group)
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"broker-link-{self.name}")

    async def _run(self) -> None:
        try:
            await self._read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.dead = True
            self.broker._link_failed(self, exc)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        probe_interval = self.broker.probe_interval
        last_seen = loop.time()
        probe_sent: float | None = None
        while True:
            msg = await self.pubsub.get_message(timeout=min(0.5, probe_interval))
            now = loop.time()
            if msg is not None:
                last_seen = now
                probe_sent = None
                kind = msg["type"]
                if isinstance(kind, bytes):
                    kind = kind.decode()
                channel = msg["channel"]
                if isinstance(channel, bytes):
                    channel = channel.decode()
                if kind == "smessage":
                    if channel in self.broker._control:
                        self.broker.on_control(msg["data"])
                    else:
                        self.broker.on_message(channel, msg["data"])
                elif kind == "sunsubscribe" and channel in self.channels:
                    raise _ChannelMoved(f"server ended {channel}: its slot moved")
                continue
            if probe_sent is None and now - last_seen >= probe_interval:
                await self.pubsub.ping()
                probe_sent = now
            elif probe_sent is not None and now - probe_sent > self.broker.probe_timeout:
                raise RedisConnectionError("subscriber link silent: no PONG to the probe")

    async def close(self) -> None:
        self.dead = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for closer in (self.pubsub.aclose, self.client.aclose):
            try:
                await asyncio.wait_for(closer(), 1.0)
            except (TimeoutError, RedisError, OSError):
                pass


class ShardGuard(RedisGuard):
    """A cooldown per primary: after a call to one shard fails, the cache, rate
    limiter and presence fall back at once for ``cooldown`` seconds for keys on
    that shard, and use the other shards as before. (Publishes are not skipped:
    see :meth:`ClusterBroker.publish`.)"""

    def __init__(self, broker: ClusterBroker, cooldown: float = 1.0) -> None:
        super().__init__(cooldown)
        self._broker = broker

    def shard(self, key: str | None) -> str:
        client = self._broker._client
        if key is None or client is None:
            return ""
        try:
            return str(client.nodes_manager.get_node_from_slot(client.keyslot(key)).name)
        except (RedisError, LookupError, AttributeError):  # the slot map is not read yet
            return ""


class ClusterBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        control_channel: str = "",
    ) -> None:
        super().__init__()
        if probe_interval <= 0:
            raise ValueError("probe_interval must be positive")
        self.startup_nodes, self.conn_options = parse_cluster_url(url)
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout or max(1.0, probe_interval)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.control_channel = control_channel
        # Held on a link like a room's channel, from start to close (server API commands).
        self._control = {control_channel} if control_channel else set()
        self._client: RedisCluster | None = None
        self._channels: set[str] = set()
        self._links: dict[str, _Link] = {}
        self._lock = asyncio.Lock()  # one change of placement at a time
        self._trouble = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # every held channel is placed on a live link
        self.placed = asyncio.Event()  # placed at least once since start
        self.guard: RedisGuard = ShardGuard(self)

    @property
    def redis(self) -> RedisCluster:
        if self._client is None:
            raise BrokerUnavailable("the broker is not started")
        return self._client

    @property
    def links(self) -> dict[str, set[str]]:
        """Node name -> channels held on this instance's link to it (for tests and stats)."""
        return {name: set(link.channels) for name, link in self._links.items() if not link.dead}

    async def start(self) -> None:
        # Like the single-Redis broker, no failure here when the cluster is down:
        # the supervisor keeps trying and /readyz reports the broker meanwhile.
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes],
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.command_timeout,
            # One quick retry (a stale pooled connection), no more: a call to a shard
            # that is down fails in well under a second instead of stalling the
            # post (the store is the truth and fills the live copy); a failover
            # takes longer than any retry would wait.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            **self.conn_options,
        )
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
        self.connected.clear()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- placement -----------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 0.05
        first = True
        warned = False
        while True:
            try:
                await self.redis.initialize()
                if not first:
                    # A failover, restart or slot move: read the owners again.
                    await self.redis.nodes_manager.initialize()
                self._trouble.clear()
                await self._place()
                self.guard.reset()
                self.connected.set()
                self.placed.set()
                if not first:
                    self.reconnects += 1
                    log.warning(
                        "broker links restored; %d channels on %d nodes",
                        len(self._channels),
                        len(self._links),
                    )
                if not first or self._channels:
                    self.on_reconnect()
                first = False
                backoff = 0.05
                await self._trouble.wait()
                self.connected.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():
                    log.warning("broker cluster unreachable: %r", exc)
                elif first and not warned:  # once, until the cluster first answers
                    warned = True
                    log.warning(
                        "Redis Cluster at %s is unreachable at start (%s); running "
                        "degraded until it answers (/readyz reports the broker)",
                        ",".join(f"{h}:{p}" for h, p in self.startup_nodes),
                        exc,
                    )
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _link_failed(self, link: _Link, exc: Exception) -> None:
        log.warning("broker link to %s lost: %r", link.name, exc)
        self._trouble.set()

    def _owner(self, channel: str) -> ClusterNode:
        return self.redis.nodes_manager.get_node_from_slot(self.redis.keyslot(channel))

    async def _place(self) -> None:
        """Group the held channels by owning primary and bring every link to its group."""
        async with self._lock:
            placed: set[str] | None = None
            while placed != self._channels:  # again if (un)subscribed meanwhile
                placed = set(self._channels)
                await self._place_once(placed | self._control)

    async def _place_once(self, channels: set[str]) -> None:
        groups: dict[str, set[str]] = defaultdict(set)
        nodes: dict[str, ClusterNode] = {}
        for channel in channels:
            node = self._owner(channel)
            groups[node.name].add(channel)
            nodes[node.name] = node
        for name, link in list(self._links.items()):
            if link.dead or name not in groups:
                del self._links[name]
                await link.close()
        for name, group in groups.items():
            held = self._links.get(name)
            if held is None:
                held = self._links[name] = _Link(
                    self, name, nodes[name].host, int(nodes[name].port)
                )
            try:
                await held.sync(group)
            except BaseException:
                del self._links[name]
                await held.close()
                raise

    async def subscribe(self, channel: str) -> None:
        if channel in self._channels:
            return
        self._channels.add(channel)
        await self._apply()

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        await self._apply()

    async def _apply(self) -> None:
        if not self.connected.is_set():
            return  # the supervisor places the channel set when the cluster is back
        try:
            await self._place()
        except Exception as exc:
            log.warning("broker placement failed: %r", exc)
            self._trouble.set()

    async def publish(self, channel: str, data: bytes) -> None:
        """Always tried, guard or not: a shard that restarts comes back without its
        seq keys, so the position check cannot see what a skipped publish left
        out; only the refill at the next link restoration could, and a shard that
        answers again before its link is ever seen down gives none."""
        try:
            await self.redis.spublish(channel, data)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis Cluster publish failed: {exc!r}") from exc

    async def publish_control(self, data: bytes) -> None:
        if not self.control_channel:
            raise BrokerUnavailable("no control channel is configured")
        await self.publish(self.control_channel, data)

    async def ping(self) -> None:
        """Any primary answering is enough: one shard down does not make the
        instance unready, since the other shards' rooms are served and its own
        rooms are filled from the store. The primaries are asked at once."""
        try:
            await self.redis.initialize()
            answers = await asyncio.gather(
                *(self.redis.ping(target_nodes=node) for node in self.redis.get_primaries()),
                return_exceptions=True,
            )
        except (RedisError, OSError) as exc:
            answers = [exc]
        if not any(answer is True for answer in answers):
            raise BrokerUnavailable(f"Redis Cluster unreachable: {answers!r}")
        if not self.placed.is_set():
            raise BrokerUnavailable("Redis Cluster answers, but the subscriber links are not up")

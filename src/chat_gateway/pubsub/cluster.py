"""Redis Cluster broker: sharded Pub/Sub (SSUBSCRIBE / SPUBLISH, Redis 7+).

A room's channel carries the room as its hash tag, so it lives in one slot and
SPUBLISH sends each message only through the shard that owns that slot, not
across the whole cluster as plain PUBLISH would.

This instance keeps one subscriber connection per primary that owns a held
channel (a ``_ShardSubscription``), never one per room. Channels are placed by the slot map
of the ``RedisCluster`` client that also serves publishing and keys (cache,
rate limits). Links are kept up and probed by the loop the single-Redis
broker uses too (:mod:`chat_gateway.pubsub.link`). When a link fails (the node died or
restarted), the node answers MOVED, or the server ends a channel with a
``sunsubscribe`` push (its slot moved), that loop re-reads the slot map,
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

from redis.asyncio.cluster import ClusterNode
from redis.exceptions import RedisError

from chat_gateway.pubsub.base import BrokerUnavailable
from chat_gateway.pubsub.link import LinkedBroker
from chat_gateway.redisio.clients import node_client
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.pipelined import Subscription
from chat_gateway.redisio.urls import parse_cluster_url


class _ChannelMoved(RedisError):
    """The server ended a channel we still hold: its slot now lives elsewhere."""


class _ShardSubscription:
    """One subscriber connection to one primary, for the held channels it owns."""

    __slots__ = ("broker", "name", "client", "link", "channels", "task", "dead")

    def __init__(self, broker: ClusterBroker, name: str, host: str, port: int) -> None:
        self.broker = broker
        self.name = name
        self.client = node_client(
            host,
            port,
            broker.conn_options,
            connect_timeout=broker.connect_timeout,
            command_timeout=broker.command_timeout,
        )
        self.link = Subscription(self.client, self._received, timeout=broker.command_timeout)
        self.channels: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.dead = False

    async def sync(self, channels: set[str]) -> None:
        """Hold exactly ``channels`` on this link: one SSUBSCRIBE per slot (the server
        wants one slot per command), one SUNSUBSCRIBE for what left; returns once the
        node has them."""
        await self.link.open()
        gone, new = self.channels - channels, channels - self.channels
        self.channels = channels
        if gone:
            self.link.send("SUNSUBSCRIBE", *sorted(gone))
        by_slot: dict[int, list[str]] = defaultdict(list)
        for channel in sorted(new):
            by_slot[self.broker._redis.keyslot(channel)].append(channel)
        for group in by_slot.values():
            self.link.send("SSUBSCRIBE", *group)
        await self.link.synced()
        self._watch()

    async def add(self, channel: str) -> None:
        """Hold one more channel (it lives on this link's node)."""
        await self.link.open()
        if channel not in self.channels:
            self.channels.add(channel)
            self.link.send("SSUBSCRIBE", channel)
        self._watch()

    async def remove(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.link.send("SUNSUBSCRIBE", channel)

    def _watch(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"broker-link-{self.name}")

    async def _run(self) -> None:
        broker = self.broker
        try:
            await self.link.hold(broker.probe_interval, broker.probe_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.dead = True
            broker._link_failed(self, exc)

    def _received(self, push: list[Any]) -> None:
        kind = push[0]
        if kind == b"smessage":
            channel = push[1].decode()
            if channel in self.broker._control:
                self.broker._on_control(push[2])
            else:
                self.broker._on_message(channel, push[2])
        elif kind == b"sunsubscribe" and push[1].decode() in self.channels:
            raise _ChannelMoved(f"server ended {push[1].decode()}: its slot moved")

    async def close(self) -> None:
        self.dead = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.link.close()
        try:
            await asyncio.wait_for(self.client.aclose(), 1.0)
        except (TimeoutError, RedisError, OSError):
            pass


class ClusterBroker(LinkedBroker):
    log = logging.getLogger("pubsub.cluster")
    what = "Redis Cluster"

    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        control_channel: str = "",
        context: RedisContext | None = None,
    ) -> None:
        """``context``: the cluster's client shared with the users of keys, its guard
        per shard (chat_gateway.redisio.context), started and closed by whoever made
        it; without one the broker makes its own from ``url``."""
        super().__init__(
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            control_channel=control_channel,
            context=context
            or RedisContext.for_url(
                url, connect_timeout=connect_timeout, command_timeout=command_timeout
            ),
            owns_context=context is None,
        )
        self.startup_nodes, self.conn_options = parse_cluster_url(url)
        # Held on a link like a room's channel, from start to close (server API commands).
        self._control = {control_channel} if control_channel else set()
        self._links: dict[str, _ShardSubscription] = {}
        self._lock = asyncio.Lock()  # one change of placement at a time
        self._trouble = asyncio.Event()

    @property
    def links(self) -> dict[str, set[str]]:
        """Node name -> channels held on this instance's link to it (for tests and stats)."""
        return {name: set(link.channels) for name, link in self._links.items() if not link.dead}

    async def start(self) -> None:
        await self._start_context()
        self._start_keeping()

    async def close(self) -> None:
        await self._stop_keeping()
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
        await self._close_context()

    # -- placement -----------------------------------------------------------

    async def _link(self, first: bool) -> None:
        await self._redis.initialize()
        if not first:
            # A failover, restart or slot move: read the owners again.
            await self._redis.nodes_manager.initialize()
        self._trouble.clear()
        await self._place()

    async def _hold(self) -> None:
        await self._trouble.wait()

    async def _unlink(self) -> None:
        """Nothing: after a failure the next placement keeps the live links and
        replaces the dead ones."""

    def _address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def _restored(self) -> str:
        return f"broker links restored; {len(self._channels)} channels on {len(self._links)} nodes"

    def _link_failed(self, link: _ShardSubscription, exc: Exception) -> None:
        self.log.warning("broker link to %s lost: %r", link.name, exc)
        self._trouble.set()

    def _owner(self, channel: str) -> ClusterNode:
        node: ClusterNode = self._redis.nodes_manager.get_node_from_slot(
            self._redis.keyslot(channel)
        )
        return node

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
                held = self._links[name] = _ShardSubscription(
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
        await self._apply(channel, True)

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        await self._apply(channel, False)

    async def _apply(self, channel: str, held: bool) -> None:
        """One channel onto (or off) the link to its owner, nothing else moved: a
        subscribe costs one SSUBSCRIBE, however many channels are held."""
        if not self.connected.is_set():
            return  # the link loop places the channel set when the cluster is back
        try:
            async with self._lock:
                if not self.connected.is_set():
                    return  # a placement failed meanwhile; the next one places it
                if held == (channel in self._channels):  # not undone while waiting
                    await (self._add if held else self._remove)(channel)
        except Exception as exc:
            self.log.warning("broker placement failed: %r", exc)
            self._trouble.set()

    async def _add(self, channel: str) -> None:
        node = self._owner(channel)
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = _ShardSubscription(
                self, node.name, node.host, int(node.port)
            )
        elif link.dead:
            return  # its failure brings a new placement, which places the channel
        try:
            await link.add(channel)
        except BaseException:
            del self._links[node.name]
            await link.close()
            raise

    async def _remove(self, channel: str) -> None:
        link = self._links.get(self._owner(channel).name)
        if link is None or channel not in link.channels:
            # Placed before the slot map last changed: look on every link.
            link = next((k for k in self._links.values() if channel in k.channels), None)
            if link is None:
                return
        if link.dead:
            return
        await link.remove(channel)
        if not link.channels:  # the last room of that primary: its link goes
            del self._links[link.name]
            await link.close()

    async def publish(self, channel: str, data: bytes) -> None:
        """Always tried, guard or not: a shard that restarts comes back without its
        seq keys, so the position check cannot see what a skipped publish left
        out; only the refill at the next link restoration could, and a shard that
        answers again before its link is ever seen down gives none."""
        try:
            await self._redis.spublish(channel, data)
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
            await self._redis.initialize()
            answers = await asyncio.gather(
                *(self._redis.ping(target_nodes=node) for node in self._redis.get_primaries()),
                return_exceptions=True,
            )
        except (RedisError, OSError) as exc:
            answers = [exc]
        if not any(answer is True for answer in answers):
            raise BrokerUnavailable(f"Redis Cluster unreachable: {answers!r}")
        if not self.placed.is_set():
            raise BrokerUnavailable("Redis Cluster answers, but the subscriber links are not up")

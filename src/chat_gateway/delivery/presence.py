"""Presence: who is in a room, across every instance.

Each instance counts its own connections per (room, user). The first local
connection of a user in a room adds a member ``<instance>:<user>`` to the
room's sorted set ``<prefix>{room}:presence`` (the ``{room}`` hash tag keeps it
in the room's cluster slot), scored with its expiry time; the last one removes
it. Every ``ttl / 3`` seconds the instance pushes the expiry of all its members
forward, so the members of an instance that crashed expire within ``ttl``
seconds. Readers only count members whose expiry is ahead.

A user *joins* a room when their first member appears anywhere and *leaves*
when their last member goes, by a clean close or by expiry. Both are announced
on the room's channel as ``p:{"room", "action", "user"}``; the hub turns that
into a ``presence`` frame (WS) or ``event: presence`` (SSE). Expired members
are swept, and their leaves announced, by every instance that holds
subscribers in the room, so someone who can see the leave announces it; the
sweep's ``ZREM`` decides which single instance announces each.

A clean leave is debounced: the member stays ``debounce`` seconds (at most
``ttl / 3``, so it cannot expire meanwhile) and goes only if the user did not
come back to the room on this instance in that time. Subscribe/unsubscribe
churn or a quick reconnect so announces nothing to the other members.

Joins and leaves go over the broker's pipelined connection, never one pooled
connection each: the leaves due in one loop turn (hundreds of sockets closed
at once end their debounce together) are swept in one round trip, as the
refresh's sweeps are, so a burst of disconnects costs no connection of the
pool that publishing, the cache and the rate limiter share.

With no Redis (``memory://``, one instance) the local counts are the truth.
Presence is best effort: a Redis error is logged and the refresh repairs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import NoScriptError

from chat_gateway.core.wire import encode_presence
from chat_gateway.delivery.online import Online
from chat_gateway.periodic import every
from chat_gateway.pubsub import Broker, BrokerUnavailable
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.pipelined import per_key
from chat_gateway.redisio.script import Script

log = logging.getLogger("gateway.presence")

# KEYS[1] the room's set; ARGV: member, user, expiry ms, now ms, key ttl ms.
# Returns 1 when the user was not present before (a join to announce).
_JOIN = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[4], '+inf')
local suffix = ':' .. ARGV[2]
local before = 0
for _, m in ipairs(live) do
  if m ~= ARGV[1] and string.sub(m, -#suffix) == suffix
     and string.find(m, ':', 1, true) == #m - #suffix + 1 then before = 1 end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if before == 1 then return 0 end
return 1
"""

# KEYS[1]; ARGV: member to remove ('' for none), now ms.
# Removes the member and every expired one; returns the users no longer present.
_LEAVE = """
local gone = {}
if ARGV[1] ~= '' and redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  table.insert(gone, ARGV[1])
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
for _, m in ipairs(expired) do
  if redis.call('ZREM', KEYS[1], m) == 1 then table.insert(gone, m) end
end
if #gone == 0 then return {} end
local present = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  present[string.sub(m, string.find(m, ':', 1, true) + 1)] = true
end
local out, seen = {}, {}
for _, m in ipairs(gone) do
  local user = string.sub(m, string.find(m, ':', 1, true) + 1)
  if not present[user] and not seen[user] then
    seen[user] = true
    table.insert(out, user)
  end
end
return out
"""


# Rooms whose presence sets one pipeline of the refresh works on.
REFRESH_BATCH = 500


class Presence:
    """Presence of this instance only (no Redis): its own connections, and the
    leaves still debounced. :class:`RedisPresence` shares it across instances; the
    gateway picks one at start-up."""

    def __init__(
        self,
        broker: Broker,
        *,
        prefix: str = "chat:",
        ttl: float = 30.0,
        channel: Callable[[str], str],
        held_rooms: Callable[[], Iterable[str]] = lambda: (),
        instance: str | None = None,
        debounce: float = 0.0,
        notify: Callable[[str, dict[str, Any]], None] | None = None,
        tracked: Callable[[str], bool] = lambda room: True,
        online: Online | None = None,
    ) -> None:
        self.broker = broker
        # Told of each user's and room's first and last connection here (the
        # user.online ... webhooks); none without webhooks.
        self.online = online if online is not None else Online(emit=None)
        # Whether a room has presence at all (NAMESPACES_FILE, presence = false: none).
        self.tracked = tracked
        self.prefix = prefix
        self.ttl = ttl
        self.channel = channel
        self.held_rooms = held_rooms
        self.instance = instance or uuid.uuid4().hex[:12]
        # Told of every announced change (webhooks: presence.joined / presence.left).
        # Told of each join and leave (the webhooks); by default nobody.
        self.notify = notify if notify is not None else _tell_nobody
        self.local: dict[str, dict[str, int]] = {}  # room -> user -> connections here
        self._held: dict[int, tuple[str, set[str]]] = {}  # connection id -> (user, rooms)
        self._task: asyncio.Task[None] | None = None
        # Within a third of the ttl, a member waiting to leave has not expired yet.
        self.debounce = min(debounce, ttl / 3)
        self._leaving: dict[tuple[str, str], asyncio.Task[None]] = {}  # (room, user)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        """Leave every room this instance holds (announced), then stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.debounce = 0.0  # from now on every leave goes at once
        for conn in list(self._held):
            await self.gone(conn)
        pending, self._leaving = self._leaving, {}
        for (room, user), task in pending.items():
            task.cancel()
            await self._depart(room, user)

    # -- connections -----------------------------------------------------------

    async def joined(self, conn: int, user: str | None, room: str) -> None:
        """Connection ``conn`` of ``user`` entered ``room`` (no-op for anonymous, and
        in a room without presence)."""
        if not user or not self.tracked(room):
            return
        if conn not in self._held:
            self._held[conn] = (user, set())
            await self.online.up("user", user)
        held = self._held[conn][1]
        if room in held:
            return
        held.add(room)
        if room not in self.local:
            await self.online.up("room", room)
        counts = self.local.setdefault(room, {})
        counts[user] = counts.get(user, 0) + 1
        if counts[user] > 1:
            return
        back = self._leaving.pop((room, user), None)
        if back is not None:
            back.cancel()  # back before the leave went out: to the others they never left
        new = await self._record_join(room, user)
        if back is None and new:
            await self._announce(room, "join", user)

    async def _record_join(self, room: str, user: str) -> bool:
        """Record that ``user`` is in ``room`` here; False when the room already had
        the user (nothing to announce)."""
        return True

    async def left(self, conn: int, room: str) -> None:
        entry = self._held.get(conn)
        if entry is None or room not in entry[1]:
            return
        user, held = entry
        held.discard(room)
        counts = self.local.get(room, {})
        counts[user] = counts.get(user, 1) - 1
        if counts[user] > 0:
            return
        counts.pop(user, None)
        if not counts:
            self.local.pop(room, None)
            await self.online.down("room", room)
        if self.debounce > 0:
            self._leaving[(room, user)] = asyncio.create_task(self._leave_later(room, user))
        else:
            await self._depart(room, user)

    async def _leave_later(self, room: str, user: str) -> None:
        await asyncio.sleep(self.debounce)
        if self._leaving.get((room, user)) is asyncio.current_task():
            del self._leaving[(room, user)]
            await self._depart(room, user)

    async def _depart(self, room: str, user: str) -> None:
        """The last local connection of ``user`` left ``room``: remove and announce
        (with the other departures of this loop turn, see :meth:`_sweep_many`)."""
        await self._announce(room, "leave", user)

    async def gone(self, conn: int) -> None:
        """Connection ``conn`` closed: leave every room it was in."""
        entry = self._held.get(conn)
        if entry is None:
            return
        for room in list(entry[1]):
            await self.left(conn, room)
        self._held.pop(conn, None)
        await self.online.down("user", entry[0])

    async def members(self, room: str) -> list[str]:
        # a leave still debounced is not gone yet
        return sorted(
            {*self.local.get(room, {}), *(user for r, user in self._leaving if r == room)}
        )

    async def _announce(self, room: str, action: str, user: str) -> None:
        self.notify(
            "presence.joined" if action == "join" else "presence.left",
            {"room": room, "user": user},
        )
        try:
            await self.broker.publish(self.channel(room), encode_presence(room, action, user))
        except BrokerUnavailable as exc:
            log.warning("presence %s not announced: %s", action, exc, extra={"room": room})


class RedisPresence(Presence):
    """Presence across every instance, in ``redis`` (chat_gateway.redisio.context):
    see the module docstring."""

    def __init__(self, broker: Broker, redis: RedisContext, **options: Any) -> None:
        """``options``: as :class:`Presence` takes them."""
        super().__init__(broker, **options)
        self.redis: Any = redis.client
        self.guard = redis.guard
        self.batch = redis.batch
        self._join = Script(self.redis, _JOIN)
        self._leave = Script(self.redis, _LEAVE)
        # The sweeps due this loop turn, (room, member), and when they are done.
        self._departing: tuple[list[tuple[str, str]], asyncio.Future[None]] | None = None

    def key(self, room: str) -> str:
        return f"{self.prefix}{{{room}}}:presence"

    def _member(self, user: str) -> str:
        return f"{self.instance}:{user}"

    async def start(self) -> None:
        self._task = every(self.ttl / 3, self.refresh, "presence refresh")

    async def _record_join(self, room: str, user: str) -> bool:
        if not self._redis_usable(self.key(room)):
            return True
        now = _ms()
        try:
            return bool(
                await self._join(
                    keys=[self.key(room)],
                    args=[
                        self._member(user),
                        user,
                        now + int(self.ttl * 1000),
                        now,
                        int(self.ttl * 2000),
                    ],
                    batch=self.batch,
                )
            )
        except Exception as exc:
            self._redis_failed(self.key(room))
            log.warning("presence join not recorded: %r", exc, extra={"room": room})
            return True

    async def _depart(self, room: str, user: str) -> None:
        """The last local connection of ``user`` left ``room``: remove and announce
        (with the other departures of this loop turn, see :meth:`_sweep_many`)."""
        if self._departing is None:
            loop = asyncio.get_running_loop()
            self._departing = ([], loop.create_future())
            loop.call_soon(self._send_departures)
        sweeps, done = self._departing
        sweeps.append((room, self._member(user)))
        await asyncio.shield(done)

    def _send_departures(self) -> None:
        if self._departing is None:
            return
        (sweeps, done), self._departing = self._departing, None
        task = asyncio.get_running_loop().create_task(self._sweep_many(sweeps))
        task.add_done_callback(lambda _task: _settle(done))

    async def members(self, room: str) -> list[str]:
        if not self.tracked(room):
            return []
        if not self._redis_usable(self.key(room)):
            raise ConnectionError("Redis failed moments ago")
        try:
            live = await self.redis.zrangebyscore(self.key(room), _ms(), "+inf")
        except Exception:
            self._redis_failed(self.key(room))
            raise
        users = {(m.decode() if isinstance(m, bytes) else m).split(":", 1)[1] for m in live}
        return sorted(users)

    # -- upkeep ----------------------------------------------------------------

    def _redis_usable(self, key: str) -> bool:
        return self.guard.usable(key)

    def _redis_failed(self, key: str) -> None:
        self.guard.failed(key)

    async def _sweep_many(self, sweeps: list[tuple[str, str]]) -> None:
        """Remove each ``(room, member)`` (member ``""``: none, only the expired ones)
        in pipelined batches, and announce the users no longer present. A room the
        guard skips, or whose call fails, is left: its members expire by themselves
        and a later sweep announces the leaves."""
        now = _ms()
        groups = [
            (self.key(room), [self._leave.command([self.key(room)], [member, now])])
            for room, member in sweeps
        ]
        results = await self._each_batch(groups)
        for (room, member), result in zip(sweeps, results, strict=True):
            if isinstance(result, NoScriptError):  # Redis lost its scripts: send the body
                try:
                    result = [await self._leave.again([self.key(room)], [member, now])]
                except Exception as exc:
                    result = exc
            if isinstance(result, BaseException):
                log.warning("presence leave not recorded: %r", result, extra={"room": room})
                continue
            for user in result[0]:
                await self._announce(
                    room, "leave", user.decode() if isinstance(user, bytes) else user
                )

    async def refresh(self) -> None:
        """Push this instance's expiries forward; sweep expired members of held rooms.

        Both go in pipelined batches of ``REFRESH_BATCH`` rooms. Expiries are pushed
        only where this instance has members; a held room is swept (the leave
        script, which also announces) only when a read of the batch found an
        expired member in it: most rooms have none, or no presence set at all."""
        now = _ms()
        expiry = now + int(self.ttl * 1000)
        groups = [
            (
                self.key(room),
                [
                    (
                        "ZADD",
                        self.key(room),
                        *(x for user in counts for x in (expiry, self._member(user))),
                    ),
                    ("PEXPIRE", self.key(room), int(self.ttl * 2000)),
                ],
            )
            for room, counts in self.local.items()
        ]
        failed = [r for r in await self._each_batch(groups) if isinstance(r, BaseException)]
        if failed:
            log.warning(
                "presence refresh failed for %d of %d rooms: %r",
                len(failed),
                len(groups),
                failed[0],
            )
        rooms = list(set(self.held_rooms()) | set(self.local))
        found = await self._each_batch(
            [
                (
                    self.key(room),
                    [("ZRANGEBYSCORE", self.key(room), "-inf", f"({now}", "LIMIT", 0, 1)],
                )
                for room in rooms
            ]
        )
        expired = [
            (room, "")
            for room, result in zip(rooms, found, strict=True)
            if not isinstance(result, BaseException) and result[0]
        ]
        if expired:
            await self._sweep_many(expired)

    async def _each_batch(self, groups: list[tuple[str, list[Any]]]) -> list[Any]:
        """per_key over ``REFRESH_BATCH`` keys at a time: each key's replies, or the
        exception that stopped it."""
        results: list[Any] = []
        for i in range(0, len(groups), REFRESH_BATCH):
            results += await per_key(
                self.redis,
                self.batch,
                self.guard,
                groups[i : i + REFRESH_BATCH],
            )
        return results


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _tell_nobody(kind: str, data: dict[str, Any]) -> None:
    pass


def _ms() -> int:
    return int(time.time() * 1000)

"""Who is online: ``user.online`` / ``user.offline`` and ``room.occupied`` /
``room.vacated``, sent to the webhooks through the outbox.

A *subject* is a user (online while they hold a connection in a room with
presence, on any instance) or a room (occupied while anyone is present in it).
Presence tells this module when the subject's first local connection comes
(``up``) and its last goes (``down``).

Across instances (Redis), per subject, under one hash tag:

- ``<prefix>{<kind>:<name>}:on``: sorted set of the instances holding the subject,
  scored with their expiry (pushed forward every ``PRESENCE_TTL / 3`` s, as the
  presence members are), so a crashed instance's membership ends within
  ``PRESENCE_TTL``;
- ``<prefix>{<kind>:<name>}:state``: hash of ``up`` (1 while online), ``n`` (the
  subject's transitions so far: the number each event carries, so a receiver can
  order them), ``due`` (when an offline is due, set by the last clean ``down``).

The first instance to arrive sends the online event (the script sees ``up`` unset).
Nobody sends the offline at the last ``down``: it is due ``PRESENCE_OFFLINE_AFTER``
seconds later, and every instance sweeps the due subjects (the index
``<prefix>online:due``, scored with when to look next); the claim script, atomic
on the subject's keys, finds the subject gone, flips ``up`` and counts the
transition, so exactly one instance sends each offline, and a subject that came
back meanwhile is not offline at all. A crashed instance's subjects come due when
their membership expires.

Each event goes to the outbox in a queue of its own subject (``@user/<name>``,
``@room/<name>``) at its transition number, written by the instance that decided
it: another instance may write transition ``n + 1`` before this one writes ``n``,
and the outbox holds ``n + 1`` back until ``n`` is there (``storage.outbox``), so
the receivers get one subject's transitions in order.

With no Redis (``memory://``, one instance) the local counts decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from chat_gateway.periodic import every
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.pipelined import per_key
from chat_gateway.redisio.script import Script

log = logging.getLogger("gateway.online")

# (kind, name) -> (event when it comes, event when it goes)
EVENTS = {"user": ("user.online", "user.offline"), "room": ("room.occupied", "room.vacated")}

# Subjects one sweep claims at most.
SWEEP_BATCH = 200

# An event for the webhooks: type, data, queue, position in the queue.
Emit = Callable[[str, dict[str, Any], str, int], Awaitable[None]]

# KEYS: on, state; ARGV: instance, expiry ms, key ttl ms.
# Returns the transition number when the subject came online, else 0.
_UP = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[2], 'due')
if redis.call('HGET', KEYS[2], 'up') == '1' then return 0 end
redis.call('HSET', KEYS[2], 'up', '1')
return redis.call('HINCRBY', KEYS[2], 'n', 1)
"""

# KEYS: on, state; ARGV: instance, now ms, due ms.
# Returns 1 when no instance holds the subject any more (an offline is now due).
_DOWN = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
if redis.call('HGET', KEYS[2], 'up') ~= '1' then return 0 end
redis.call('HSET', KEYS[2], 'due', ARGV[3])
return 1
"""

# KEYS: on, state; ARGV: now ms.
# {1, n}: the subject went offline now (transition n); {0, t}: look again at t ms;
# {0, -1}: nothing to watch.
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local live = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #live > 0 then return {0, tonumber(live[2])} end
if redis.call('HGET', KEYS[2], 'up') ~= '1' then return {0, -1} end
local due = tonumber(redis.call('HGET', KEYS[2], 'due') or '0')
if due > tonumber(ARGV[1]) then return {0, due} end
redis.call('HSET', KEYS[2], 'up', '0')
redis.call('HDEL', KEYS[2], 'due')
return {1, redis.call('HINCRBY', KEYS[2], 'n', 1)}
"""

# KEYS: the due index; ARGV: member, score read, new score ('' to remove).
# Changes the entry only if nobody did since it was read.
_RESCHEDULE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"""


class Online:
    """Transitions of one instance alone (no Redis): its local counts decide.
    :class:`RedisOnline` shares them across instances."""

    def __init__(
        self,
        *,
        emit: Emit | None,
        offline_after: float = 10.0,
        ttl: float = 30.0,
        prefix: str = "chat:",
        instance: str = "",
        offline_write_delay: float = 0.0,
    ) -> None:
        self.emit = emit
        self.offline_write_delay = offline_write_delay  # a test-only fault hook
        self.offline_after = offline_after
        self.ttl = ttl
        self.prefix = prefix
        self.instance = instance
        self.count: dict[tuple[str, str], int] = {}  # subject -> connections here
        self._up: set[tuple[str, str]] = set()
        self._n: dict[tuple[str, str], int] = {}
        self._due: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return self.emit is not None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for task in [*self._tasks, *self._due.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._due.values(), return_exceptions=True)
        self._tasks, self._due = [], {}

    async def up(self, kind: str, name: str) -> None:
        """One more local connection of the subject."""
        if not self.enabled:
            return
        subject = (kind, name)
        self.count[subject] = self.count.get(subject, 0) + 1
        if self.count[subject] == 1:
            await self._came(subject)

    async def down(self, kind: str, name: str) -> None:
        """One local connection of the subject fewer."""
        subject = (kind, name)
        if not self.enabled or subject not in self.count:
            return
        self.count[subject] -= 1
        if self.count[subject] == 0:
            del self.count[subject]
            await self._went(subject)

    async def _came(self, subject: tuple[str, str]) -> None:
        due = self._due.pop(subject, None)
        if due is not None:
            due.cancel()  # back within the window: never offline
        if subject not in self._up:
            self._up.add(subject)
            await self._send(subject, 0, self._next(subject))

    async def _went(self, subject: tuple[str, str]) -> None:
        self._due[subject] = asyncio.create_task(self._offline_later(subject))

    async def _offline_later(self, subject: tuple[str, str]) -> None:
        await asyncio.sleep(self.offline_after)
        if self._due.get(subject) is asyncio.current_task():
            del self._due[subject]
            self._up.discard(subject)
            await self._send(subject, 1, self._next(subject))

    def _next(self, subject: tuple[str, str]) -> int:
        self._n[subject] = self._n.get(subject, 0) + 1
        return self._n[subject]

    async def _send(self, subject: tuple[str, str], which: int, n: int) -> None:
        """Write the subject's transition ``n`` (``which``: 0 came, 1 went) to the outbox."""
        if self.emit is None:
            return
        kind, name = subject
        if which and self.offline_write_delay:
            await asyncio.sleep(self.offline_write_delay)
        try:
            await self.emit(
                EVENTS[kind][which], {kind: name, "transition": n}, f"@{kind}/{name}", n
            )
        except Exception as exc:
            log.warning("%s not recorded: %r", EVENTS[kind][which], exc, extra={kind: name})


class RedisOnline(Online):
    """Transitions across every instance, in ``redis``: see the module docstring."""

    def __init__(self, redis: RedisContext, **options: Any) -> None:
        super().__init__(**options)
        self.redis: Any = redis.client
        self.guard = redis.guard
        self.batch = redis.batch
        self._up_script = Script(self.redis, _UP)
        self._down_script = Script(self.redis, _DOWN)
        self._claim = Script(self.redis, _CLAIM)
        self._reschedule = Script(self.redis, _RESCHEDULE)

    def _keys(self, subject: tuple[str, str]) -> list[str]:
        tag = f"{self.prefix}{{{subject[0]}:{subject[1]}}}"
        return [f"{tag}:on", f"{tag}:state"]

    @property
    def index(self) -> str:
        return f"{self.prefix}online:due"

    async def start(self) -> None:
        if not self.enabled:
            return
        sweep = max(0.1, min(self.offline_after, self.ttl / 3) / 2)
        self._tasks = [
            every(self.ttl / 3, self.refresh, "online refresh"),
            every(sweep, self.sweep, "online sweep"),
        ]

    async def _came(self, subject: tuple[str, str]) -> None:
        keys = self._keys(subject)
        if not self.guard.usable(keys[0]):
            return  # Redis failed moments ago: no wait on every connection
        now = _ms()
        expiry = now + int(self.ttl * 1000)
        try:
            n = await self._up_script(
                keys=keys,
                args=[self.instance, expiry, int(self.ttl * 2000)],
                batch=self.batch,
            )
            await self.redis.zadd(self.index, {_member(subject): expiry}, gt=True)
        except Exception as exc:
            self.guard.failed(keys[0])
            log.warning("online state not recorded: %r", exc)
            return
        if n:
            await self._send(subject, 0, int(n))

    async def _went(self, subject: tuple[str, str]) -> None:
        keys = self._keys(subject)
        if not self.guard.usable(keys[0]):
            return  # the membership expires by itself
        now = _ms()
        due = now + int(self.offline_after * 1000)
        try:
            if await self._down_script(keys=keys, args=[self.instance, now, due], batch=self.batch):
                await self.redis.zadd(self.index, {_member(subject): due}, lt=True)
        except Exception as exc:
            self.guard.failed(keys[0])
            # The membership expires by itself; the refresh no longer renews it.
            log.warning("online state not recorded: %r", exc)

    async def refresh(self) -> None:
        """Push forward the expiry of this instance's membership of its subjects."""
        expiry = _ms() + int(self.ttl * 1000)
        groups: list[tuple[str, list[Any]]] = []
        for subject in list(self.count):
            on = self._keys(subject)[0]
            groups.append(
                (
                    on,
                    [
                        ("ZADD", on, expiry, self.instance),
                        ("PEXPIRE", on, int(self.ttl * 2000)),
                    ],
                )
            )
            groups.append((self.index, [("ZADD", self.index, "GT", expiry, _member(subject))]))
        for i in range(0, len(groups), 500):
            await per_key(self.redis, self.batch, self.guard, groups[i : i + 500])

    async def sweep(self) -> None:
        """Claim the subjects whose offline is due: each is sent by one instance."""
        now = _ms()
        due = await self.redis.zrangebyscore(
            self.index, "-inf", now, start=0, num=SWEEP_BATCH, withscores=True
        )
        for raw, score in due:
            member = raw.decode() if isinstance(raw, bytes) else raw
            kind, _, name = member.partition(":")
            if kind not in EVENTS:
                continue
            subject = (kind, name)
            went, value = await self._claim(keys=self._keys(subject), args=[now])
            later = "" if went or int(value) < 0 else int(value)
            await self._reschedule(keys=[self.index], args=[member, int(score), later])
            if went:
                await self._send(subject, 1, int(value))


def _member(subject: tuple[str, str]) -> str:
    return f"{subject[0]}:{subject[1]}"


def _ms() -> int:
    return int(time.time() * 1000)

"""Redis commands of many callers, pipelined on one connection
(:class:`PipelinedConnection`).

Each caller hands over its commands and gets their replies back, an error
reply as an exception instance in its place (as ``execute(raise_on_error=False)``
gives them); a failure of the connection (lost, or no reply within
``timeout``) is raised to every caller still waiting. Commands leave in the
order queued and Redis runs each one atomically, so sharing the connection
changes no command's effect.

A command for an idle connection is written at once; commands issued while
others are in flight are gathered for the rest of the loop turn into one
write. Replies are matched to callers in order as they arrive (``hiredis``
packs and parses).
No task, lock or pool checkout stands between a caller and the socket: on
loopback those cost more than the round trip itself. A caller that is
cancelled leaves its replies to be read and dropped, so nobody else's are
disturbed. The connection is opened on first use and again after a loss, to
the address the client's pool gives: over Sentinel, the primary of the moment.
A ``READONLY`` reply (the server was demoted to a replica) retires the link:
the next command opens a new one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

import hiredis
from redis import exceptions as rx
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat_gateway.redisio.guard import RedisGuard

Command = tuple[Any, ...]

# An error reply's leading code and the redis-py exception a client of redis-py
# would get for it (its public classes); any other error is a ResponseError.
_ERRORS: dict[str, type[rx.RedisError]] = {
    "ERR": rx.ResponseError,
    "NOSCRIPT": rx.NoScriptError,
    "READONLY": rx.ReadOnlyError,
    "LOADING": rx.BusyLoadingError,
    "OOM": rx.OutOfMemoryError,
    "EXECABORT": rx.ExecAbortError,
    "NOAUTH": rx.AuthenticationError,
    "WRONGPASS": rx.AuthenticationError,
    "NOPERM": rx.NoPermissionError,
    "MASTERDOWN": rx.MasterDownError,
    "CLUSTERDOWN": rx.ClusterDownError,
    "MOVED": rx.MovedError,
    "ASK": rx.AskError,
    "TRYAGAIN": rx.TryAgainError,
    "CROSSSLOT": rx.ClusterCrossSlotError,
}

_ERR_MESSAGES: dict[str, type[rx.RedisError]] = {
    "max number of clients reached": rx.ConnectionError,
    "invalid password": rx.AuthenticationError,
}


def reply_error(text: str) -> rx.RedisError:
    """The exception for an error reply (``"NOSCRIPT No matching script..."``)."""
    code, _, rest = text.partition(" ")
    kind = _ERRORS.get(code)
    if kind is None:
        return rx.ResponseError(text)
    if code == "ERR":
        kind = _ERR_MESSAGES.get(rest, kind)
    return kind(rest)


class _Waiter:
    __slots__ = ("future", "left", "replies", "deadline")

    def __init__(self, future: asyncio.Future[list[Any]], left: int, deadline: float) -> None:
        self.future = future
        self.left = left
        self.replies: list[Any] = []
        self.deadline = deadline


class _PipelineProtocol(asyncio.Protocol):
    """One connection: writes go out at the end of the loop turn, replies resolve
    waiters first in, first out."""

    def __init__(self, owner: PipelinedConnection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=reply_error)
        self.waiters: deque[_Waiter] = deque()
        self.out: list[bytes] = []
        self.lost: BaseException | None = None
        self.retired = False
        # A subscriber connection's (Subscription): every array Redis sends goes here.
        self.on_push: Callable[[list[Any]], None] | None = None
        self.reads = 0  # data arrivals, which show the link alive
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        self.reader.feed(data)
        waiters = self.waiters
        on_push = self.on_push
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if on_push is not None and type(reply) is list:
                try:
                    on_push(reply)
                except Exception as exc:  # the handler gives the link up
                    self.fail(exc)
                    return
                continue
            if not waiters:
                # An error nobody asked for (a subscriber's MOVED, say) is the reason itself.
                self.fail(
                    reply
                    if isinstance(reply, rx.RedisError)
                    else InvalidResponse("Redis sent a reply nobody asked for")
                )
                return
            if type(reply) is ReadOnlyError:
                self.retire()
            waiter = waiters[0]
            waiter.replies.append(reply)
            waiter.left -= 1
            if not waiter.left:
                waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(waiter.replies)
                if self.retired and not waiters and self.transport is not None:
                    self.transport.close()

    def retire(self) -> None:
        """The server answered READONLY: it is a replica now (demoted by a failover).
        The next command opens a new link, to the primary the client finds now; the
        commands already sent here get their replies, then the link closes."""
        self.retired = True
        if self.owner.link is self:
            self.owner.link = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def send(self, packed: bytes, waiter: _Waiter) -> None:
        """An idle link writes at once; behind commands in flight, the writes of this
        loop turn are gathered into one."""
        if not self.out:
            if not self.waiters and self.transport is not None:
                self.waiters.append(waiter)
                self.transport.write(packed)
                return
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(packed)
        self.waiters.append(waiter)

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and self.lost is None:
            self.transport.write(b"".join(out))

    def fail(self, exc: BaseException) -> None:
        """Every waiter gets ``exc``; the link is done and the next call opens another."""
        if self.lost is None:
            self.lost = exc
        if not self.closed.done():
            self.closed.set_result(None)
        if self.owner.link is self:
            self.owner.link = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class PipelinedConnection:
    """One connection to the client's Redis that every caller's commands share,
    pipelined: :meth:`run` sends a caller's commands and returns their replies."""

    def __init__(self, redis: Any, *, timeout: float | None = None) -> None:
        pool = self._pool = redis.connection_pool
        # The client's own connection settings, read from a connection it would make.
        self._settings = pool.connection_class(**pool.connection_kwargs)
        self.timeout = timeout or self._settings.socket_timeout or 1.0
        self.link: _PipelineProtocol | None = None
        self._opening: asyncio.Future[_PipelineProtocol] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.on_push: Callable[[list[Any]], None] | None = None

    async def run(self, commands: list[Command]) -> list[Any]:
        if not commands:
            # Nothing to send, nothing to wait for: a waiter for no reply would never
            # be answered, and its deadline would fail the link for every caller.
            return []
        link = self.link
        if link is None:
            link = await self._open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        packed = b"".join([hiredis.pack_command(command) for command in commands])
        link.send(packed, _Waiter(future, len(commands), loop.time() + self.timeout))
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._check)
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.link is not None:
            self.link.fail(RedisConnectionError("the pipelined connection is closed"))

    def _check(self) -> None:
        """A link whose oldest waiter is past its deadline is dropped."""
        self._timer = None
        link = self.link
        if link is None or not link.waiters:
            return
        loop = asyncio.get_running_loop()
        oldest = link.waiters[0].deadline
        if oldest <= loop.time():
            link.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
        else:
            self._timer = loop.call_at(oldest, self._check)

    async def _open(self) -> _PipelineProtocol:
        if self._closed:
            raise RedisConnectionError("the pipelined connection is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, opening: asyncio.Future[_PipelineProtocol]) -> None:
        self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self.link = opening.result()
            if self._closed:  # closed while connecting
                self.link.fail(RedisConnectionError("the pipelined connection is closed"))

    async def _connect(self) -> _PipelineProtocol:
        """Connect and set the connection up as the client would (AUTH, SELECT)."""
        s = self._settings
        loop = asyncio.get_running_loop()
        link = _PipelineProtocol(self)
        link.on_push = self.on_push
        try:
            async with asyncio.timeout(s.socket_connect_timeout or self.timeout):
                if getattr(s, "path", None):
                    await loop.create_unix_connection(lambda: link, s.path)
                else:
                    context = s.ssl_context.get() if hasattr(s, "ssl_context") else None
                    host, port = await self._address()
                    await loop.create_connection(lambda: link, host, port, ssl=context)
                setup: list[Command] = []
                if s.password is not None:
                    setup.append(
                        ("AUTH", s.username, s.password) if s.username else ("AUTH", s.password)
                    )
                if s.db:
                    setup.append(("SELECT", s.db))
                if setup:
                    future: asyncio.Future[list[Any]] = loop.create_future()
                    link.send(
                        b"".join(hiredis.pack_command(c) for c in setup),
                        _Waiter(future, len(setup), loop.time() + self.timeout),
                    )
                    for reply in await future:
                        if isinstance(reply, Exception):
                            raise reply
        except TimeoutError:
            link.fail(RedisTimeoutError("Redis connect timed out"))
            raise RedisTimeoutError("Redis connect timed out") from None
        except OSError as exc:
            link.fail(RedisConnectionError(str(exc)))
            raise RedisConnectionError(f"Redis connect failed: {exc}") from exc
        except BaseException:
            link.fail(RedisConnectionError("Redis connect failed"))
            raise
        return link

    async def _address(self) -> tuple[str, int]:
        """The client's host and port; over Sentinel, the primary the sentinels name
        now (the lookup the client's own connections make, which raises
        ``MasterNotFoundError``, a ``ConnectionError``, while there is none)."""
        primary = getattr(self._pool, "get_master_address", None)
        if primary is not None:
            host, port = await primary()
            return host, int(port)
        return self._settings.host, self._settings.port


class Subscription(PipelinedConnection):
    """A subscriber connection (Pub/Sub or sharded Pub/Sub), opened as the pipelined
    connection is (the client's settings, AUTH and SELECT, TLS; over Sentinel the
    primary of the moment), once: whoever holds it opens a new one after a loss.

    Every array Redis sends on it (a message, a subscribe confirmation) goes to
    ``on_push`` from the socket's read callback, as it is parsed: no task, future
    or timeout stands between the socket and the handler (redis-py's
    ``PubSub.get_message`` costs several of each per message). A handler that
    raises gives the link up with that exception; so does an error reply (a
    cluster node's MOVED). Commands are written at once and answered by pushes,
    never waited for, but for :meth:`synced`.
    """

    def __init__(
        self, redis: Any, on_push: Callable[[list[Any]], None], *, timeout: float | None = None
    ) -> None:
        super().__init__(redis, timeout=timeout)
        self.on_push = self._pushed
        self._handler = on_push
        self._pongs: deque[asyncio.Future[None] | None] = deque()  # per PING sent, in order
        self._used = False  # opened (or opening) once

    async def open(self) -> None:
        """Connect (and AUTH, SELECT) the first time; raises what the connect raised,
        and ``RedisConnectionError`` once the link was lost (it is never reopened:
        a new one must subscribe its channels again)."""
        if self._used and self._opening is None:
            if self.link is None:
                raise RedisConnectionError("the subscriber link is down")
            return
        self._used = True
        await self._open()

    def send(self, *command: Any) -> None:
        """Write one command now; ``RedisConnectionError`` when the link is down."""
        link = self.link
        if link is None or link.lost is not None or link.transport is None:
            raise RedisConnectionError("the subscriber link is down")
        link.transport.write(hiredis.pack_command(command))

    def _ping(self, answered: asyncio.Future[None] | None = None) -> None:
        """Send a PING; its PONG (answered in order) resolves ``answered``."""
        self.send("PING")
        self._pongs.append(answered)

    async def synced(self) -> None:
        """Return once Redis has run every command written before (one round trip:
        a PING, answered in order)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ping(done)
        link = self.link
        assert link is not None
        await asyncio.wait([done, link.closed], timeout=self.timeout)
        if not done.done():
            raise link.lost or RedisTimeoutError(f"Redis did not answer within {self.timeout} s")

    async def hold(self, probe_interval: float, probe_timeout: float) -> NoReturn:
        """Wait until the link is lost, and raise why. When nothing has arrived for
        ``probe_interval`` seconds a PING goes down the link; a link that answers
        neither data nor PONG within ``probe_timeout`` is given up as dead."""
        link = self.link
        if link is None:
            raise RedisConnectionError("the subscriber link is down")
        wait, probing = probe_interval, False
        while True:
            seen = link.reads
            await asyncio.wait([link.closed], timeout=wait)
            if link.lost is not None:
                raise link.lost
            if link.reads != seen:
                wait, probing = probe_interval, False
            elif probing:
                raise RedisConnectionError("subscriber link silent: no PONG to the probe")
            else:
                self._ping()
                wait, probing = probe_timeout, True

    def _pushed(self, reply: list[Any]) -> None:
        if reply[0] == b"pong":
            if self._pongs:
                waiter = self._pongs.popleft()
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        self._handler(reply)


# Keys worked on at once over a cluster (each key's commands on their own).
CLUSTER_CONCURRENCY = 32


async def per_key(
    redis: Any,
    batch: PipelinedConnection | None,
    guard: RedisGuard,
    groups: list[tuple[str, list[Command]]],
) -> list[Any]:
    """Run each key's commands; per group, its replies or the exception that
    stopped it. A key the guard says to skip is not sent; a failure is told to
    the guard.

    Over one Redis (``batch``) all groups share one round trip. Over a cluster
    each group is sent on its own, ``CLUSTER_CONCURRENCY`` at once: a cluster
    pipeline that meets a dead primary closes the whole client, whose
    re-initialisation may then pick the dead primary as its default node and
    fail every command on every shard until it returns, where one shard's
    failure must cost only its own keys.
    """
    send = [guard.usable(key) for key, _commands in groups]
    done: list[Any]
    if batch is not None:
        commands = [c for (_key, cs), ok in zip(groups, send, strict=True) if ok for c in cs]
        try:
            replies = await batch.run(commands)
        except Exception as exc:
            replies = [exc] * len(commands)
        done = []
        i = 0
        for (_key, cs), ok in zip(groups, send, strict=True):
            if ok:
                got = replies[i : i + len(cs)]
                i += len(cs)
                for reply in got:
                    if isinstance(reply, BaseException):
                        got = reply  # type: ignore[assignment]
                        break
                done.append(got)
    else:

        async def one(commands: list[Command]) -> list[Any]:
            return [await redis.execute_command(*command) for command in commands]

        sent = [cs for (_key, cs), ok in zip(groups, send, strict=True) if ok]
        done = []
        for i in range(0, len(sent), CLUSTER_CONCURRENCY):
            done += await asyncio.gather(
                *(one(cs) for cs in sent[i : i + CLUSTER_CONCURRENCY]), return_exceptions=True
            )
    results: list[Any] = []
    it = iter(done)
    for (key, _commands), ok in zip(groups, send, strict=True):
        if not ok:
            results.append(RedisConnectionError("Redis (this key's shard) failed moments ago"))
            continue
        result = next(it)
        # NOSCRIPT is Redis answering (the caller sends the script's body), not failing.
        if isinstance(result, BaseException) and not isinstance(result, rx.NoScriptError):
            guard.failed(key, result)
        results.append(result)
    return results

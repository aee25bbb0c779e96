"""The client: one WebSocket driven by a small state machine, plus the HTTP API.

States: ``CONNECTING`` → ``CONNECTED`` → ``DISCONNECTED`` (with a close code and
reason) → ``CONNECTING`` …, and ``CLOSED`` for good after :meth:`Client.close`, a
refused upgrade (HTTP 401/403), a close with 1008 when no token provider can give
a new token, or 4001 (disconnected by the server API). Reconnection waits an
exponential backoff with full jitter and tries the next URL.

Every subscribed room keeps a cursor, the seq of the last message handed to the
application: a message is handed on only when its seq is cursor + 1, a replay is
dropped, a gap reopens the socket so the server replays from the cursor. Every
connection subscribes again with ``since=cursor``.

Every publish carries an idempotency key kept until its ack: after a reconnection
an unacknowledged publish is sent again with the same key and the server acks it
with the message it stored the first time, so it is stored once. Edits and deletes
go the same way, with their own keys.

Changes (edits, deletes) are numbered per room: the client keeps the number of the
last one handed on and subscribes again with ``changes_since``, so a change made
while it was away arrives after the reconnection, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat_gateway_client.errors import CloseCode, GatewayError
from chat_gateway_client.events import (
    Change,
    Event,
    Message,
    Page,
    Presence,
    Reaction,
    ReactionsUpdated,
    Read,
    ReadState,
    RepliesPage,
    SearchHit,
    SearchPage,
    StateChange,
    StateEntry,
    StateSnapshot,
    StateValue,
    StateWrite,
    Subscribed,
    Thread,
    ThreadUpdated,
    Typing,
    Unsubscribed,
    Version,
)

log = logging.getLogger("chat_gateway_client")

TokenProvider = Callable[[], Awaitable[str]]


class State(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^attempt)],
    at least ``base``."""
    return min(cap, base + random.uniform(0, min(cap, base * 2 ** min(attempt, 30))))


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified (the server verifies; this only plans)."""
    import base64

    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


_END: Any = object()  # in a room's queue: the subscription ended


class StateView(Mapping[str, Any]):
    """A state room's values as the client holds them: a read-only mapping of key to
    JSON value, kept current by the subscription (first a snapshot, then each write;
    after a reconnection, the keys written meanwhile). ``seq`` is the highest write
    applied, ``entries`` each key's :class:`StateEntry`."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.seq: int | None = None
        self.conflate_ms: int | None = None
        self._entries: dict[str, StateEntry] = {}
        self._ready = asyncio.Event()  # set by the first snapshot
        self._failed: GatewayError | None = None  # the room proved of another kind

    @property
    def entries(self) -> dict[str, StateEntry]:
        return dict(self._entries)

    def __getitem__(self, key: str) -> Any:
        return self._entries[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"StateView({self.room!r}, seq={self.seq}, {dict(self)!r})"

    def _snapshot(self, snap: StateSnapshot) -> None:
        self._entries = dict(snap.values)
        self.seq = snap.seq
        self._ready.set()

    def _apply(self, update: StateValue) -> bool:
        """A write, unless at or below the highest applied (held already)."""
        if self.seq is not None and update.seq <= self.seq:
            return False
        self.seq = update.seq
        if update.deleted:
            self._entries.pop(update.key, None)
        else:
            self._entries[update.key] = StateEntry(update.value, update.seq, update.updated_at)
        return True


@dataclass
class _Room:
    name: str
    cursor: int | None  # seq of the last message handed on; None until `subscribed`
    change: int | None = None  # number of the last change handed on; None until known
    subscribed: bool = False
    waiters: list[asyncio.Future[int]] = field(default_factory=list)
    queues: list[asyncio.Queue[Any]] = field(default_factory=list)
    ended: GatewayError | None = None
    quiet: bool = False  # ended by the application: readers' loops just stop
    state: StateView | None = None  # a state room's values (subscribe_state)

    def end(self, exc: GatewayError, *, quiet: bool = False) -> None:
        """The subscription is over: settle the waiters, end the readers' loops (raising
        ``exc`` in them unless ``quiet``)."""
        self.ended, self.quiet = exc, quiet
        self.settle(exc)
        for queue in self.queues:
            queue.put_nowait(_END)

    def settle(self, exc: BaseException | None, seq: int | None = None) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(exc) if exc else fut.set_result(seq or 0)
        self.waiters.clear()


@dataclass
class _Publish:
    frame: dict[str, Any]
    future: asyncio.Future[Message]


class _Gap(Exception):
    pass


class Client:
    """``async with Client(url, token=...) as client:`` …

    ``url`` is the gateway's base URL (``http://…``), or several: each reconnection
    tries the next. ``token`` or ``token_provider`` (an async function returning a
    token; called when there is none, before expiry, and after the server closed the
    socket for expiry) authenticate as a user; ``api_key`` authenticates the server
    API and ephemeral publishes; ``user`` is the name in open mode.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        api_key: str | None = None,
        user: str | None = None,
        min_delay: float = 0.5,
        max_delay: float = 20.0,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        refresh_margin: float = 30.0,
        http_timeout: float = 10.0,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.token_provider = token_provider
        self.api_key = api_key
        self.user = user
        self.min_delay, self.max_delay = min_delay, max_delay
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.refresh_margin = refresh_margin
        self.http_timeout = http_timeout
        self.state = State.DISCONNECTED
        self._rooms: dict[str, _Room] = {}
        self._pending: dict[str, _Publish] = {}  # ref -> publish, in send order
        self._emits: dict[str, asyncio.Future[None]] = {}  # ref -> emit awaiting its ack
        self._answers: list[tuple[str, str | None]] = []  # (kind, room) awaiting an answer
        self._listeners: list[asyncio.Queue[Any]] = []
        self._ws: Any = None
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._close_error: GatewayError | None = None
        self._url_index = 0
        self._attempt = 0
        self._next_ref = 1
        self._force_new_token = False

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the HTTP client and start connecting; returns once connected (raises
        ``GatewayError`` if the client is closed for good first)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.http_timeout)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="chat-gateway-client")
        await self.wait_connected()

    async def wait_connected(self) -> None:
        waits = [
            asyncio.ensure_future(self._connected.wait()),
            asyncio.ensure_future(self._closed_event.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.state is State.CLOSED:
            raise self._close_error or GatewayError("closed", "the client is closed")

    async def close(self) -> None:
        """Close for good: pending publishes and subscriptions fail with code ``closed``."""
        if self.state is not State.CLOSED:
            self._set_closed(CloseCode.NORMAL, "closed by the client")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- events -------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Any]:
        """Every typed event: ``Message``, ``Change``, ``Event``, ``Presence``, ``Typing``,
        ``Read``, ``Unsubscribed``, ``StateChange``, ``GatewayError`` (errors of frames
        without a ref)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._listeners.append(queue)
        try:
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, StateChange) and item.state is State.CLOSED:
                    return
        finally:
            self._listeners.remove(queue)

    def _emit(self, item: Any) -> None:
        for queue in self._listeners:
            queue.put_nowait(item)

    def _set_state(
        self,
        state: State,
        code: int | None = None,
        reason: str = "",
        status: int | None = None,
        error: GatewayError | None = None,
    ) -> None:
        self.state = state
        if state is State.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        self._emit(StateChange(state, code, reason, status, error))

    def _set_closed(
        self, code: int, reason: str, error: GatewayError | None = None, status: int | None = None
    ) -> None:
        self._close_error = error or GatewayError(
            "closed", reason or "the client is closed", status=status
        )
        self._set_state(State.CLOSED, code, reason, status, error)
        self._closed_event.set()
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(self._close_error)
        self._pending.clear()
        self._fail_emits(self._close_error)
        for room in self._rooms.values():
            room.end(self._close_error, quiet=code == CloseCode.NORMAL)

    def _fail_emits(self, error: GatewayError) -> None:
        """Emits are sent once (nothing stored makes a repeat harmless): those without
        their ack when the socket closes fail."""
        emits, self._emits = self._emits, {}
        for fut in emits.values():
            if not fut.done():
                fut.set_exception(error)

    # -- connection ---------------------------------------------------------------

    async def _current_token(self) -> str | None:
        if self.token_provider is None:
            return self.token
        exp = token_expiry(self.token) if self.token else None
        if (
            self.token is None
            or self._force_new_token
            or (exp is not None and exp - time.time() < self.refresh_margin)
        ):
            self.token = await self.token_provider()
            self._force_new_token = False
        return self.token

    def _ws_url(self, token: str | None) -> str:
        base = self.urls[self._url_index % len(self.urls)]
        url = "ws" + base[len("http") :] + "/v1/ws" if base.startswith("http") else base + "/v1/ws"
        if token:
            return url + "?" + httpx.QueryParams({"token": token}).__str__()
        if self.user:
            return url + "?" + httpx.QueryParams({"user": self.user}).__str__()
        return url

    def _closed(self) -> bool:
        """Whether the client is closed for good, read afresh at each call: ``close()``
        (from another task, during an await) and ``_after_close`` change the state
        between the checks of one pass of ``_run``, which a comparison of the attribute
        narrowed by the loop's condition would not show."""
        return self.state is State.CLOSED

    async def _run(self) -> None:
        while not self._closed():
            self._set_state(State.CONNECTING)
            # an int: the close frame's code may be one CloseCode does not name
            code: int = CloseCode.ABNORMAL
            reason, status, opened = "", None, False
            error: GatewayError | None = None
            try:
                token = await self._current_token()
                async with websockets.connect(
                    self._ws_url(token),
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    max_size=2**22,
                    open_timeout=10,
                ) as ws:
                    opened = True
                    await self._session(ws)
                code = ws.close_code or CloseCode.ABNORMAL
                reason = ws.close_reason or ""
            except InvalidStatus as exc:
                # the refusal's error body says why ("a bearer token is required")
                res = exc.response
                status = res.status_code
                error = GatewayError.of_http(
                    status, res.body or b"", res.headers.get("Retry-After"), res.reason_phrase
                )
                reason = error.message
            except ConnectionClosed as exc:
                if exc.rcvd is not None:
                    code, reason = exc.rcvd.code, exc.rcvd.reason
                elif exc.sent is not None and exc.sent.code == CloseCode.GAP:
                    code, reason = exc.sent.code, exc.sent.reason
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._ws = None
            if self._closed():
                return
            self._after_close(code, reason, status, opened, error)
            if self._closed():
                return
            delay = backoff(self._attempt, self.min_delay, self.max_delay)
            self._attempt += 1
            self._url_index += 1
            await asyncio.sleep(delay)

    def _after_close(
        self,
        code: int,
        reason: str,
        status: int | None,
        opened: bool,
        error: GatewayError | None = None,
    ) -> None:
        for room in self._rooms.values():
            room.subscribed = False
        self._answers.clear()
        self._fail_emits(GatewayError("disconnected", "the connection closed before the ack"))
        if status in (401, 403):
            if error is None:
                name = "unauthorized" if status == 401 else "forbidden"
                error = GatewayError(name, reason, status=status)
            self._set_closed(code, reason, error, status)
        elif code == CloseCode.SERVER_DISCONNECT:
            reason = reason or "disconnected by the server"
            self._set_closed(code, reason, GatewayError("disconnected", reason))
        elif code == CloseCode.POLICY_VIOLATION and (self.token_provider is None or not opened):
            reason = reason or "policy violation"
            self._set_closed(code, reason, GatewayError("policy_violation", reason))
        else:
            if code == CloseCode.POLICY_VIOLATION:
                self._force_new_token = True  # the token expired: the provider gives another
            self._set_state(State.DISCONNECTED, code, reason, status, error)

    async def _session(self, ws: Any) -> None:
        self._ws = ws
        self._attempt = 0
        # snapshots: a room or publish added meanwhile is sent by its own call
        for room in list(self._rooms.values()):
            await self._send_subscribe(room)
        for p in list(self._pending.values()):
            await ws.send(json.dumps(p.frame))  # same keys: stored once
        self._set_state(State.CONNECTED)
        refresher = asyncio.create_task(self._refresh_loop(ws))
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    self._emit(GatewayError("invalid_frame", "a frame was not JSON"))
                    continue
                try:
                    self._on_frame(frame)
                except _Gap as gap:
                    await ws.close(CloseCode.GAP, str(gap)[:120])
        finally:
            refresher.cancel()

    async def _refresh_loop(self, ws: Any) -> None:
        """Before the token expires, fetch a new one and send it in band."""
        while self.token_provider is not None and self.token is not None:
            exp = token_expiry(self.token)
            if exp is None:
                return
            await asyncio.sleep(max(0.0, exp - self.refresh_margin - time.time()))
            try:
                self.token = await self.token_provider()
            except Exception as exc:
                self._emit(GatewayError("token_refresh_failed", str(exc)))
                return
            self._answers.append(("refresh", None))
            await ws.send(json.dumps({"type": "refresh", "token": self.token}))
            if token_expiry(self.token) == exp:
                return

    async def _send(self, frame: dict[str, Any], answer: tuple[str, str | None] | None) -> None:
        ws = self._ws
        if ws is None or self.state is State.CLOSED:
            return
        if answer is not None:
            self._answers.append(answer)
        with contextlib.suppress(ConnectionClosed):  # the reconnection sends it again
            await ws.send(json.dumps(frame))

    async def _send_subscribe(self, room: _Room) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "room": room.name}
        if room.state is not None:
            # resume from the highest write applied (none yet: a snapshot)
            if room.state.seq is not None:
                frame["since"] = room.state.seq
            if room.state.conflate_ms is not None:
                frame["conflate_ms"] = room.state.conflate_ms
            # `subscribed` says the room's kind: another than state fails the subscription
            await self._send(frame, ("subscribe", room.name))
            return
        if room.cursor is not None:
            frame["since"] = room.cursor
        if room.change is not None:
            frame["changes_since"] = room.change
        await self._send(frame, ("subscribe", room.name))

    # -- frames -------------------------------------------------------------------

    def _answered(self, kind: str, room: str | None = None) -> bool:
        # a typing frame has no answer when it succeeds: the ping sent after it (its
        # fence) answering means it went through
        while self._answers and self._answers[0][0] == "typing" and kind == "ping":
            self._answers.pop(0)
        if (
            self._answers
            and self._answers[0][0] == kind
            and (room is None or self._answers[0][1] == room)
        ):
            self._answers.pop(0)
            return True
        return False

    def _on_frame(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        if kind == "message":
            self._on_message(f.get("room"), f.get("message"))
        elif kind == "ack" and f.get("ref") in self._emits:
            emitted = self._emits.pop(f["ref"])
            if not emitted.done():
                emitted.set_result(None)
        elif kind == "ack":
            p = self._pending.pop(f.get("ref"), None)  # type: ignore[arg-type]
            if p is not None and not p.future.done():
                p.future.set_result(Message.of(f["message"]))
        elif kind == "pong":
            self._answered("ping")
        elif kind == "error":
            self._on_error(f)
        elif kind == "subscribed":
            self._answered("subscribe", f.get("room"))
            room = self._rooms.get(f.get("room", ""))
            if room is not None and room.state is not None and f.get("kind") != "state":
                self._wrong_kind(room, f.get("kind"))
            elif room is not None:
                if room.cursor is None:
                    room.cursor = f["seq"]
                # changes are resumed from here on (a server without changes sends none)
                if room.change is None and isinstance(f.get("change"), int):
                    room.change = f["change"]
                room.subscribed = True
                room.settle(None, f["seq"])
                self._emit(
                    Subscribed(room.name, f["seq"], f.get("change", 0), f.get("kind", "stored"))
                )
        elif kind == "unsubscribed":
            if "reason" not in f and self._answered("unsubscribe", f.get("room")):
                return
            room = self._rooms.pop(f.get("room", ""), None)  # the server API ended it
            if room is not None:
                room.end(GatewayError("unsubscribed", f.get("reason") or "ended by the server"))
                self._emit(Unsubscribed(room.name, f.get("reason")))
        elif kind == "refreshed":
            self._answered("refresh")
        elif kind in ("message_updated", "message_deleted", "reactions_updated", "thread_updated"):
            self._on_change(f)
        elif kind in ("snapshot", "state"):
            self._on_state(f)
        elif kind == "event":
            self._emit(Event(f["room"], f["event"], f.get("data") or {}))
        elif kind == "presence":
            self._emit(Presence(f["room"], f["action"], f["user"]))
        elif kind == "typing":
            self._emit(Typing(f["room"], f["user"]))
        elif kind == "read":
            self._emit(Read(f["room"], f["user"], f["seq"], f))

    def _on_message(self, name: Any, raw: Any) -> None:
        room = self._rooms.get(name) if isinstance(name, str) else None
        # before this connection's `subscribed` (which the server sends first), a frame
        # is left over from an earlier subscription: the replay after `subscribed` brings it
        if (
            room is None
            or not room.subscribed
            or room.cursor is None
            or not isinstance(raw, dict)
            or not isinstance(raw.get("seq"), int)
        ):
            return
        seq = raw["seq"]
        if seq <= room.cursor:
            return  # a replay: handed on already
        if seq > room.cursor + 1:
            raise _Gap(f"seq {seq} after {room.cursor} in {name}")
        room.cursor = seq
        msg = Message.of(raw)
        for queue in room.queues:
            queue.put_nowait(msg)
        self._emit(msg)

    def _wrong_kind(self, room: _Room, kind: Any) -> None:
        """``subscribed`` to a room subscribed as a state room says it is of another
        kind (a server before room kinds says none: no state room either)."""
        assert room.state is not None
        self._rooms.pop(room.name, None)
        err = GatewayError(
            "wrong_room_kind", f"{room.name} is not a state room (it is {kind or 'stored'})"
        )
        err.room = room.name
        room.end(err)
        room.state._failed = err
        room.state._ready.set()
        task = asyncio.ensure_future(
            self._send({"type": "unsubscribe", "room": room.name}, ("unsubscribe", room.name))
        )
        task.add_done_callback(lambda t: t.exception())

    def _on_state(self, f: dict[str, Any]) -> None:
        room = self._rooms.get(f.get("room", ""))
        # a frame before this connection's `subscribed` is left over: the
        # resubscription brings each key's newest value
        if room is None or room.state is None or not room.subscribed:
            return
        item: StateSnapshot | StateValue
        if f["type"] == "snapshot":
            item = StateSnapshot.of(f)
            room.state._snapshot(item)
        else:
            item = StateValue.of(f)
            if not room.state._apply(item):
                return
        for queue in room.queues:
            queue.put_nowait(item)
        self._emit(item)

    def _on_change(self, f: dict[str, Any]) -> None:
        room = self._rooms.get(f.get("room", ""))
        # as for messages: a frame before this connection's `subscribed` is left over,
        # and one numbered at or below the last change handed on is a replay
        if room is None or not room.subscribed:
            return
        number = f.get("change", 0)
        if isinstance(number, int) and number > 0:
            if room.change is not None and number <= room.change:
                return
            room.change = number
        if f["type"] == "thread_updated":
            thread = Thread.of(f.get("thread"))
            if thread is not None:
                self._emit(ThreadUpdated(room.name, number, f["seq"], thread))
            return
        if f["type"] == "reactions_updated":
            summary = Reaction.summary(f.get("reactions")) or {}
            self._emit(ReactionsUpdated(room.name, number, f["seq"], summary))
            return
        kind = "updated" if f["type"] == "message_updated" else "deleted"
        self._emit(Change(kind, room.name, Message.of(f["message"]), number))

    def _on_error(self, f: dict[str, Any]) -> None:
        err = GatewayError.of_frame(f)
        ref = f.get("ref")
        if isinstance(ref, str) and ref in self._emits:
            emitted = self._emits.pop(ref)
            if not emitted.done():
                emitted.set_exception(err)
            return
        if isinstance(ref, str) and ref in self._pending:
            p = self._pending.pop(ref)
            if not p.future.done():
                p.future.set_exception(err)
            return
        head = self._answers.pop(0) if self._answers else None
        if head is not None and head[0] == "subscribe":
            room = self._rooms.get(head[1] or "")
            if room is not None and not room.subscribed:
                del self._rooms[room.name]
                room.end(err)
            err.room = head[1]
        elif head is not None and head[0] == "refresh":
            err.frame = "refresh"  # no in-band refresh: the expiry reconnects instead
        elif head is not None and head[0] == "typing":
            err.frame, err.room = "typing", head[1]
        self._emit(err)

    # -- rooms and publishing ----------------------------------------------------------

    async def subscribe(self, room: str, since: int | None = None) -> int:
        """Subscribe (kept across reconnections); returns the room's latest seq."""
        self._check_open()
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(room, since)
            await self._send_subscribe(r)
        elif r.subscribed:
            return r.cursor or 0
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        r.waiters.append(fut)
        return await fut

    async def subscribe_state(self, room: str, conflate_ms: int | None = None) -> StateView:
        """Subscribe to a state room (a namespace with ``kind = "state"``); returns
        its live :class:`StateView` once the snapshot is in. Kept across
        reconnections: the client resumes from ``view.seq``, so the keys written
        meanwhile arrive once and it ends with exactly the store's values.
        ``conflate_ms``: at most one update per key per interval, the newest (None:
        the namespace's default; 0: every write). ``events()`` (and
        ``state_updates``) give the ``StateSnapshot`` and ``StateValue`` items."""
        self._check_open()
        r = self._rooms.get(room)
        if r is not None and r.state is None:
            raise GatewayError("subscribed", f"{room} is subscribed as a message room")
        if r is None:
            r = self._rooms[room] = _Room(room, None)
            r.state = StateView(room)
            r.state.conflate_ms = conflate_ms
            await self._send_subscribe(r)
        view = r.state
        assert view is not None
        if view._ready.is_set():
            return view
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        r.waiters.append(fut)
        ready = asyncio.ensure_future(view._ready.wait())
        try:
            waits: list[asyncio.Future[Any]] = [fut, ready]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            failed = fut.exception() if fut.done() else None
            if failed is not None:
                raise failed
            await ready
        finally:
            ready.cancel()
            if not fut.done():
                fut.cancel()
        if view._failed is not None:
            raise view._failed
        return view

    def state_of(self, room: str) -> StateView | None:
        """The live view of a state room subscribed with ``subscribe_state``."""
        r = self._rooms.get(room)
        return r.state if r else None

    async def state_updates(
        self, room: str, conflate_ms: int | None = None
    ) -> AsyncIterator[StateSnapshot | StateValue]:
        """A state room's snapshots and writes as they are applied to its view (after
        ``subscribe_state``'s first snapshot); leaving the loop unsubscribes when no
        other loop reads the room."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        await self.subscribe_state(room, conflate_ms)
        r = self._rooms[room]
        r.queues.append(queue)
        async with contextlib.aclosing(self._drain(r, queue)) as items:
            async for item in items:
                yield item

    async def unsubscribe(self, room: str) -> None:
        r = self._rooms.pop(room, None)
        if r is None:
            return
        r.end(GatewayError("unsubscribed", f"unsubscribed from {room}"), quiet=True)
        await self._send({"type": "unsubscribe", "room": room}, ("unsubscribe", room))

    def cursor(self, room: str) -> int | None:
        """The seq of the last message of the room handed to the application."""
        r = self._rooms.get(room)
        return r.cursor if r else None

    async def messages(self, room: str, since: int | None = None) -> AsyncIterator[Message]:
        """The room's messages in seq order, each once, across reconnections: from
        ``since + 1`` when given, else new ones. Leaving the loop unsubscribes when no
        other loop reads the room."""
        self._check_open()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(room, since)
            r.queues.append(queue)
            await self._send_subscribe(r)
        else:
            r.queues.append(queue)
        async with contextlib.aclosing(self._drain(r, queue)) as items:
            async for item in items:
                yield item

    async def _drain(self, r: _Room, queue: asyncio.Queue[Any]) -> AsyncGenerator[Any, None]:
        """What the room puts in ``queue`` (already one of its queues) until its
        subscription ends; leaving the loop unsubscribes when no other loop reads the
        room (closed with its reader, so at once). Serves ``messages`` and
        ``state_updates``."""
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    assert r.ended is not None
                    if r.quiet:
                        return
                    raise r.ended
                yield item
        finally:
            current = self._rooms.get(r.name)
            if current is not None and queue in current.queues:
                current.queues.remove(queue)
                if not current.queues:
                    await self.unsubscribe(r.name)

    async def publish(
        self,
        room: str,
        text: str,
        *,
        key: str | None = None,
        reply_to: int | None = None,
        mentions: Sequence[str] | None = None,
    ) -> Message:
        """Publish over the WebSocket; returns the stored message. Sent again with the
        same idempotency key after a reconnection until acked: stored once.
        ``reply_to``: the seq of the message of the room this one replies to (its
        thread then counts it, announced as ``ThreadUpdated``); ``mentions``: user
        ids (at most 50) the message mentions."""
        frame: dict[str, Any] = {"type": "publish", "room": room, "text": text}
        if reply_to is not None:
            frame["reply_to"] = reply_to
        if mentions is not None:
            frame["mentions"] = list(mentions)
        return await self._keyed(frame, key)

    async def edit(self, room: str, seq: int, text: str, *, key: str | None = None) -> Message:
        """Edit the message at ``seq`` over the WebSocket; returns it as edited. Like a
        publish, it carries an idempotency key and is sent again until acked."""
        return await self._keyed({"type": "edit", "room": room, "seq": seq, "text": text}, key)

    async def delete(self, room: str, seq: int, *, key: str | None = None) -> Message:
        """Delete the message at ``seq`` over the WebSocket; returns the tombstone."""
        return await self._keyed({"type": "delete", "room": room, "seq": seq}, key)

    async def react(self, room: str, seq: int, reaction: str) -> Message:
        """Add this user's ``reaction`` to the message at ``seq`` over the WebSocket
        (once per user: again changes nothing); returns the message with its
        reactions. Sent again after a reconnection until acked."""
        return await self._reaction("react", room, seq, reaction)

    async def unreact(self, room: str, seq: int, reaction: str) -> Message:
        """Remove this user's ``reaction`` from the message at ``seq``; returns the
        message with its reactions."""
        return await self._reaction("unreact", room, seq, reaction)

    async def _reaction(self, kind: str, room: str, seq: int, reaction: str) -> Message:
        """A react/unreact frame: idempotent, so one sent again after a reconnection
        changes nothing twice."""
        return await self._acked({"type": kind, "room": room, "seq": seq, "reaction": reaction})

    async def _keyed(self, frame: dict[str, Any], key: str | None) -> Message:
        """Send a frame the server acks with a message, with an idempotency key, until
        acked (again after each reconnection, with the same key)."""
        frame = {**frame, "key": key or uuid.uuid4().hex}
        if self._open_mode and self.user:
            frame["author"] = self.user
        return await self._acked(frame)

    async def _acked(self, frame: dict[str, Any]) -> Message:
        """Send a frame the server acks with a message, with a ref, until acked."""
        self._check_open()
        ref = f"{frame['type']}-{self._next_ref}"
        self._next_ref += 1
        frame = {**frame, "ref": ref}
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[ref] = _Publish(frame, fut)
        await self._send(frame, None)
        return await fut

    async def emit(self, room: str, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every subscriber of an ephemeral room (its namespace is
        ``kind = "ephemeral"`` on the gateway): nothing is stored. Returns once the
        gateway acked it. Sent once, on the connection of the moment: without one, or
        when it closes before the ack, ``GatewayError`` ``disconnected``; in a stored
        room ``wrong_room_kind``. Subscribers get it as an ``Event``."""
        self._check_open()
        if self._ws is None or self.state is not State.CONNECTED:
            raise GatewayError("disconnected", "not connected: nothing was emitted")
        ref = f"emit-{self._next_ref}"
        self._next_ref += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._emits[ref] = fut
        frame = {"type": "emit", "room": room, "event": event, "data": data or {}, "ref": ref}
        try:
            await self._ws.send(json.dumps(frame))
        except ConnectionClosed:
            self._emits.pop(ref, None)
            raise GatewayError(
                "disconnected", "the connection closed: nothing was emitted"
            ) from None
        await fut

    async def typing(self, room: str) -> None:
        """Tell the room's other subscribers that this user is typing (the client must
        hold the room). A refusal comes as a ``GatewayError`` event with ``frame``
        ``"typing"``."""
        if self._ws is None or self.state is not State.CONNECTED:
            return
        await self._send({"type": "typing", "room": room}, ("typing", room))
        # a fence: typing has no answer when it succeeds, the ping after it does
        self._next_ref += 1
        await self._send({"type": "ping", "ref": f"fence-{self._next_ref}"}, ("ping", None))

    @property
    def _open_mode(self) -> bool:
        return self.token is None and self.token_provider is None

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise self._close_error or GatewayError("closed", "the client is closed")

    # -- HTTP ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        auth: str = "user",
        json_body: Any = None,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        if self._http is None:
            raise GatewayError("closed", "the client is not started (use `async with`)")
        hdrs = dict(headers or {})
        secret = self.api_key if auth == "api" else await self._current_token()
        if secret:
            hdrs["authorization"] = f"Bearer {secret}"
        url = self.urls[self._url_index % len(self.urls)] + path
        r = await self._http.request(method, url, json=json_body, params=params, headers=hdrs)
        if r.status_code >= 400:
            raise GatewayError.of_response(r)
        return r

    async def post(
        self, room: str, text: str, *, idempotency_key: str | None = None, retries: int = 3
    ) -> Message:
        """POST a message over HTTP with an ``Idempotency-Key`` (made here unless given);
        a request that fails in transit or with 503 is retried with the same key, so
        the message is stored once."""
        key = idempotency_key or uuid.uuid4().hex
        body: dict[str, Any] = {"text": text}
        return await self._write("POST", f"/v1/rooms/{room}/messages", body, key, retries)

    async def patch_message(
        self,
        room: str,
        seq: int,
        text: str,
        *,
        idempotency_key: str | None = None,
        retries: int = 3,
    ) -> Message:
        """``PATCH /v1/rooms/{room}/messages/{seq}``: edit over HTTP, with an
        ``Idempotency-Key`` kept across retries. With ``api_key`` (and no user token)
        a backend may edit any message."""
        path = f"/v1/rooms/{room}/messages/{seq}"
        return await self._write("PATCH", path, {"text": text}, idempotency_key, retries)

    async def delete_message(
        self, room: str, seq: int, *, idempotency_key: str | None = None, retries: int = 3
    ) -> Message:
        """``DELETE /v1/rooms/{room}/messages/{seq}``: returns the tombstone."""
        path = f"/v1/rooms/{room}/messages/{seq}"
        return await self._write("DELETE", path, {}, idempotency_key, retries)

    async def _write(
        self, method: str, path: str, body: dict[str, Any], key: str | None, retries: int
    ) -> Message:
        """A write over HTTP with an ``Idempotency-Key`` (made here unless given); a
        request that fails in transit or with 503 is retried with the same key."""
        key = key or uuid.uuid4().hex
        if self._open_mode and self.user:
            body = {**body, "author": self.user}
        auth = "api" if self._open_mode and self.api_key else "user"
        for attempt in range(retries + 1):
            try:
                r = await self._request(
                    method, path, auth=auth, json_body=body, headers={"idempotency-key": key}
                )
                return Message.of(r.json())
            except (httpx.TransportError, GatewayError) as exc:
                retryable = isinstance(exc, httpx.TransportError) or exc.code == "unavailable"
                if not retryable or attempt == retries:
                    raise
                await asyncio.sleep(backoff(attempt, self.min_delay, self.max_delay))
        raise AssertionError("unreachable")

    # -- state rooms over HTTP: the API key where one is given (and no user token),
    # else the user's token (where the namespace's client_publish allows) -------------

    def _state_path(self, room: str, key: str | None = None) -> str:
        path = f"/v1/rooms/{quote(room, safe='')}/state"
        return path if key is None else f"{path}/{quote(key, safe='')}"

    @property
    def _state_auth(self) -> str:
        return "api" if self._open_mode and self.api_key else "user"

    async def set_state(self, room: str, key: str, value: Any) -> StateWrite:
        """``PUT /v1/rooms/{room}/state/{key}``: set a key to a JSON value."""
        r = await self._request(
            "PUT", self._state_path(room, key), auth=self._state_auth, json_body={"value": value}
        )
        return StateWrite.of(r.json())

    async def delete_state(self, room: str, key: str) -> StateWrite:
        """``DELETE /v1/rooms/{room}/state/{key}``."""
        r = await self._request("DELETE", self._state_path(room, key), auth=self._state_auth)
        return StateWrite.of(r.json())

    async def patch_state(
        self,
        room: str,
        set: dict[str, Any] | None = None,
        delete: Sequence[str] | None = None,
    ) -> list[StateWrite]:
        """``PATCH /v1/rooms/{room}/state``: one transaction, contiguous seqs (``set``
        in order, then ``delete``); the writes."""
        body: dict[str, Any] = {}
        if set is not None:
            body["set"] = set
        if delete is not None:
            body["delete"] = list(delete)
        r = await self._request(
            "PATCH", self._state_path(room), auth=self._state_auth, json_body=body
        )
        return [StateWrite.of(w, room) for w in r.json()["writes"]]

    async def get_state(self, room: str) -> StateSnapshot:
        """``GET /v1/rooms/{room}/state``: every live key at the room's seq."""
        r = await self._request("GET", self._state_path(room), auth=self._state_auth)
        return StateSnapshot.of(r.json())

    async def presence(self, room: str) -> list[str]:
        """``GET /v1/rooms/{room}/presence``: the users here now, sorted."""
        r = await self._request("GET", f"/v1/rooms/{room}/presence")
        return list(r.json()["users"])

    def _reader(self) -> dict[str, Any]:
        return {"user": self.user} if self._open_mode and self.user else {}

    async def mark_read(self, room: str, seq: int) -> ReadState:
        """``POST /v1/rooms/{room}/read``: read up to ``seq`` (never moves back). Open
        mode: the position of ``user``."""
        r = await self._request(
            "POST", f"/v1/rooms/{room}/read", json_body={"seq": seq, **self._reader()}
        )
        return ReadState.of(r.json())

    async def read_state(self, room: str) -> ReadState:
        """``GET /v1/rooms/{room}/read``: this user's position and unread count."""
        r = await self._request("GET", f"/v1/rooms/{room}/read", params=self._reader())
        return ReadState.of(r.json())

    async def read_positions(self) -> list[ReadState]:
        """``GET /v1/read``: every room this user has a position in or unread
        mentions in (those with position 0)."""
        r = await self._request("GET", "/v1/read", params=self._reader())
        return [ReadState.of(d) for d in r.json()["rooms"]]

    async def replies(
        self, room: str, seq: int, *, after: int | None = None, limit: int | None = None
    ) -> RepliesPage:
        """``GET /v1/rooms/{room}/messages/{seq}/replies``: one page of the replies to
        the message at ``seq``, ascending by seq."""
        params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
        r = await self._request("GET", f"/v1/rooms/{room}/messages/{seq}/replies", params=params)
        data = r.json()
        return RepliesPage(
            [Message.of(m) for m in data["messages"]], data["has_more"], data.get("next")
        )

    async def versions(self, room: str, seq: int, *, api: bool = False) -> list[Version]:
        """``GET /v1/rooms/{room}/messages/{seq}/versions``: the earlier texts of the
        message, oldest first (its author, a moderator of the room, or with ``api``
        the client's API key)."""
        r = await self._request(
            "GET",
            f"/v1/rooms/{room}/messages/{seq}/versions",
            auth="api" if api else "user",
            params=None if api else self._reader(),
        )
        return [Version(v["version"], v["text"], v["edited_at"]) for v in r.json()["versions"]]

    async def history(
        self,
        room: str,
        *,
        limit: int | None = None,
        before: int | None = None,
        after: int | None = None,
    ) -> Page:
        params = {
            k: v
            for k, v in (("limit", limit), ("before", before), ("after", after))
            if v is not None
        }
        r = await self._request("GET", f"/v1/rooms/{room}/messages", params=params)
        data = r.json()
        return Page([Message.of(m) for m in data["messages"]], data["has_more"])

    async def pages(
        self,
        room: str,
        *,
        limit: int | None = None,
        before: int | None = None,
        after: int | None = None,
    ) -> AsyncIterator[list[Message]]:
        """History pages: backwards from the latest (or ``before``), or forwards from
        ``after``; each page ascending by seq."""
        while True:
            page = await self.history(room, limit=limit, before=before, after=after)
            if not page.messages:
                return
            yield page.messages
            if not page.has_more:
                return
            if after is not None:
                after = page.messages[-1].seq
            else:
                before = page.messages[0].seq

    async def search(
        self,
        q: str,
        *,
        rooms: list[str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SearchPage:
        """``GET /v1/search``: messages matching ``q`` (words, the last also a prefix;
        ``"phrases"``; ``-excluded``), newest first, in the rooms the token may read,
        or only ``rooms``."""
        params: list[tuple[str, Any]] = [("q", q), *(("room", r) for r in rooms or ())]
        if limit is not None:
            params.append(("limit", limit))
        if cursor is not None:
            params.append(("cursor", cursor))
        data = (await self._request("GET", "/v1/search", params=params)).json()
        return SearchPage(
            [
                SearchHit(Message.of(h["message"]), [(a, b) for a, b in h["highlights"]])
                for h in data["results"]
            ],
            data["next_cursor"],
        )

    # -- ephemeral events and the server API (api_key) --------------------------------

    async def publish_event(
        self, room: str, event: str, data: dict[str, Any] | None = None
    ) -> None:
        """``POST /v1/publish``: an ephemeral event to the room's subscribers (not stored)."""
        await self._request(
            "POST",
            "/v1/publish",
            auth="api",
            json_body={"room": room, "event": event, "data": data or {}},
        )

    async def broadcast(
        self, rooms: Sequence[str], event: str, data: dict[str, Any] | None = None
    ) -> None:
        """``POST /v1/server/broadcast``: one ephemeral event to many rooms."""
        await self._request(
            "POST",
            "/v1/server/broadcast",
            auth="api",
            json_body={"rooms": list(rooms), "event": event, "data": data or {}},
        )

    async def disconnect_user(self, user: str, reason: str = "") -> None:
        """``POST /v1/server/disconnect``: close every connection of the user (4001)."""
        await self._request(
            "POST", "/v1/server/disconnect", auth="api", json_body={"user": user, "reason": reason}
        )

    async def unsubscribe_user(self, user: str, room: str, reason: str = "") -> None:
        """``POST /v1/server/unsubscribe``: end the user's subscriptions to the room."""
        await self._request(
            "POST",
            "/v1/server/unsubscribe",
            auth="api",
            json_body={"user": user, "room": room, "reason": reason},
        )

    async def rooms(self) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/server/rooms``, every page: active rooms across instances."""
        cursor: Any = None
        while True:
            params = {"cursor": cursor} if cursor is not None else None
            data = (
                await self._request("GET", "/v1/server/rooms", auth="api", params=params)
            ).json()
            for room in data["rooms"]:
                yield room
            cursor = data.get("next")
            if cursor is None:
                return

    async def room_info(self, room: str) -> dict[str, Any]:
        """``GET /v1/server/rooms/{room}``: subscribers, presence, latest seq."""
        info: dict[str, Any] = (
            await self._request("GET", f"/v1/server/rooms/{room}", auth="api")
        ).json()
        return info

    async def purge(self, room: str) -> int:
        """``DELETE /v1/server/rooms/{room}/messages``; returns how many were removed."""
        r = await self._request("DELETE", f"/v1/server/rooms/{room}/messages", auth="api")
        return int(r.json()["removed"])

    # -- moderation (an API key, or a token whose moderate claim grants the room) ----

    def _moderator(self) -> str:
        return "api" if self.api_key else "user"

    async def _restrict(
        self, kind: str, room: str, user: str, duration: int | None, reason: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"user": user, "reason": reason}
        if duration is not None:
            body["duration"] = duration
        path = f"/v1/rooms/{quote(room, safe='')}/{kind}"
        entry: dict[str, Any] = (
            await self._request("POST", path, auth=self._moderator(), json_body=body)
        ).json()
        return entry

    async def _lift(self, kind: str, room: str, user: str) -> dict[str, Any]:
        path = f"/v1/rooms/{quote(room, safe='')}/{kind}/{quote(user, safe='')}"
        entry: dict[str, Any] = (await self._request("DELETE", path, auth=self._moderator())).json()
        return entry

    async def _listed(self, kind: str, room: str) -> list[dict[str, Any]]:
        path = f"/v1/rooms/{quote(room, safe='')}/{kind}"
        data = (await self._request("GET", path, auth=self._moderator())).json()
        return list(data[kind])

    async def ban(
        self, room: str, user: str, *, duration: int | None = None, reason: str = ""
    ) -> dict[str, Any]:
        """``POST /v1/rooms/{room}/bans``: the user may not read, subscribe or post
        there (``duration`` seconds; None: until lifted). Returns the log entry."""
        return await self._restrict("bans", room, user, duration, reason)

    async def unban(self, room: str, user: str) -> dict[str, Any]:
        """``DELETE /v1/rooms/{room}/bans/{user}``; ``not_found`` when not banned."""
        return await self._lift("bans", room, user)

    async def bans(self, room: str) -> list[dict[str, Any]]:
        """``GET /v1/rooms/{room}/bans``: the active bans, by user."""
        return await self._listed("bans", room)

    async def mute(
        self, room: str, user: str, *, duration: int | None = None, reason: str = ""
    ) -> dict[str, Any]:
        """``POST /v1/rooms/{room}/mutes``: the user may read, not post, edit or type."""
        return await self._restrict("mutes", room, user, duration, reason)

    async def unmute(self, room: str, user: str) -> dict[str, Any]:
        """``DELETE /v1/rooms/{room}/mutes/{user}``."""
        return await self._lift("mutes", room, user)

    async def mutes(self, room: str) -> list[dict[str, Any]]:
        """``GET /v1/rooms/{room}/mutes``: the active mutes, by user."""
        return await self._listed("mutes", room)

    async def set_slow_mode(self, room: str, seconds: int) -> None:
        """``PUT /v1/rooms/{room}/settings``: one post per ``seconds`` per user (0: off)."""
        await self._request(
            "PUT",
            f"/v1/rooms/{quote(room, safe='')}/settings",
            auth=self._moderator(),
            json_body={"slow_mode": seconds},
        )

    async def moderation_log(
        self, room: str, *, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """``GET /v1/rooms/{room}/moderation``: (actions newest first, next cursor)."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        data = (
            await self._request(
                "GET",
                f"/v1/rooms/{quote(room, safe='')}/moderation",
                auth=self._moderator(),
                params=params,
            )
        ).json()
        return list(data["actions"]), data["next_cursor"]

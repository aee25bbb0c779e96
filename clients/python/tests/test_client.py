"""The Python client against real gateways: messages in order and once across an
instance kill and a lost ack, idempotent posts, history, events, auth refusals."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import jwt
import pytest
from chat_gateway_client import Client, Event, GatewayError, Message, State, backoff
from client_events import FAST

from tests.harness import eventually, instances, t


async def collect(client: Client, room: str, since: int | None, into: list[int]) -> None:
    async for msg in client.messages(room, since=since):
        into.append(msg.seq)


def test_backoff_has_full_jitter() -> None:
    delays = [backoff(3, 0.1, 0.5) for _ in range(200)]
    assert all(0.1 <= d <= 0.5 for d in delays)
    assert len({round(d, 2) for d in delays}) > 10
    assert backoff(60, 0.1, 1.0) <= 1.0


async def test_publish_post_messages_and_history(gateway_env):
    async with instances(1, gateway_env) as (gw,), Client(gw.url, user="svc", **FAST) as c:
        seqs: list[int] = []
        reader = asyncio.create_task(collect(c, "py", 0, seqs))
        try:
            await eventually(lambda: c.cursor("py") == 0, t(10))
            first = await c.publish("py", "one")
            assert isinstance(first, Message) and first.seq == 1 and first.author == "svc"
            a = await c.post("py", "two", idempotency_key="k-2")
            again = await c.post("py", "two", idempotency_key="k-2")
            assert again == a and a.seq == 2
            # the same key for another text is refused, not stored
            with pytest.raises(GatewayError) as conflict:
                await c.post("py", "two, again", idempotency_key="k-2")
            assert conflict.value.code == "idempotency_conflict"
            # a keyed WS publish shares the HTTP keys
            assert await c.publish("py", "two", key="k-2") == a
            for i in range(3, 8):
                await c.publish("py", f"m{i}")
            await eventually(lambda: len(seqs) == 7, t(10))
            assert seqs == list(range(1, 8))
            back = [[m.seq for m in page] async for page in c.pages("py", limit=3)]
            assert back == [[5, 6, 7], [2, 3, 4], [1]]
            fwd = [[m.seq for m in page] async for page in c.pages("py", limit=4, after=1)]
            assert fwd == [[2, 3, 4, 5], [6, 7]]
            with pytest.raises(GatewayError) as bad:
                await c.publish("bad room", "x")
            assert bad.value.code == "invalid_request"
            with pytest.raises(GatewayError) as bad_sub:
                await c.subscribe("-x")
            assert bad_sub.value.code == "invalid_request" and bad_sub.value.room == "-x"
            # unsubscribing ends the room's loop quietly
            await c.unsubscribe("py")
            await asyncio.wait_for(reader, t(5))
            assert c.cursor("py") is None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_instance_killed_mid_stream_resumes_elsewhere_without_gap_or_duplicate(gateway_env):
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with Client([a.url, b.url], **FAST) as c:
            assert c.state is State.CONNECTED
            states: list[Any] = []

            async def watch() -> None:
                async for ev in c.events():
                    if not isinstance(ev, Message):
                        states.append(ev)

            watcher = asyncio.create_task(watch())
            seqs: list[int] = []
            reader = asyncio.create_task(collect(c, "kill", 0, seqs))
            await eventually(lambda: c.cursor("kill") == 0, t(10))
            total = 120

            async def poster() -> None:
                for i in range(total):
                    r = await http.post(b.url + "/v1/rooms/kill/messages", json={"text": f"{i}"})
                    assert r.status_code == 201
                    if i % 10 == 0:
                        await asyncio.sleep(0.005)

            posting = asyncio.create_task(poster())
            await eventually(lambda: len(seqs) >= 40, t(20))
            a.kill()
            await posting
            await eventually(lambda: len(seqs) >= total, t(30))
            await asyncio.sleep(t(0.3))
            assert seqs == list(range(1, total + 1))
            dropped = [s for s in states if getattr(s, "state", None) is State.DISCONNECTED]
            assert dropped, "the kill was seen as a drop"
            await eventually(lambda: c.state is State.CONNECTED, t(10))
            for task in (reader, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class LossyClient(Client):
    """Drops its connection, once, at the moment an ack arrives: the server stored
    the message, the client never heard of it."""

    armed = False
    dropped = 0
    sent: list[dict[str, Any]]

    def _on_frame(self, f: dict[str, Any]) -> None:
        if self.armed and f.get("type") == "ack":
            self.armed = False
            self.dropped += 1
            self._ws.transport.abort()
            return
        super()._on_frame(f)


async def test_publish_whose_ack_was_lost_is_stored_once(gateway_env):
    async with instances(1, gateway_env) as (gw,), LossyClient(gw.url, **FAST) as c:
        assert (await c.publish("once", "before")).seq == 1
        c.armed = True
        msg = await asyncio.wait_for(c.publish("once", "exactly once"), t(20))
        assert c.dropped == 1
        assert msg.seq == 2 and msg.text == "exactly once"
        assert (await c.publish("once", "after")).seq == 3
        page = await c.history("once")
        assert [m.text for m in page.messages] == ["before", "exactly once", "after"]


async def test_ephemeral_publish_needs_the_api_key(gateway_env):
    env = {**gateway_env, "API_KEYS": "key-1"}
    async with instances(1, env) as (gw,):
        async with Client(gw.url, api_key="key-1") as svc, Client(gw.url) as wrong:
            events: list[Event] = []

            async def watch() -> None:
                async for ev in svc.events():
                    if isinstance(ev, Event):
                        events.append(ev)

            watcher = asyncio.create_task(watch())
            await svc.subscribe("ev")
            await svc.publish_event("ev", "deploy", {"v": 2})
            await eventually(lambda: events, t(10))
            assert events == [Event("ev", "deploy", {"v": 2})]
            with pytest.raises(GatewayError) as refused:
                await wrong.publish_event("ev", "deploy")
            assert refused.value.status == 401 and refused.value.code == "unauthorized"
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_emit_reaches_subscribers_of_an_ephemeral_room(gateway_env, tmp_path):
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text('[namespaces.live]\nkind = "ephemeral"\n')
    env = {**gateway_env, "NAMESPACES_FILE": str(namespaces)}
    async with instances(1, env) as (gw,):
        async with Client(gw.url, user="ana", **FAST) as ana, Client(gw.url, user="bob") as bob:
            events: list[Event] = []

            async def watch() -> None:
                async for ev in bob.events():
                    if isinstance(ev, Event):
                        events.append(ev)

            watcher = asyncio.create_task(watch())
            await bob.subscribe("live:x")
            await ana.wait_connected()
            assert await ana.emit("live:x", "goal", {"min": 9}) is None
            await eventually(lambda: events, t(10))
            assert events == [Event("live:x", "goal", {"min": 9})]
            # nothing stored there; and a stored room takes no emit
            with pytest.raises(GatewayError) as stored:
                await ana.emit("lobby", "goal")
            assert stored.value.code == "wrong_room_kind"
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_refused_upgrade_closes_for_good_and_a_provider_outlives_expiry(gateway_env):
    secret = "sdk-test-secret-0123456789abcdef"
    env = {**gateway_env, "AUTH_SECRET": secret}

    def token(sub: str, ttl: float, key: str = secret) -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, key, algorithm="HS256")

    async with instances(1, env) as (gw,):
        bad = Client(gw.url, token=token("ana", 60, "wrong-secret-0123456789abcdef-xx"), **FAST)
        with pytest.raises(GatewayError) as refused:
            await bad.start()
        assert refused.value.code == "unauthorized" and refused.value.status == 401
        assert bad.state is State.CLOSED
        await bad.close()

        issued = 0

        async def provider() -> str:
            nonlocal issued
            issued += 1
            return token("ana", 2)

        async with (
            Client(gw.url, token_provider=provider, refresh_margin=1, **FAST) as c,
            Client(gw.url, token=token("bob", 600)) as bob,
        ):
            seqs: list[int] = []
            reader = asyncio.create_task(collect(c, "auth", 0, seqs))
            await eventually(lambda: c.cursor("auth") == 0, t(10))
            n = 0
            deadline = time.monotonic() + 9  # past a few expiries (2 s + the 5 s leeway)
            while time.monotonic() < deadline:
                n += 1
                await bob.publish("auth", f"m{n}")
                await asyncio.sleep(0.1)
            await eventually(lambda: len(seqs) == n, t(20))
            assert seqs == list(range(1, n + 1))
            assert issued >= 2
            await eventually(lambda: c.state is State.CONNECTED, t(10))
            assert (await c.publish("auth", "mine")).author == "ana"
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_message_loops_end_with_the_client(gateway_env):
    secret = "sdk-test-secret-0123456789abcdef"
    env = {**gateway_env, "AUTH_SECRET": secret}
    async with instances(1, env) as (gw,):
        # closed by the application: the loop just stops
        c = Client(
            gw.url,
            token=jwt.encode(
                {"sub": "ana", "exp": int(time.time() + 60)}, secret, algorithm="HS256"
            ),
        )
        await c.start()
        seqs: list[int] = []
        reader = asyncio.create_task(collect(c, "end", 0, seqs))
        await eventually(lambda: c.cursor("end") == 0, t(10))
        await c.close()
        await asyncio.wait_for(reader, t(5))
        # a token that expires with no provider to renew it: closed for good (1008),
        # and the loop raises
        c = Client(
            gw.url,
            token=jwt.encode(
                {"sub": "ana", "exp": int(time.time() + 1)}, secret, algorithm="HS256"
            ),
            **FAST,
        )
        await c.start()
        reader = asyncio.create_task(collect(c, "end", 0, seqs))
        with pytest.raises(GatewayError) as ended:
            await asyncio.wait_for(reader, t(20))
        assert ended.value.code == "policy_violation"
        assert c.state is State.CLOSED
        with pytest.raises(GatewayError):
            await c.publish("end", "too late")
        await c.close()

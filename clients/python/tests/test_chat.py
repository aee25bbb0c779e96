"""The chat surfaces against real gateways: edits and deletes (WebSocket and HTTP),
changes resumed across a reconnection, typing, read state and presence, and errors
that say what the server said."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import jwt
import pytest
from chat_gateway_client import (
    Change,
    Client,
    GatewayError,
    Message,
    Reaction,
    ReactionsUpdated,
    Read,
    ReadState,
    State,
    StateChange,
    Subscribed,
    Typing,
)
from client_events import FAST, watching

from tests.harness import eventually, instances, t


def of(kind: type, seen: list[Any]) -> list[Any]:
    return [ev for ev in seen if isinstance(ev, kind)]


async def test_edit_and_delete_over_the_socket_reach_subscribers_with_their_fields(gateway_env):
    async with (
        instances(1, gateway_env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
        watching(bob) as seen,
    ):
        await bob.subscribe("edits", since=0)
        first = await ana.publish("edits", "helo")
        assert (first.version, first.edited_at, first.deleted_at) == (None, None, None)
        assert not first.deleted
        edited = await ana.edit("edits", first.seq, "hello")
        assert edited.text == "hello" and edited.version == 2
        assert edited.edited_at is not None and edited.deleted_at is None
        assert not edited.deleted
        gone = await ana.delete("edits", first.seq)
        assert gone.text == "" and gone.deleted and gone.version == 3
        # someone else's message: refused with the server's code and sentence
        with pytest.raises(GatewayError) as refused:
            await bob.edit("edits", first.seq, "mine now")
        assert refused.value.code in ("forbidden", "not_found")
        assert refused.value.message
        await eventually(lambda: len(of(Change, seen)) == 2, t(10))
        upd, dele = of(Change, seen)
        assert (upd.kind, upd.message.text, upd.message.version) == ("updated", "hello", 2)
        assert (dele.kind, dele.message.deleted) == ("deleted", True)
        assert isinstance(upd.change, int) and dele.change == upd.change + 1
        subscribed = of(Subscribed, seen)
        assert subscribed and subscribed[0].room == "edits" and subscribed[0].change == 0
        assert subscribed[0].kind == "stored"


async def test_react_and_unreact_return_the_summary_and_subscribers_get_reactions_updated(
    gateway_env,
):
    async with (
        instances(1, gateway_env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
        watching(bob) as seen,
    ):
        await bob.subscribe("reacts", since=0)
        first = await ana.publish("reacts", "hello")
        assert first.reactions is None
        liked = await ana.react("reacts", first.seq, "+1")
        assert liked.reactions == {"+1": Reaction(1, ["ana"])}
        again = await bob.react("reacts", first.seq, "+1")
        assert again.reactions == {"+1": Reaction(2, ["ana", "bob"])}
        back = await ana.unreact("reacts", first.seq, "+1")
        assert back.reactions == {"+1": Reaction(1, ["bob"])}
        with pytest.raises(GatewayError) as refused:
            await ana.react("reacts", first.seq, " ")
        assert refused.value.code == "invalid_request"
        await eventually(lambda: len(of(ReactionsUpdated, seen)) == 3, t(10))
        got = of(ReactionsUpdated, seen)
        assert [(u.room, u.seq, u.change) for u in got] == [
            ("reacts", first.seq, n) for n in (1, 2, 3)
        ]
        assert got[-1].reactions == back.reactions


async def test_a_change_made_while_away_arrives_after_the_reconnection_once(gateway_env):
    async with (
        instances(1, gateway_env) as (gw,),
        httpx.AsyncClient(timeout=10) as http,
        Client(gw.url, user="ana", min_delay=1.0, max_delay=1.0) as c,
        watching(c) as seen,
    ):
        await c.subscribe("away", since=0)
        await c.publish("away", "one")
        await c.publish("away", "two")
        await c.edit("away", 1, "uno")
        await eventually(lambda: len(of(Change, seen)) == 1, t(10))
        # the socket drops; while the client waits to reconnect, a message is deleted
        c._ws.transport.abort()
        await eventually(lambda: c.state is State.DISCONNECTED, t(10))
        r = await http.request(
            "DELETE", f"{gw.url}/v1/rooms/away/messages/2", json={"author": "ana"}
        )
        assert r.status_code == 200
        await eventually(lambda: len(of(Change, seen)) == 2, t(15))
        late = of(Change, seen)[1]
        assert late.kind == "deleted" and late.message.seq == 2
        await eventually(lambda: c.state is State.CONNECTED, t(10))
        await asyncio.sleep(t(0.5))
        assert len(of(Change, seen)) == 2, "no change twice"


async def test_typing_read_state_and_presence(gateway_env):
    async with (
        instances(1, gateway_env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
        watching(bob) as seen,
    ):
        await ana.subscribe("desk")
        await bob.subscribe("desk")
        await ana.typing("desk")
        await eventually(lambda: of(Typing, seen), t(10))
        assert of(Typing, seen) == [Typing("desk", "ana")]
        assert await bob.presence("desk") == ["ana", "bob"]
        for i in range(3):
            await ana.publish("desk", f"m{i}")
        assert await bob.mark_read("desk", 2) == ReadState("desk", 2, 1)
        assert await bob.mark_read("desk", 1) == ReadState("desk", 2, 1)  # never back
        assert await bob.read_state("desk") == ReadState("desk", 2, 1)
        assert await bob.read_positions() == [ReadState("desk", 2, 1)]
        assert await ana.read_positions() == []
        # ana's receipt reaches bob
        await ana.mark_read("desk", 3)
        await eventually(lambda: [r for r in of(Read, seen) if r.user == "ana"], t(10))
        receipt = [r for r in of(Read, seen) if r.user == "ana"][0]
        assert (receipt.room, receipt.seq) == ("desk", 3)
        # a typing frame for a room not held is refused; the error names the frame
        async with watching(ana) as mine:
            await ana.typing("elsewhere")
            await eventually(lambda: of(GatewayError, mine), t(10))
        err = of(GatewayError, mine)[0]
        assert (err.code, err.frame, err.room) == ("invalid_request", "typing", "elsewhere")
        # the answers of later frames are not shifted by it
        assert await ana.subscribe("later") == 0


async def test_a_backend_edits_and_deletes_any_message_over_http(gateway_env):
    env = {**gateway_env, "API_KEYS": "key-1"}
    async with (
        instances(1, env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, api_key="key-1") as svc,
    ):
        msg = await ana.post("mod", "spam")
        edited = await svc.patch_message("mod", msg.seq, "[removed]", idempotency_key="e1")
        assert edited.text == "[removed]" and edited.author == "ana" and edited.version == 2
        # a repeat of the key changes nothing and answers the message as it is
        again = await svc.patch_message("mod", msg.seq, "other", idempotency_key="e1")
        assert again == edited and again.version == 2
        tomb = await svc.delete_message("mod", msg.seq)
        assert tomb.deleted and tomb.text == ""
        with pytest.raises(GatewayError) as missing:
            await svc.patch_message("mod", 99, "x")
        assert (missing.value.code, missing.value.status) == ("not_found", 404)
        page = await ana.history("mod")
        assert page.messages[0].deleted_at is not None


async def test_a_refused_upgrade_says_why(gateway_env):
    secret = "sdk-test-secret-0123456789abcdef"
    env = {**gateway_env, "AUTH_SECRET": secret}
    async with instances(1, env) as (gw,):
        c = Client(gw.url, **FAST)  # no token
        with pytest.raises(GatewayError) as refused:
            await c.start()
        err = refused.value
        assert (err.code, err.status) == ("unauthorized", 401)
        assert err.message == "a bearer token is required"
        assert c.state is State.CLOSED
        await c.close()
        # a rate-limited or crowded upgrade is retried, and each attempt's state says why
        token = jwt.encode({"sub": "ana", "exp": int(time.time() + 60)}, secret, "HS256")
        crowded = {**env, "MAX_CONNECTIONS_PER_IDENTITY": "1"}
        async with instances(1, crowded) as (gw2,), Client(gw2.url, token=token) as first:
            assert first.state is State.CONNECTED
            second = Client(gw2.url, token=token, **FAST)
            async with watching(second) as seen:
                starting = asyncio.create_task(second.start())
                await eventually(
                    lambda: [s for s in of(StateChange, seen) if s.state is State.DISCONNECTED],
                    t(10),
                )
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            await second.close()
            down = [s for s in of(StateChange, seen) if s.state is State.DISCONNECTED][0]
            assert down.status == 429 and down.error.code == "too_many_connections"
            assert down.error.detail.get("limit") == 1
            assert down.reason == down.error.message


async def test_http_errors_carry_code_status_message_and_retry_hint(gateway_env):
    env = {**gateway_env, "RATE_LIMIT": "1/60s"}
    async with instances(1, env) as (gw,), Client(gw.url, user="ana") as c:
        assert isinstance(await c.post("rl", "one"), Message)
        with pytest.raises(GatewayError) as limited:
            await c.post("rl", "two", retries=0)
        err = limited.value
        assert (err.code, err.status) == ("rate_limited", 429)
        assert err.message and err.retry_after is not None and err.retry_after > 0
        assert err.detail["code"] == "rate_limited"

"""Replies, mentions and versions through the Python client against real gateways:
``publish(reply_to=, mentions=)``, ``ThreadUpdated`` events in the change stream,
``replies()`` pages, unread mentions in the read state, ``versions()`` and who may
read them."""

from __future__ import annotations

import pytest
from chat_gateway_client import (
    Client,
    GatewayError,
    ReadState,
    Thread,
    ThreadUpdated,
    Version,
)
from client_events import FAST, watching

from tests.harness import eventually, instances, t


async def test_replies_update_the_thread_and_page(gateway_env):
    async with (
        instances(1, gateway_env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
        watching(bob) as seen,
    ):
        await bob.subscribe("threads", since=0)
        parent = await ana.publish("threads", "question")
        assert parent.thread is None and parent.reply_to is None
        one = await bob.publish("threads", "one", reply_to=parent.seq)
        two = await ana.publish("threads", "two", reply_to=parent.seq, mentions=["bob", "bob"])
        assert one.reply_to == parent.seq and two.mentions == ["bob"]
        await eventually(lambda: len([e for e in seen if isinstance(e, ThreadUpdated)]) == 2, t(10))
        updates = [e for e in seen if isinstance(e, ThreadUpdated)]
        assert [(u.room, u.seq, u.change) for u in updates] == [
            ("threads", parent.seq, 1),
            ("threads", parent.seq, 2),
        ]
        assert updates[-1].thread == Thread(2, two.seq, two.created_at)
        page = await ana.replies("threads", parent.seq, limit=1)
        assert [m.text for m in page.messages] == ["one"] and page.has_more
        rest = await ana.replies("threads", parent.seq, after=page.next)
        assert [m.text for m in rest.messages] == ["two"] and rest.next is None
        history = await ana.history("threads")
        assert history.messages[0].thread == updates[-1].thread
        with pytest.raises(GatewayError) as missing:
            await ana.publish("threads", "to nothing", reply_to=99)
        assert missing.value.code == "not_found"


async def test_unread_mentions_in_the_read_state(gateway_env):
    async with (
        instances(1, gateway_env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
    ):
        first = await ana.publish("mentions", "hello")
        await bob.mark_read("mentions", first.seq)
        m = await ana.publish("mentions", "bob?", mentions=["bob"])
        await ana.publish("mentions", "cy?", mentions=["cy"])
        assert await bob.read_state("mentions") == ReadState("mentions", first.seq, 2, 1)
        assert await bob.read_positions() == [ReadState("mentions", first.seq, 2, 1)]
        assert await bob.mark_read("mentions", m.seq) == ReadState("mentions", m.seq, 1, 0)


async def test_versions_for_the_author_and_an_api_key_not_others(gateway_env):
    env = {**gateway_env, "API_KEYS": "versions-key"}
    async with (
        instances(1, env) as (gw,),
        Client(gw.url, user="ana", **FAST) as ana,
        Client(gw.url, user="bob", **FAST) as bob,
        Client(gw.url, api_key="versions-key", **FAST) as backend,
    ):
        m = await ana.publish("versions", "draft")
        edited = await ana.edit("versions", m.seq, "final")
        expected = [Version(1, "draft", edited.edited_at or "")]
        assert await ana.versions("versions", m.seq) == expected
        assert await backend.versions("versions", m.seq, api=True) == expected
        with pytest.raises(GatewayError) as refused:
            await bob.versions("versions", m.seq)
        assert refused.value.code == "forbidden"
        await ana.delete("versions", m.seq)
        with pytest.raises(GatewayError) as gone:
            await ana.versions("versions", m.seq)
        assert gone.value.code == "not_found"

"""``Client.search`` against a real gateway."""

from __future__ import annotations

import pytest
from chat_gateway_client import Client, GatewayError

from tests.harness import instances


async def test_search_finds_highlights_rooms_and_pages(gateway_env):
    async with instances(1, gateway_env) as (gw,), Client(gw.url, user="svc") as c:
        await c.post("py-one", "😀 kickoff meeting")
        await c.post("py-two", "meeting notes")
        await c.post("py-two", "nothing here")
        page = await c.search("meeting")
        assert [h.message.text for h in page.results] == ["meeting notes", "😀 kickoff meeting"]
        hit = page.results[1]
        assert [hit.message.text[a:b] for a, b in hit.highlights] == ["meeting"]
        only = await c.search("meet", rooms=["py-one"])
        assert [h.message.room for h in only.results] == ["py-one"]
        first = await c.search("meeting", limit=1)
        second = await c.search("meeting", limit=1, cursor=first.next_cursor)
        assert [h.message.text for h in second.results] == ["😀 kickoff meeting"]
        assert second.next_cursor is None
        nothing = await c.search("-only")  # no word to find: no results, no error
        assert nothing.results == [] and nothing.next_cursor is None
        with pytest.raises(GatewayError) as refused:
            await c.search("meeting", cursor="not a cursor")
        assert refused.value.code == "invalid_request"

"""The moderation methods of ``Client`` against a real gateway."""

from __future__ import annotations

import pytest
from chat_gateway_client import Client, GatewayError

from tests.harness import instances

KEY = "client-moderation-key"


async def test_ban_mute_slow_mode_and_the_log(gateway_env):
    env = {**gateway_env, "API_KEYS": KEY}
    async with (
        instances(1, env) as (gw,),
        Client(gw.url, api_key=KEY) as mod,
        Client(gw.url, user="ana") as ana,
    ):
        entry = await mod.ban("py-mod", "ana", duration=600, reason="spam")
        assert entry["action"] == "banned" and entry["expires_at"] is not None
        assert [b["user"] for b in await mod.bans("py-mod")] == ["ana"]
        with pytest.raises(GatewayError) as refused:
            await ana.post("py-mod", "hello")
        assert refused.value.code == "banned"
        await mod.unban("py-mod", "ana")
        with pytest.raises(GatewayError) as missing:
            await mod.unban("py-mod", "ana")
        assert missing.value.code == "not_found"
        await mod.mute("py-mod", "ana")
        assert [m["user"] for m in await mod.mutes("py-mod")] == ["ana"]
        with pytest.raises(GatewayError) as muted:
            await ana.post("py-mod", "hello")
        assert muted.value.code == "muted"
        await mod.unmute("py-mod", "ana")
        await mod.set_slow_mode("py-mod", 600)
        await ana.post("py-mod", "first")
        with pytest.raises(GatewayError) as slow:
            await ana.post("py-mod", "second")
        assert slow.value.code == "slow_mode"
        actions, cursor = await mod.moderation_log("py-mod", limit=2)
        assert [a["action"] for a in actions] == ["slow_mode", "unmuted"]
        older, _ = await mod.moderation_log("py-mod", cursor=cursor)
        assert [a["action"] for a in older] == ["muted", "unbanned", "banned"]

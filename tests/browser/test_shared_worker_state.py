"""A state room through the JavaScript client's SharedWorker mode in Chromium: two
tabs share one socket; each gets the room's values (the second from what the worker
holds) and every write after, and ends with the store's values."""

from __future__ import annotations

from typing import Any

import httpx

from tests.harness import eventually, instances, t

SETUP = """async ([url, room]) => {
    const { sharedClient } = await import("/sdk/chat-gateway.js");
    const c = sharedClient(url, { minDelay: 50, maxDelay: 400 });
    window.updates = [];
    c.on("value", (ev) => window.updates.push([ev.key, ev.value ?? null, !!ev.deleted]));
    await c.connect();
    window.view = await c.subscribeState(room, { conflateMs: 0 });
    window.client = c;
    return c.constructor.name;
}"""

VALUES = "() => ({seq: window.view.seq, values: window.view.toJSON()})"


async def test_two_tabs_share_a_state_room_through_the_worker(gateway_env, browser, tmp_path):
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text('[namespaces.ticker]\nkind = "state"\nconflate_ms = 0\n')
    env = {**gateway_env, "NAMESPACES_FILE": str(namespaces)}
    room = "ticker:shared"
    async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url, timeout=10) as http:

        async def put(key: str, value: Any) -> None:
            r = await http.put(f"/v1/rooms/{room}/state/{key}", json={"value": value})
            assert r.status_code == 200, r.text

        async def store() -> dict[str, Any]:
            got = (await http.get(f"/v1/rooms/{room}/state")).json()
            return {"seq": got["seq"], "values": {k: e["value"] for k, e in got["values"].items()}}

        context = await browser.browser.new_context()
        tabs = []
        for label in ("tab-a", "tab-b"):
            tab = await context.new_page()
            tab.set_default_timeout(t(20) * 1000)
            tab.on("pageerror", lambda exc, label=label: browser.errors.append(f"{label}: {exc}"))
            browser.pages.append((label, tab))
            await tab.goto(f"{gw.url}/healthz")  # the gateway's origin
            tabs.append(tab)
        tab_a, tab_b = tabs

        await put("btc", {"usd": 1})
        assert await tab_a.evaluate(SETUP, [gw.url, room]) == "SharedClient"
        assert await tab_a.evaluate(VALUES) == {"seq": 1, "values": {"btc": {"usd": 1}}}
        await put("eth", 2)
        await tab_a.wait_for_function("window.view.seq === 2")
        # the second tab joins late: the values the worker holds, then the writes
        assert await tab_b.evaluate(SETUP, [gw.url, room]) == "SharedClient"
        assert await tab_b.evaluate(VALUES) == {"seq": 2, "values": {"btc": {"usd": 1}, "eth": 2}}
        await put("btc", {"usd": 3})
        r = await http.delete(f"/v1/rooms/{room}/state/eth")
        assert r.status_code == 200
        want = await store()

        async def both_current() -> bool:
            return all([await tab.evaluate(VALUES) == want for tab in tabs])

        await eventually(both_current, t(20))
        assert want["values"] == {"btc": {"usd": 3}}
        assert await tab_a.evaluate("window.updates") == [
            ["eth", 2, False],
            ["btc", {"usd": 3}, False],
            ["eth", None, True],
        ]
        assert await tab_b.evaluate("window.updates") == [
            ["btc", {"usd": 3}, False],
            ["eth", None, True],
        ]
        # one WebSocket for both tabs
        metrics = (await http.get("/metrics")).text
        assert 'chat_connections{transport="ws"} 1.0' in metrics
        await context.close()

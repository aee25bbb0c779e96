"""One socket per browser, not per tab: the JavaScript client's SharedWorker mode
(``sharedClient``) in Chromium, two tabs of one origin against a real gateway. The
gateway sees one WebSocket; each tab has its own rooms and gets each of their
messages once, in order (a tab that joins late is filled from its own cursor);
closing one tab leaves its rooms and keeps the other's; reactions, threads and
edits reach each tab holding the room once; a search goes through the worker. Where SharedWorker is
missing, ``sharedClient`` is a plain ``Client``."""

from __future__ import annotations

import re
from typing import Any

import httpx
from playwright.async_api import Page

from tests.harness import eventually, instances, post, t

KEY = "key-1"

SETUP = """async ([url, rooms, since]) => {
    const { sharedClient } = await import("/sdk/chat-gateway.js");
    const c = sharedClient(url, { user: "ana", minDelay: 50, maxDelay: 400 });
    window.got = {};
    c.on("message", (m) => (window.got[m.room] ??= []).push(m.seq));
    await c.connect();
    for (const room of rooms) await c.subscribe(room, { since });
    window.client = c;
    return c.constructor.name;
}"""


async def ws_connections(http: httpx.AsyncClient, url: str) -> int:
    text = (await http.get(url + "/metrics")).text
    m = re.search(r'^chat_connections\{transport="ws"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


async def subscribers(http: httpx.AsyncClient, url: str, room: str) -> int:
    r = await http.get(f"{url}/v1/server/rooms/{room}", headers={"authorization": f"Bearer {KEY}"})
    return int(r.json()["subscribers"])


async def got(page: Page) -> dict[str, Any]:
    return dict(await page.evaluate("window.got"))


async def test_two_tabs_share_one_socket_each_with_its_own_rooms(gateway_env, browser):
    env = {**gateway_env, "API_KEYS": KEY}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        context = await browser.browser.new_context()
        tab_a = await context.new_page()
        tab_b = await context.new_page()
        for label, tab in (("tab-a", tab_a), ("tab-b", tab_b)):
            tab.set_default_timeout(t(20) * 1000)
            tab.on("pageerror", lambda exc, label=label: browser.errors.append(f"{label}: {exc}"))
            browser.pages.append((label, tab))
            await tab.goto(f"{gw.url}/healthz")  # the gateway's origin

        assert await tab_a.evaluate(SETUP, [gw.url, ["shared", "only-a"], 0]) == "SharedClient"
        for i in range(1, 4):
            assert (await post(http, gw.url, "shared", f"s{i}")).status_code == 201
        await tab_a.wait_for_function("(window.got.shared ?? []).length === 3")
        # the second tab joins late, from the first message: filled from its own cursor
        assert await tab_b.evaluate(SETUP, [gw.url, ["shared", "only-b"], 0]) == "SharedClient"
        for i in range(4, 7):
            assert (await post(http, gw.url, "shared", f"s{i}")).status_code == 201
        for room in ("only-a", "only-b"):
            for i in range(1, 3):
                assert (await post(http, gw.url, room, f"{room}{i}")).status_code == 201

        async def settled() -> bool:
            a, b = await got(tab_a), await got(tab_b)
            return (
                len(a.get("shared", [])) >= 6
                and len(b.get("shared", [])) >= 6
                and (len(a.get("only-a", [])) >= 2 and len(b.get("only-b", [])) >= 2)
            )

        await eventually(settled, t(20))
        assert await got(tab_a) == {"shared": [1, 2, 3, 4, 5, 6], "only-a": [1, 2]}
        assert await got(tab_b) == {"shared": [1, 2, 3, 4, 5, 6], "only-b": [1, 2]}
        # one socket for both tabs, one subscription per room
        assert await ws_connections(http, gw.url) == 1
        assert await subscribers(http, gw.url, "shared") == 1

        # the first tab goes: its own room is left, the other tab's rooms stay
        await tab_a.close(run_before_unload=True)
        browser.pages = [(label, p) for label, p in browser.pages if p is not tab_a]

        async def left() -> bool:
            return await subscribers(http, gw.url, "only-a") == 0

        await eventually(left, t(30))
        for i in range(7, 9):
            assert (await post(http, gw.url, "shared", f"s{i}")).status_code == 201
        assert (await post(http, gw.url, "only-b", "only-b3")).status_code == 201
        await tab_b.wait_for_function(
            "window.got.shared.length === 8 && window.got['only-b'].length === 3"
        )
        assert await got(tab_b) == {"shared": list(range(1, 9)), "only-b": [1, 2, 3]}
        assert await ws_connections(http, gw.url) == 1
        assert await subscribers(http, gw.url, "only-b") == 1
        assert not browser.errors, browser.errors
        await context.close()


async def test_without_shared_worker_each_tab_has_its_own_client(gateway_env, browser):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        page = await browser.open(f"{gw.url}/healthz", "no-shared-worker")
        await page.evaluate("delete window.SharedWorker")
        assert await page.evaluate(SETUP, [gw.url, ["solo"], 0]) == "Client"
        assert (await post(http, gw.url, "solo", "one")).status_code == 201
        await page.wait_for_function("(window.got.solo ?? []).length === 1")
        assert await got(page) == {"solo": [1]}
        assert not browser.errors, browser.errors


async def test_the_gateway_serves_the_worker_next_to_the_client(gateway_env):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        for path in ("/sdk/chat-gateway.js", "/sdk/index.js", "/sdk/worker.js"):
            r = await http.get(gw.url + path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith("text/javascript"), path
        worker = (await http.get(gw.url + "/sdk/worker.js")).text
        assert 'from "./index.js"' in worker


CHANGES = """async ([url, room]) => {
    const { sharedClient } = await import("/sdk/chat-gateway.js");
    const c = sharedClient(url, { user: "ana", minDelay: 50, maxDelay: 400 });
    window.seen = [];
    for (const type of ["change", "reactions", "thread"]) {
        c.on(type, (ev) => window.seen.push([type, ev.room, ev.change, ev.seq ?? ev.message.seq]));
    }
    await c.connect();
    const answer = await c.subscribe(room);
    window.client = c;
    return [c.constructor.name, answer.kind];
}"""


async def test_reactions_and_threads_reach_every_tab_of_the_room_once(gateway_env, browser):
    room = "shared-changes"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        assert (await post(http, gw.url, room, "parent")).status_code == 201
        context = await browser.browser.new_context()
        tabs = []
        for label in ("tab-a", "tab-b", "tab-c"):
            tab = await context.new_page()
            tab.set_default_timeout(t(20) * 1000)
            tab.on("pageerror", lambda exc, label=label: browser.errors.append(f"{label}: {exc}"))
            browser.pages.append((label, tab))
            await tab.goto(f"{gw.url}/healthz")
            tabs.append(tab)
        tab_a, tab_b, tab_c = tabs
        for tab in (tab_a, tab_b):
            assert await tab.evaluate(CHANGES, [gw.url, room]) == ["SharedClient", "stored"]
        # the third tab shares the socket but holds another room
        assert await tab_c.evaluate(CHANGES, [gw.url, "elsewhere"]) == ["SharedClient", "stored"]
        summary = await tab_a.evaluate(
            "([room]) => window.client.react(room, 1, 'ok').then((m) => m.reactions)", [room]
        )
        assert "ok" in summary, summary
        r = await http.post(
            f"{gw.url}/v1/rooms/{room}/messages",
            json={"text": "a reply", "author": "bob", "reply_to": 1},
        )
        assert r.status_code == 201, r.text
        r = await http.patch(
            f"{gw.url}/v1/rooms/{room}/messages/1",
            json={"text": "parent, edited", "author": "tester"},
        )
        assert r.status_code == 200, r.text
        expected = [
            ["reactions", room, 1, 1],
            ["thread", room, 2, 1],
            ["change", room, 3, 1],
        ]
        for tab in (tab_a, tab_b):
            await tab.wait_for_function("window.seen.length >= 3")
            assert await tab.evaluate("window.seen") == expected
        assert await tab_c.evaluate("window.seen") == [], "a tab without the room gets none"
        # search goes through the shared connection's client as every HTTP call does
        hits = await tab_b.evaluate(
            "([room]) => window.client.search('reply', { rooms: [room] })"
            ".then((r) => r.results.map((h) => [h.message.room, h.message.seq]))",
            [room],
        )
        assert hits == [[room, 2]], hits
        assert await ws_connections(http, gw.url) == 1
        assert not browser.errors, browser.errors
        await context.close()

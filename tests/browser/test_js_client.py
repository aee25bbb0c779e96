"""The JavaScript client (clients/js) in a real browser, loaded as a plain ES module
(no bundler, the browser's own WebSocket), against real gateway processes: it
resumes on another instance after its instance is killed, with no gap and no
duplicate, and its publishes are stored once."""

from __future__ import annotations

import httpx
from playwright.async_api import Route

from tests.harness import ROOT, instances, post, t

SDK = (ROOT / "clients" / "js" / "src" / "index.js").read_text()


async def test_js_client_in_chromium_resumes_across_an_instance_kill(gateway_env, browser):
    async with instances(2, gateway_env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        page = await browser.open("about:blank", "sdk")

        async def serve(route: Route) -> None:
            await route.fulfill(body=SDK, content_type="text/javascript")

        # the document comes from the gateway itself (a page the browser got from a
        # loopback address may open sockets to loopback); the module is the file as is
        await page.route(f"{a.url}/sdk/index.js", serve)
        await page.goto(f"{a.url}/healthz")
        await page.evaluate(
            """async ([a, b]) => {
            const { Client } = await import("/sdk/index.js");
            const c = new Client([a, b], { user: "ana", minDelay: 50, maxDelay: 400 });
            window.seqs = [];
            window.states = [];
            c.on("message", (m) => window.seqs.push(m.seq));
            c.on("state", (s) => window.states.push(s.state));
            await c.connect();
            await c.subscribe("web", { since: 0 });
            window.client = c;
        }""",
            [a.url, b.url],
        )
        stored = await page.evaluate("""async () => {
            const m = await window.client.publish("web", "from the browser");
            return [m.seq, m.author];
        }""")
        assert stored == [1, "ana"]
        total = 60
        for i in range(2, 21):
            assert (await post(http, b.url, "web", f"m{i}")).status_code == 201
        await page.wait_for_function("window.seqs.length >= 20", timeout=t(20) * 1000)
        a.kill()
        for i in range(21, total + 1):
            assert (await post(http, b.url, "web", f"m{i}")).status_code == 201
        await page.wait_for_function(f"window.seqs.length >= {total}", timeout=t(30) * 1000)
        assert await page.evaluate("window.seqs") == list(range(1, total + 1))
        states = await page.evaluate("window.states")
        assert "disconnected" in states and states[-1] == "connected", states
        assert not browser.errors, browser.errors

"""The dashboard in a real browser: its figures move when traffic flows."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from playwright.async_api import Page, expect

from tests.harness import Instance, eventually, instances, post, t

ROOM = "dash.room"


async def figure(page: Page, name: str) -> float | None:
    raw = await page.locator(f"#{name}").get_attribute("data-value")
    return float(raw) if raw else None


async def test_dashboard_figures_move_when_traffic_flows(gateway_env, browser):
    # A bucket of 5 refilled at 1/s against a poster trying ~20/s: about one post a
    # second passes and the rest are refused, however slow the machine.
    env = {**gateway_env, "RATE_LIMIT": "5/5s"}
    inst = Instance(env).start()
    try:
        await inst.wait_ready()
        dash = await browser.open(inst.url + "/dashboard", "dashboard")
        await expect(dash.locator("#status")).to_have_attribute("data-state", "live")
        await expect(dash.locator("#updated")).not_to_have_attribute("data-samples", "0")
        assert await figure(dash, "clients") == 0
        assert await figure(dash, "rate") == 0
        assert await figure(dash, "limited-total") == 0
        await expect(dash.locator("#rooms tr")).to_have_count(0)

        chat = await browser.open(f"{inst.url}/?room={ROOM}&name=eve", "chat")
        await expect(chat.locator("#status")).to_have_attribute("data-state", "connected")

        stop = asyncio.Event()

        async def traffic() -> None:
            async with httpx.AsyncClient() as http:
                for i in range(400):  # bounded: at most ~20 s
                    if stop.is_set():
                        return
                    await post(http, inst.url, ROOM, f"load {i}")
                    await http.get(f"{inst.url}/v1/rooms/{ROOM}/messages")
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(traffic())
        try:

            async def moved(name: str) -> bool:
                value = await figure(dash, name)
                return value is not None and value > 0

            for name in (
                "clients",
                "rate",
                "delivered",
                "latency-count",
                "limited",
                "limited-total",
                "cache-lookups",
            ):
                await eventually(lambda name=name: moved(name), timeout=t(20))
            assert await figure(dash, "cache") is not None
            row = dash.locator(f'#rooms tr[data-room="{ROOM}"]')
            await expect(row).to_have_count(1)

            async def room_moving() -> bool:
                return float(await row.get_attribute("data-rate") or 0) > 0

            await eventually(room_moving, timeout=t(20))
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        samples = int(await dash.locator("#updated").get_attribute("data-samples") or 0)
        await expect(dash.locator("#updated")).not_to_have_attribute("data-samples", str(samples))
        # all instances by default (one here); switching to this instance starts afresh
        await expect(dash.locator("#instance")).to_have_attribute("data-instances", "1")
        await expect(dash.locator("#instance")).to_contain_text("1 instance")
        await dash.locator("#scope").select_option("instance")
        await expect(dash.locator("#instance")).to_contain_text(f"pid {inst.proc.pid}, up")
        await expect(dash.locator("#status")).to_have_attribute("data-state", "live")
        assert await figure(dash, "clients") == 1  # the chat page, still connected
        assert browser.errors == []
    finally:
        inst.stop()


async def test_dashboard_in_auth_mode_asks_for_the_api_key(tmp_path, browser):
    key = "dash-api-key-0123456789"
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "REDIS_URL": "memory://",
        "AUTH_SECRET": "dash-test-secret-of-at-least-32-bytes",
        "API_KEYS": key,
        "LOG_LEVEL": "warning",
    }
    inst = Instance(env).start()
    try:
        await inst.wait_ready()
        # no key: the feed is refused and the page asks for one
        dash = await browser.open(inst.url + "/dashboard", "no-key")
        await expect(dash.locator("#status")).to_have_attribute("data-state", "refused")
        await expect(dash.locator("#key-form")).to_be_visible()
        await dash.locator("#key").fill("not-the-key")
        await dash.locator("#key-form button").click()
        await expect(dash.locator("#status")).to_contain_text("refused")
        await dash.locator("#key").fill(key)
        await dash.locator("#key-form button").click()
        await expect(dash.locator("#status")).to_have_attribute("data-state", "live")
        await expect(dash.locator("#updated")).not_to_have_attribute("data-samples", "0")
        await expect(dash.locator("#key-form")).to_be_hidden()

        # a key in the address is used and taken out of the address bar
        linked = await browser.open(f"{inst.url}/dashboard?key={key}", "key-in-url")
        await expect(linked.locator("#status")).to_have_attribute("data-state", "live")
        assert "key=" not in linked.url
        assert browser.errors == []
    finally:
        inst.stop()


LAPTOP = {"width": 1280, "height": 800}


async def test_dashboard_charts_instances_and_webhooks_fill_a_laptop_screen(gateway_env, browser):
    """Two gateways sending webhooks to a receiver that is down: the page charts with
    time and value axes, lists both instances and the receiver's backlog and breaker,
    speaks of all instances (never "here") until asked for one, fills a 1280×800
    screen three cards a row, and loads nothing from another origin."""
    env = {
        **gateway_env,
        "WEBHOOK_URLS": "http://127.0.0.1:9/down",
        "WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    async with instances(2, env) as (a, b), httpx.AsyncClient() as http:
        dash = await browser.open(a.url + "/dashboard", "laptop", viewport=LAPTOP)
        await expect(dash.locator("#status")).to_have_attribute("data-state", "live")
        for i in range(5):
            assert (await post(http, b.url, "dash.hooks", f"m{i}")).status_code == 201
        await expect(dash.locator("#instances tr")).to_have_count(2)
        await expect(dash.locator("#instances-count")).to_have_attribute("data-value", "2")

        async def backlog() -> bool:
            return (await figure(dash, "backlog") or 0) > 0

        await eventually(backlog, timeout=t(30))
        receiver = dash.locator("#webhooks tr")
        await expect(receiver).to_have_count(1)
        assert await receiver.get_attribute("data-breaker") in ("closed", "half_open", "open")
        await expect(dash.locator("#no-webhooks")).to_be_hidden()

        # six charts, each with a time axis and a value axis
        await expect(dash.locator(".chart .uplot")).to_have_count(6)
        await expect(dash.locator(".chart .u-axis")).to_have_count(12)
        labels = (await dash.locator("main").inner_text()).lower()
        assert " here" not in labels, "the all-instances view speaks of 'here'"
        assert "all instances" in labels

        # three cards a row, two rows, across the page: no lone card
        boxes = [await c.bounding_box() for c in await dash.locator(".card").all()]
        rows: dict[int, int] = {}
        for box in boxes:
            assert box is not None
            rows[round(box["y"])] = rows.get(round(box["y"]), 0) + 1
        assert sorted(rows.values()) == [3, 3], rows
        main = await dash.locator("main").bounding_box()
        right = max(box["x"] + box["width"] for box in boxes if box)
        assert main is not None and right > main["x"] + main["width"] - 40
        assert await dash.evaluate("document.documentElement.scrollWidth <= innerWidth")

        origin = a.url
        loaded = await dash.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(origin) for u in loaded), loaded
        assert any("/static/vendor/uplot/uPlot.iife.min.js" in u for u in loaded)

        await dash.locator("#scope").select_option("instance")
        await expect(dash.locator("#instances tr")).to_have_count(1)
        await expect(dash.locator("#t-rooms")).to_contain_text("on this instance")
        assert browser.errors == []


async def test_unknown_figures_show_a_dash_not_a_zero(tmp_path, browser):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "warning",
    }
    inst = Instance(env).start()
    try:
        await inst.wait_ready()
        dash = await browser.open(inst.url + "/dashboard", "dash-unknown", viewport=LAPTOP)
        await expect(dash.locator("#status")).to_have_attribute("data-state", "live")
        await expect(dash.locator("#updated")).not_to_have_attribute("data-samples", "0")
        # no webhooks here: unknown, not zero
        for name in ("backlog", "backlog-oldest", "breakers-open"):
            assert await figure(dash, name) is None
            await expect(dash.locator(f"#{name}")).to_have_text("–")
        await expect(dash.locator("#no-webhooks")).to_be_visible()
        # nothing delivered: latency unknown; a count is a count
        await expect(dash.locator("#latency")).to_have_text("–")
        assert await figure(dash, "clients") == 0
        assert browser.errors == []
    finally:
        inst.stop()

"""The dashboard in a real browser: its figures move when traffic flows."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from playwright.async_api import Page, expect

from tests.harness import Instance, eventually, post, t

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

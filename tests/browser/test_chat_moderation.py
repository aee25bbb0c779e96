"""The chat page and moderation, in a real browser: a moderator bans from a
message's actions, the banned page says so; a muted page says so; slow mode shows
the wait."""

from __future__ import annotations

import time

import httpx
import jwt
from playwright.async_api import Page, expect

from tests.browser.chat_page import connected
from tests.harness import instances, t

SECRET = "browser-moderation-secret-0123456789abcdef"
KEY = "browser-moderation-key"
ROOM = "browser.mod"


def token(sub: str, **claims: object) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256"
    )


async def send(page: Page, text: str) -> None:
    await page.locator("#text").fill(text)
    await page.locator("#send").click()


async def test_a_moderator_bans_from_the_menu_and_the_pages_say_why(gateway_env, browser):
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": KEY}
    api = {"Authorization": f"Bearer {KEY}"}
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        ana = await browser.open(f"{a.url}/?room={ROOM}&token={token('ana')}", "ana")
        mod = await browser.open(
            f"{b.url}/?room={ROOM}&token={token('mo', moderate=[ROOM])}", "moderator"
        )
        await connected(ana)
        await connected(mod)
        await send(ana, "hello")
        line = mod.locator('#messages li[data-seq="1"]')
        await expect(line.locator(".text")).to_have_text("hello")
        # ana's own message offers her edit and delete, never ban or mute
        await expect(ana.locator('#messages li[data-seq="1"] [data-action="ban"]')).to_have_count(0)
        await expect(ana.locator('#messages li[data-seq="1"] [data-action="edit"]')).to_have_count(
            1
        )

        # A mute: the page says so, and the text is kept.
        r = await http.post(f"{a.url}/v1/rooms/{ROOM}/mutes", json={"user": "ana"}, headers=api)
        assert r.status_code == 201
        await send(ana, "muted?")
        await expect(ana.locator("#notice")).to_have_attribute("data-kind", "muted")
        await expect(ana.locator("#text")).to_have_value("muted?")
        await http.delete(f"{a.url}/v1/rooms/{ROOM}/mutes/ana", headers=api)

        # Slow mode: the wait is shown, the text kept.
        r = await http.put(
            f"{a.url}/v1/rooms/{ROOM}/settings", json={"slow_mode": 600}, headers=api
        )
        assert r.status_code == 200
        await send(ana, "one")
        await expect(ana.locator('#messages li[data-seq="2"]')).to_have_count(1)
        await send(ana, "two")
        await expect(ana.locator("#notice")).to_have_attribute("data-kind", "slow_mode")
        await expect(ana.locator("#notice")).to_contain_text("one message every 600 s")
        await expect(ana.locator("#text")).to_have_value("two")

        # The moderator bans ana from the message's actions; ana's page says so.
        await line.hover()
        await line.locator('.actions button[data-action="ban"]').click()
        await expect(mod.locator("#notice")).to_have_attribute("data-kind", "moderated")
        await expect(ana.locator("#notice")).to_have_attribute("data-kind", "banned")
        await expect(ana.locator("#status")).to_have_attribute("data-state", "refused")
        r = await http.get(f"{a.url}/v1/rooms/{ROOM}/bans", headers=api)
        assert [x["user"] for x in r.json()["bans"]] == ["ana"]
        assert r.json()["bans"][0]["by"] == "mo"

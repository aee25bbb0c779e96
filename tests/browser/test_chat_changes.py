"""The chat page shows edits, deletes, typing and unread counts, in a real browser."""

from __future__ import annotations

import re

import httpx
from playwright.async_api import expect

from tests.browser.chat_page import connected, item
from tests.harness import eventually, instances, post

ROOM = "browser.changes"


async def test_the_page_shows_edits_deletes_typing_and_unread_counts(gateway_env, browser):
    async with instances(2, gateway_env) as (gw_a, gw_b), httpx.AsyncClient() as http:
        for i in range(1, 3):
            r = await post(http, gw_a.url, ROOM, f"helo {i}", author="ana")
            assert r.status_code == 201
        ana = await browser.open(f"{gw_a.url}/?room={ROOM}&name=ana", "ana")
        bob = await browser.open(f"{gw_b.url}/?room={ROOM}&name=bob", "bob")
        await connected(ana)
        await connected(bob)
        url = f"{gw_b.url}/v1/rooms/{ROOM}/messages"

        # An edit and a delete reach both pages live.
        r = await http.patch(f"{url}/1", json={"text": "hello 1", "author": "ana"})
        assert r.status_code == 200
        r = await http.request("DELETE", f"{url}/2", json={"author": "ana"})
        assert r.status_code == 200
        for page in (ana, bob):
            await expect(item(page, 1).locator(".text")).to_have_text("hello 1")
            await expect(item(page, 1)).to_have_class(re.compile(r"\bedited\b"))
            await expect(item(page, 1).locator(".meta")).to_contain_text("(edited)")
            await expect(item(page, 2)).to_have_class(re.compile(r"\bdeleted\b"))
            await expect(item(page, 2).locator(".text")).to_have_text("This message was deleted.")

        # Typing: the others see it, the typist does not.
        await ana.locator("#text").fill("I am typing")
        await expect(bob.locator("#typing")).to_have_text("ana is typing…")
        await expect(ana.locator("#typing")).to_have_text("")
        await ana.locator("#text").fill("")

        # Unread: bob's page goes to the background while two messages come.
        await expect(bob.locator("#unread")).to_have_attribute("data-unread", "0")
        await bob.evaluate(
            "Object.defineProperty(document, 'hidden', {value: true, configurable: true})"
        )
        for i in (3, 4):
            assert (
                await post(http, gw_a.url, ROOM, f"while away {i}", author="ana")
            ).status_code == 201
        await expect(bob.locator("#unread")).to_have_attribute("data-unread", "2")
        await expect(bob.locator("#unread")).to_have_text("2 unread")
        read = (await http.get(f"{gw_b.url}/v1/rooms/{ROOM}/read", params={"user": "bob"})).json()
        assert read == {"room": ROOM, "seq": 2, "unread": 2, "mentions": 0}
        await bob.evaluate(
            "Object.defineProperty(document, 'hidden', "
            "{value: false, configurable: true}); "
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        await expect(bob.locator("#unread")).to_have_attribute("data-unread", "0")

        async def bob_read_all() -> bool:
            r = await http.get(f"{gw_b.url}/v1/rooms/{ROOM}/read", params={"user": "bob"})
            return r.json() == {"room": ROOM, "seq": 4, "unread": 0, "mentions": 0}

        await eventually(bob_read_all)

        # A change made while ana's instance is down reaches her page when it resumes.
        gw_a.stop()
        await expect(ana.locator("#status")).not_to_have_attribute("data-state", "connected")
        r = await http.patch(f"{url}/3", json={"text": "edited while A was down", "author": "ana"})
        assert r.status_code == 200
        gw_a.start()
        await gw_a.wait_ready()
        await connected(ana)
        await expect(item(ana, 3).locator(".text")).to_have_text("edited while A was down")
        await expect(item(bob, 3).locator(".text")).to_have_text("edited while A was down")
        assert browser.errors == []

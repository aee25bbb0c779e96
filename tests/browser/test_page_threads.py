"""Replies and mentions on the chat page, in Chromium against a real gateway: the
reply action opens a thread panel that posts with `reply_to` and lists the
replies (`GET …/messages/{seq}/replies`), the parent counts them, a reply shows
what it answers; `@name` of someone seen in the room is sent as a mention, and
a room with unread mentions of the reader shows a mention badge (live, and
from `GET /v1/read` after a reload)."""

from __future__ import annotations

import re

import httpx
from playwright.async_api import expect

from tests.browser.chat_page import connected, item, shown_up_to
from tests.harness import instances, post


async def history(http: httpx.AsyncClient, base: str, room: str) -> list[dict]:
    r = await http.get(f"{base}/v1/rooms/{room}/messages")
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


async def test_a_reply_goes_to_the_thread_panel_and_the_parent_counts_it(gateway_env, browser):
    room = "threads"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        assert (
            await post(http, gw.url, room, "the plan for friday", author="bob")
        ).status_code == 201
        page = await browser.open(f"{gw.url}/?room={room}&name=ana", "ana")
        await connected(page)
        await shown_up_to(page, 1)

        parent = item(page, 1)
        await parent.hover()
        reply_button = parent.locator('[data-action="reply"]')
        await reply_button.click()
        panel = page.locator("#thread")
        await expect(panel).to_be_visible()
        await expect(page.locator("#thread-parent .text")).to_have_text("the plan for friday")
        await expect(page.locator("#thread-count")).to_have_text("No replies yet")
        await expect(page.locator("#thread-text")).to_be_focused()

        await page.keyboard.type("sounds good")
        await page.keyboard.press("Enter")
        await expect(page.locator("#thread-text")).to_have_value("")
        await shown_up_to(page, 2)
        stored = await history(http, gw.url, room)
        assert stored[1]["text"] == "sounds good" and stored[1]["reply_to"] == 1
        assert stored[0]["thread"]["replies"] == 1

        # In the room the reply says what it answers; the parent counts its replies.
        await expect(item(page, 2).locator(".reply-ref")).to_contain_text("replying to bob")
        await expect(parent.locator(".thread-link")).to_contain_text("1 reply")
        await expect(page.locator('#thread-replies li[data-seq="2"] .text')).to_have_text(
            "sounds good"
        )
        await expect(page.locator("#thread-count")).to_have_text("1 reply")

        # A reply from elsewhere arrives live in the panel and in the count.
        r = await http.post(
            f"{gw.url}/v1/rooms/{room}/messages",
            json={"text": "me too", "author": "cy", "reply_to": 1},
        )
        assert r.status_code == 201, r.text
        await expect(page.locator("#thread-replies li[data-seq]")).to_have_count(2)
        await expect(parent.locator(".thread-link")).to_contain_text("2 replies")

        # Escape closes the panel and gives the focus back to what opened it.
        await page.locator("#thread-text").focus()
        await page.keyboard.press("Escape")
        await expect(panel).to_be_hidden()
        await expect(reply_button).to_be_focused()

        # After a reload the panel asks the server for the thread's replies.
        await page.reload()
        await connected(page)
        await shown_up_to(page, 3)
        async with page.expect_request(re.compile(rf"/v1/rooms/{room}/messages/1/replies")):
            await item(page, 1).locator(".thread-link").click()
        await expect(page.locator("#thread-replies li[data-seq]")).to_have_count(2)
        await expect(item(page, 3).locator(".reply-ref")).to_contain_text("replying to bob")
        assert browser.errors == []


async def test_mentions_are_sent_and_counted_in_a_badge(gateway_env, browser):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        assert (await post(http, gw.url, "m.a", "hi all", author="ana")).status_code == 201
        ana = await browser.open(f"{gw.url}/?room=m.a&name=ana", "ana")
        await connected(ana)
        await shown_up_to(ana, 1)
        # ana goes to another room; m.a is read up to seq 1
        await ana.locator("#add-room").click()
        await ana.locator("#room").fill("m.b")
        await ana.locator("#room").press("Enter")
        await connected(ana)

        # bob has seen ana in m.a: "@ana" in his text is sent as a mention of her.
        bob = await browser.open(f"{gw.url}/?room=m.a&name=bob", "bob")
        await connected(bob)
        await shown_up_to(bob, 1)
        await bob.locator("#text").fill("@ana can you look? @nobody")
        await bob.locator("#text").press("Enter")
        await shown_up_to(bob, 2)
        stored = await history(http, gw.url, "m.a")
        assert stored[1]["mentions"] == ["ana"]

        room_a = ana.locator('#rooms button[data-room="m.a"]')
        await expect(room_a).to_have_attribute("data-mentions", "1")
        await expect(room_a.locator(".badge.mention")).to_have_text("@1")
        await expect(room_a).to_have_attribute("aria-label", "m.a, 1 mention, 1 unread")
        await expect(ana.locator("#open-rooms")).to_have_attribute("data-news", "mention")

        # The count comes back from the server after a reload.
        await ana.reload()
        await connected(ana)
        await expect(room_a).to_have_attribute("data-mentions", "1")
        # Reading the room clears it; the message stands out for her.
        await room_a.click()
        await shown_up_to(ana, 2)
        await expect(room_a).to_have_attribute("data-mentions", "0")
        await expect(item(ana, 2)).to_have_class(re.compile(r"\bmentions-me\b"))
        assert browser.errors == []

"""The chat page's search box in a real browser against a real gateway: results
newest first, highlights marked with text nodes (never HTML from a message),
code point offsets right past an emoji, and paging with "More results"."""

from __future__ import annotations

import httpx
from playwright.async_api import expect

from tests.harness import instances, post


async def test_search_box_marks_highlights_safely_and_pages(gateway_env, browser):
    env = {**gateway_env, "SEARCH_RATE_LIMIT": "1000/1s"}
    async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
        texts = [
            "an older meeting",
            '<img src=x onerror="window.owned=1"> meeting <b>bold</b>',
            "😀😀 meeting at noon, Meetings later",
        ]
        for i, text in enumerate(texts):
            r = await post(http, gw.url, f"room-{i}", text, author="cy")
            assert r.status_code == 201, r.text
        for i in range(25):
            assert (await post(http, gw.url, "bulk", f"filler word {i}")).status_code == 201

        page = await browser.open(f"{gw.url}/?room=lobby&name=ana", "ana")
        await page.locator("#q").fill("meeting")
        await page.locator("#q").press("Enter")
        items = page.locator("#search-results li")
        await expect(items).to_have_count(3)
        await expect(page.locator("#search-status")).to_have_text("3 messages found.")
        # newest first; the emoji count as one code point each, so the marks fall on words
        first = items.nth(0)
        await expect(first).to_have_attribute("data-room", "room-2")
        await expect(first.locator("mark")).to_have_text(["meeting", "Meetings"])
        await expect(first.locator(".text")).to_have_text(texts[2])
        # markup in a message stays text: no element made from it, no script run
        second = items.nth(1)
        await expect(second.locator(".text")).to_have_text(texts[1])
        assert await second.locator("img, b").count() == 0
        await expect(second.locator("mark")).to_have_text(["meeting"])
        assert await page.evaluate("window.owned") is None

        # pages of 20: "More results" appends the rest
        await page.locator("#q").fill("filler")
        await page.locator("#q").press("Enter")
        await expect(items).to_have_count(20)
        await expect(page.locator("#search-more")).to_be_visible()
        await page.locator("#search-more").click()
        await expect(items).to_have_count(25)
        await expect(page.locator("#search-more")).to_be_hidden()
        await expect(items.nth(0).locator(".text")).to_have_text("filler word 24")

        await page.locator("#q").fill("-only")
        await page.locator("#q").press("Enter")
        await expect(page.locator("#search-status")).to_contain_text("No messages found")
        assert browser.errors == []

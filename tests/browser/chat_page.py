"""What the chat page's tests ask of the page (``/``): connected, showing the
room up to a seq, and one message's list item."""

from __future__ import annotations

from playwright.async_api import Locator, Page, expect

from tests.harness import t


async def connected(page: Page) -> None:
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=t(30) * 1000
    )


async def shown_up_to(page: Page, seq: int) -> None:
    await expect(page.locator("#messages")).to_have_attribute(
        "data-last-seq", str(seq), timeout=t(30) * 1000
    )


def item(page: Page, seq: int) -> Locator:
    return page.locator(f'#messages li[data-seq="{seq}"]')

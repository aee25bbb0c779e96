"""A real browser for the page tests: Debian's Chromium driven by Playwright.

No browser is downloaded: Playwright launches the system's /usr/bin/chromium
(``apt-get install chromium``; ``.ci/run`` installs it when missing). When a
test fails, a screenshot of every page it opened is saved in test-artifacts/.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.harness import ROOT, t

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP = {"width": 1200, "height": 800}
PHONE = {"width": 390, "height": 800}
expect.set_options(timeout=t(20) * 1000)  # every expect() waits as long as the page timeout


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class Pages:
    """Opens pages in one browser and remembers them for failure screenshots."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.pages: list[tuple[str, Page]] = []
        self.errors: list[str] = []

    async def open(
        self, url: str, label: str, viewport: dict[str, int] = DESKTOP, **options: Any
    ) -> Page:
        """A page in a context of its own; ``options`` go to ``new_context``
        (``color_scheme``, ``has_touch``, ``timezone_id``, ...)."""
        context = await self.browser.new_context(viewport=viewport, **options)
        page = await context.new_page()
        page.set_default_timeout(t(20) * 1000)
        page.on("pageerror", lambda exc: self.errors.append(f"{label}: {exc}"))
        self.pages.append((label, page))
        await page.goto(url)
        return page

    async def screenshots(self, test_name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
        for label, page in self.pages:
            try:
                await page.screenshot(path=str(ARTIFACTS / f"{stem}-{label}.png"), full_page=True)
            except Exception:
                pass


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(
            f"no Chromium at {CHROMIUM}: install Debian's with "
            "`apt-get install -y chromium` (.ci/run does), or set CHROMIUM"
        )
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = Pages(chromium)
        try:
            yield pages
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                await pages.screenshots(request.node.name)
            await chromium.close()

"""What the console's browser tests share: Debian's chromium under Playwright, a signed-in page
that fails its test on any error in the browser's console, and its screenshots in
``test-artifacts/console/`` (each module binds ``signed_in`` to its own folder).

A missing browser fails these tests with what to install: they are part of the suite, never
skipped. The fixtures (``browser``, ``web``) are in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests.helpers import OPERATOR

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "console"
WIDTHS = (1366, 390)
"""A laptop and a phone: every page of ``Console.shots`` is saved at both."""


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "the console's browser tests need Debian's chromium: apt-get install chromium "
            "(.ci/run installs it), or set CHROMIUM to a Chromium binary"
        )
    return path


class Console:
    """A signed-in page of the console; screenshots go to ``shots_dir``."""

    def __init__(self, page: Page, url: str, errors: list[str], shots_dir: Path) -> None:
        self.page, self.url, self.errors, self.shots_dir = page, url, errors, shots_dir

    async def open(self, path: str) -> None:
        await self.page.goto(self.url + path)

    async def live(self) -> None:
        """Waits until the page's stream delivered its first message (its snapshot)."""
        await expect(self.page.locator("body[data-live-ready]")).to_have_count(1)

    async def shot(self, name: str) -> None:
        """The page as it is, whole, as ``NAME.png``."""
        self.shots_dir.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(self.shots_dir / f"{name}.png"), full_page=True)

    async def shots(self, name: str) -> None:
        """The page at each of WIDTHS, whole, as ``NAME-WIDTH.png``, and nothing sticking out
        sideways at either; the viewport is put back afterwards."""
        self.shots_dir.mkdir(parents=True, exist_ok=True)
        size = self.page.viewport_size
        for width in WIDTHS:
            await self.page.set_viewport_size({"width": width, "height": 860})
            await self.page.screenshot(path=str(self.shots_dir / f"{name}-{width}.png"), full_page=True)
            await self.no_page_overflow(f"{name} at {width} px")
        if size is not None:
            await self.page.set_viewport_size(size)

    async def no_page_overflow(self, what: str = "the page") -> None:
        """Nothing sticks out sideways: wide tables scroll inside their box, not the page."""
        overflow = await self.page.evaluate(
            "document.scrollingElement.scrollWidth - document.scrollingElement.clientWidth"
        )
        assert overflow <= 0, f"{what} scrolls sideways by {overflow} px"


@asynccontextmanager
async def signed_in(
    browser: Browser,
    url: str,
    token: str = OPERATOR,
    start: str = "/",
    *,
    width: int = WIDTHS[0],
    shots_dir: Path = SHOTS,
) -> AsyncIterator[Console]:
    """A fresh browser context signed in with ``token`` at ``start``; fails the test on any
    error in the browser's console."""
    context = await browser.new_context(viewport={"width": width, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors too: a blocked resource (the Content-Security-Policy) or a failed load.
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        await page.goto(url + start)
        await page.fill("input[name=token]", token)
        await page.click("button.primary")
        await expect(page.locator(".who")).to_be_visible()
        yield Console(page, url, errors, shots_dir)
        assert errors == [], f"errors in the browser's console: {errors}"
    finally:
        await context.close()

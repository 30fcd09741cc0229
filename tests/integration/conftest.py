"""Fixtures of the console's browser tests (the rest of their setup is ``tests.integration.browser``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

from services.api.server import ApiServer
from tests.helpers import TOKENS, channel, web_service
from tests.integration.browser import chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    """The web service's base URL, in front of the test's api (a module may have its own); its
    own channel carries the sensor token (the console never uses it)."""
    target = f"127.0.0.1:{api.port}"
    async with channel(target, TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        yield url

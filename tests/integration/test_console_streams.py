"""The console's live streams are budgeted per session and in all, and end when the person's
token is revoked: real HTTP to the real web service, a real api on a real PostgreSQL."""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import pytest

from services.api.auth import new_token
from services.api.server import ApiServer
from services.api.store import Store
from services.web import live
from services.web.session import COOKIE
from tests.conftest import Stubs
from tests.integration.console_support import Sse, console, pushed, seed


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small shares, so that a test can fill them (the web service reads them at start)."""
    monkeypatch.setattr(live, "STREAMS_PER_SESSION", 2)
    monkeypatch.setattr(live, "STREAMS_TOTAL", 3)


@pytest.fixture
def budgeted_web(small_budget: None, web: str) -> str:
    """The web service, started after ``small_budget``."""
    return web


async def _open(stack: AsyncExitStack, client: httpx.AsyncClient, path: str, held: list[Sse]) -> None:
    """Opens a live stream and keeps it (in ``held``: a dropped reader closes its response)."""
    response = await stack.enter_async_context(client.stream("GET", path))
    sse = Sse(response)
    await sse.next("rows")  # the snapshot: the stream and its api tail are open
    held.append(sse)


async def test_one_session_cannot_take_every_live_stream(stubs: Stubs, budgeted_web: str) -> None:
    await seed(stubs)
    async with (
        console(budgeted_web, "viewer") as greedy,
        console(budgeted_web, "operator") as other,
        AsyncExitStack() as stack,
    ):
        held: list[Sse] = []
        await _open(stack, greedy, "/live/events", held)
        await _open(stack, greedy, "/live/enforcements", held)
        refused = await greedy.get("/live/events")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(live.BUSY_RETRY_S)
        assert "this session has 2 live streams open" in refused.text
        # Another session still gets its stream, until the service's total is reached.
        await _open(stack, other, "/live/events", held)
        full = await other.get("/live/enforcements")
        assert full.status_code == 429 and "the console has 3 live streams open" in full.text


async def test_a_closed_stream_gives_its_place_back(stubs: Stubs, budgeted_web: str) -> None:
    await seed(stubs)
    async with console(budgeted_web, "viewer") as person:
        for _ in range(4):  # more than the session's share, one after the other
            async with AsyncExitStack() as stack:
                await _open(stack, person, "/live/events", [])


async def test_a_revoked_token_ends_its_live_pages(stubs: Stubs, store: Store, web: str, api: ApiServer) -> None:
    await seed(stubs)
    token, digest = new_token()
    await store.tokens.create("soon-revoked", ["viewer"], digest, None)
    await api.authenticator.load()
    async with (
        httpx.AsyncClient(base_url=web, cookies={COOKIE: token}, timeout=30) as person,
        person.stream("GET", "/live/enforcements") as response,
    ):
        sse = Sse(response)
        await sse.next("rows")
        await pushed(stubs)
        await sse.next("rows")
        await store.tokens.revoke("soon-revoked")
        stop = await sse.next("stop")
        assert stop.data["code"] == "UNAUTHENTICATED"
        assert "revoked" in stop.data["message"]

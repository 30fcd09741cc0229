"""The key that signs page tokens, kept in the database (``api_secret``, migration 0007).

Every api replica must accept the tokens of every other, before and after a restart, so the key
is neither per process nor in the environment: the first replica that needs it creates it, and
every replica reads the same row from then on.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from shared.errors import Unavailable

from ._db import guarded
from ._paging import Signer

# One round trip whether the row exists or not: the INSERT returns the value it wrote, the
# SELECT the one already there. The SELECT cannot see a row that a concurrent replica commits
# while the INSERT waits for it (its snapshot is older), so that case reads nothing: ask again.
_PAGE_TOKEN_KEY = """
WITH created AS (
    INSERT INTO api_secret (name, value) VALUES ('page_token', $1)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM created
UNION ALL
SELECT value FROM api_secret WHERE name = 'page_token'
LIMIT 1
"""
_ATTEMPTS = 3


class SharedKey:
    """The page-token signer of every api replica, its key read on first need and then cached."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._signer: Signer | None = None
        # Concurrent first calls wait for one read instead of racing to the database.
        self._lock = asyncio.Lock()

    async def signer(self) -> Signer:
        if self._signer is None:
            async with self._lock:
                if self._signer is None:
                    self._signer = Signer(await self._load())
        return self._signer

    async def _load(self) -> bytes:
        async with guarded():
            for _ in range(_ATTEMPTS):
                value = await self._pool.fetchval(_PAGE_TOKEN_KEY, secrets.token_bytes(32))
                if value is not None:
                    return bytes(value)
        # Only a row deleted as fast as it is created gets here.
        raise Unavailable("the page-token key could not be read; retry")

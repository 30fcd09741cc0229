"""Bearer tokens of named principals (``api_token``): only hashes are stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.errors import AlreadyExists, NotFound

from . import audit
from ._db import Repo, guarded
from .types import Actor

_COLUMNS = "name, roles, token_hash, created, expires_at, revoked_at, last_used_at"
_CREATE = f"""
INSERT INTO api_token (name, roles, token_hash, expires_at)
VALUES ($1, $2::text[], $3, now() + $4 * interval '1 day')
RETURNING {_COLUMNS}"""
_ALL = f"SELECT {_COLUMNS} FROM api_token ORDER BY name"
_REVOKE = "UPDATE api_token SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL RETURNING name"
_EXISTS = "SELECT revoked_at FROM api_token WHERE name = $1"
_TOUCH = """
UPDATE api_token t SET last_used_at = u.at
  FROM unnest($1::bytea[], $2::timestamptz[]) AS u(hash, at)
 WHERE t.token_hash = u.hash AND (t.last_used_at IS NULL OR t.last_used_at < u.at)"""


@dataclass(frozen=True, slots=True)
class TokenRow:
    name: str
    roles: list[str]
    token_hash: bytes
    created: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class Tokens(Repo):
    """Creates, lists and revokes tokens; the api loads them all to verify calls."""

    async def create(
        self, name: str, roles: list[str], token_hash: bytes, expires_days: float | None, actor: Actor | None = None
    ) -> TokenRow:
        """Stores a token's hash (and, with ``actor``, its audit record, in the same transaction)."""
        try:
            async with guarded(), self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_CREATE, name, roles, token_hash, expires_days)
                assert row is not None
                made = TokenRow(*row)
                if actor is not None:
                    change = {"roles": roles, "expires_at": made.expires_at.isoformat() if made.expires_at else None}
                    await audit.record(conn, actor, "token", None, name, change)
        except AlreadyExists:
            raise AlreadyExists(f"a token named {name} already exists (names stay taken after revocation)") from None
        return made

    async def all(self) -> list[TokenRow]:
        return [TokenRow(*r) for r in await self._fetch(_ALL)]

    async def revoke(self, name: str, actor: Actor | None = None) -> None:
        # Revoking a revoked token changes nothing; only an unknown name is an error.
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_REVOKE, name) is not None:
                if actor is not None:
                    await audit.record(conn, actor, "token", None, name, {"revoked": True})
                return
            if await conn.fetchrow(_EXISTS, name) is None:
                raise NotFound(f"no token named {name}")

    async def touch(self, last_used: dict[bytes, datetime]) -> None:
        """Records when tokens were last used (batched by the api, a few times a minute)."""
        if last_used:
            await self._execute(_TOUCH, list(last_used), list(last_used.values()))

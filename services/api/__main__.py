"""``python -m services.api`` serves; ``migrate`` applies migrations; ``tokens`` manages tokens.

python -m services.api tokens create --name NAME --role ROLE [--role ROLE ...] [--expires DAYS]
python -m services.api tokens list
python -m services.api tokens revoke NAME
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from services.api import migrate
from services.api.auth import ROLES, new_token, token_hash
from services.api.server import serve
from services.api.store import Store, create_pool
from services.api.store.tokens import Tokens
from services.api.store.types import Actor
from shared import tracing
from shared.config import ConfigError, api_config
from shared.errors import DomainError
from shared.runtime import run, setup_logging


async def _tokens(url: str, ns: argparse.Namespace) -> int:
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        tokens = Store(pool).tokens
        # Token changes are audited like changes made through the api, by who ran the command.
        actor = Actor(f"cli:{getpass.getuser()}", f"tokens {ns.action}")
        if ns.action == "create" and ns.out and await _kept(tokens, Path(ns.out)):
            print(f"kept the valid token in {ns.out}", file=sys.stderr)
        elif ns.action == "create":
            token, digest = new_token()
            await tokens.create(ns.name, sorted(set(ns.role)), digest, ns.expires, actor)
            expiry = f"expires in {ns.expires:g} days" if ns.expires else "does not expire"
            print(f"token {ns.name} ({', '.join(sorted(set(ns.role)))}) created; it {expiry}.", file=sys.stderr)
            print(
                "It is shown this once: only its hash is kept. Send it as 'authorization: Bearer <token>'.",
                file=sys.stderr,
            )
            # Every api reloads the tokens every API_TOKEN_REFRESH_SECONDS: returning once one
            # such interval (and a margin for the reload itself) has passed makes the token
            # usable as soon as it is printed.
            await asyncio.sleep(float(os.environ.get("API_TOKEN_REFRESH_SECONDS") or 2.0) + 1.0)
            if ns.out:
                _write_secret(Path(ns.out), token)
                print(f"written to {ns.out}", file=sys.stderr)
            else:
                print(token)
        elif ns.action == "revoke":
            await tokens.revoke(ns.name, actor)
            print(f"token {ns.name} revoked; every api refuses it within seconds")
        else:
            rows = await tokens.all()
            print(f"{'name':24} {'roles':28} {'created':20} {'expires':20} {'last used':20} state")
            for r in rows:
                state = (
                    "revoked"
                    if r.revoked_at
                    else ("expired" if r.expires_at and r.expires_at <= datetime.now(UTC) else "active")
                )
                print(
                    f"{r.name:24} {','.join(r.roles):28} {_when(r.created):20} {_when(r.expires_at):20} "
                    f"{_when(r.last_used_at):20} {state}"
                )
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await pool.close()
    return 0


async def _kept(tokens: Tokens, path: Path) -> bool:
    """Whether ``path`` holds a token the database knows and has not revoked or expired."""
    if not path.exists():
        return False
    digest = token_hash(path.read_text().strip())
    now = datetime.now(UTC)
    return any(
        bytes(r.token_hash) == digest and r.revoked_at is None and (r.expires_at is None or r.expires_at > now)
        for r in await tokens.all()
    )


def _write_secret(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(token + "\n")
    os.replace(temporary, path)


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _days(text: str) -> float:
    value = float(text)
    if not 0 < value <= 36500:
        raise argparse.ArgumentTypeError("must be a number of days above 0")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.api", description="The automation api.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve gRPC (the default)")
    commands.add_parser("migrate", help="apply pending migrations")
    tokens = commands.add_parser("tokens", help="create, list or revoke bearer tokens")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a token; it is printed once, as the last line")
    create.add_argument("--name", required=True, help="the principal's name (letters, digits, _ . @ -)")
    create.add_argument("--role", action="append", required=True, choices=ROLES, help="a role (repeat for more)")
    create.add_argument("--expires", type=_days, default=None, metavar="DAYS", help="expire after DAYS days")
    create.add_argument(
        "--out", metavar="FILE", help="write the token to FILE (mode 0600) instead; keep FILE if its token is valid"
    )
    actions.add_parser("list", help="every token: name, roles, dates, state (never the token)")
    revoke = actions.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    ns = parser.parse_args()
    if ns.command == "tokens":
        url = os.environ.get("DATABASE_URL", "")
        if not url:
            print("configuration error: DATABASE_URL is required", file=sys.stderr)
            return 2
        setup_logging(os.environ.get("LOG_LEVEL", "WARNING").upper(), "api")
        return run(_tokens(url, ns))
    try:
        config = api_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, "api", config.log_format)
    if ns.command == "migrate":
        try:
            applied = run(migrate.migrate_url(config.database_url))
        except migrate.MigrationError as exc:
            logging.getLogger("migrate").error("%s", exc)
            return 1
        print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))
        return 0
    try:
        # Off unless OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER say where to (shared/tracing.py).
        tracing.setup_tracing("automation-api")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        run(serve(config))
    finally:
        tracing.shutdown_tracing()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

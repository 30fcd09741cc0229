"""``python -m services.api`` serves; ``python -m services.api migrate`` applies migrations."""

from __future__ import annotations

import argparse
import logging
import sys

from services.api import migrate
from services.api.server import serve
from shared.config import ConfigError, api_config
from shared.runtime import run, setup_logging


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.api", description="The automation api.")
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve")
    ns = parser.parse_args()
    try:
        config = api_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, "api")
    if ns.command == "migrate":
        try:
            applied = run(migrate.migrate_url(config.database_url))
        except migrate.MigrationError as exc:
            logging.getLogger("migrate").error("%s", exc)
            return 1
        print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))
        return 0
    run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

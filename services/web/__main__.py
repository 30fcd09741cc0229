"""``python -m services.web``: the web service (webhooks and the console) until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

import uvicorn

from services.web import create_app
from services.web.edge import server_config
from shared import tracing
from shared.config import ConfigError, web_config
from shared.runtime import setup_logging

SHUTDOWN_GRACE_S = 3


def main() -> int:
    try:
        config = web_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, "web", config.log_format)
    try:
        # Off unless OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER say where to (shared/tracing.py).
        tracing.setup_tracing("automation-web")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(
        server_config(
            create_app(config),
            config,
            loop="uvloop",
            lifespan="on",
            # Live pages hold a stream open for as long as they are shown: stop waiting for them
            # after a few seconds (browsers reconnect to the next instance by themselves).
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    )
    server.run()
    tracing.shutdown_tracing()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

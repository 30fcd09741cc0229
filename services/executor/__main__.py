"""``python -m services.executor``: runs one executor until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys

from services.executor import Executor
from shared import tracing
from shared.config import ConfigError, executor_config
from shared.runtime import run, setup_logging


async def _main() -> None:
    executor = Executor(executor_config())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.stop)
    await executor.run()


def main() -> int:
    try:
        config = executor_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, "executor", config.log_format)
    try:
        # Off unless OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER say where to (shared/tracing.py).
        tracing.setup_tracing("automation-executor")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        run(_main())
    finally:
        tracing.shutdown_tracing()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

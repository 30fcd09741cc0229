"""Process plumbing both services share: logging, the event loop, keepalive settings."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared import logs

T = TypeVar("T")

# Long watch streams: the client pings every 30 s and gives up after 10 s of silence; the
# server must allow pings that often, or it answers GOAWAY "too_many_pings".
CLIENT_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def client_keepalive(interval_s: float) -> list[tuple[str, int]]:
    """CLIENT_KEEPALIVE pinging every ``interval_s``, waiting for the answer as long (10 s at most)."""
    ms = max(int(interval_s * 1000), 1000)
    options = dict(CLIENT_KEEPALIVE)
    options["grpc.keepalive_time_ms"] = ms
    options["grpc.keepalive_timeout_ms"] = min(ms, 10_000)
    # gRPC core waits this long for the ack of any ping, keepalive ones too (60 s by default,
    # whatever keepalive_timeout says): without it a blackholed connection lives a minute.
    options["grpc.http2.ping_timeout_ms"] = min(ms, 10_000)
    return list(options.items())


SERVER_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def setup_logging(level: str, name: str, fmt: str = "text") -> None:
    """Logs of ``level`` and above to stderr, as text or as one JSON object per line (``fmt``,
    LOG_FORMAT: see ``shared.logs``), each naming the service ``name``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(fmt, name))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs the service's main coroutine, on uvloop where it is installed (faster streams)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; fall back if absent
        return asyncio.run(main)
    return uvloop.run(main)

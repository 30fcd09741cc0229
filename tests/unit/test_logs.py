"""LOG_FORMAT: readable text by default, one JSON object per line for log shippers (no database)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from shared.config import ConfigError, api_config, executor_config, web_config
from shared.logs import CONTEXT_FIELDS, JsonFormatter, formatter, text_format

ROOT = Path(__file__).resolve().parents[2]
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def emit(
    fmt: logging.Formatter,
    msg: str,
    *args: object,
    level: int = logging.INFO,
    exc_info: bool = False,
    extra: Mapping[str, object] | None = None,
) -> str:
    """What one log call writes through a handler with ``fmt`` (a logger of its own, not the root)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.Logger("services.test", logging.DEBUG)
    logger.addHandler(handler)
    logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
    return stream.getvalue()


def one_object(text: str) -> dict[str, Any]:
    """The single JSON line ``text`` holds, parsed."""
    assert text.endswith("\n") and text.count("\n") == 1, text
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


def test_a_json_line_has_the_fields() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    line = one_object(emit(JsonFormatter("executor"), "enforcement %d %s", 7, "PROCESSED", level=logging.WARNING))
    assert set(line) == {"time", "level", "service", "logger", "message"}
    assert line["level"] == "WARNING"
    assert line["service"] == "executor"
    assert line["logger"] == "services.test"
    assert line["message"] == "enforcement 7 PROCESSED"
    assert TIME.match(line["time"]), line["time"]
    assert before <= datetime.fromisoformat(line["time"]) <= datetime.now(UTC)


def test_time_is_utc_with_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 1_700_000_000.1239
    assert one_object(JsonFormatter("api").format(record) + "\n")["time"] == "2023-11-14T22:13:20.123Z"


def test_a_message_with_newlines_stays_one_line() -> None:
    line = one_object(emit(JsonFormatter("api"), "first\nsecond\r\nthird"))
    assert line["message"] == "first\nsecond\r\nthird"


def test_an_exception_carries_its_traceback() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        text = emit(JsonFormatter("api"), "failed", level=logging.ERROR, exc_info=True)
    line = one_object(text)
    assert line["message"] == "failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom\nsecond line" in line["exception"]


def test_only_allowed_extra_fields_are_carried() -> None:
    allowed = {name: f"value of {name}" for name in CONTEXT_FIELDS}
    extra = {**allowed, "password": "hunter2", "token": "atk_secret", "user": "someone"}
    line = one_object(emit(JsonFormatter("api"), "hello", extra=extra))
    assert {k: line[k] for k in CONTEXT_FIELDS} == allowed
    assert not {"password", "token", "user"} & set(line)
    assert "hunter2" not in json.dumps(line)


def test_extra_values_keep_their_json_types() -> None:
    extra = {"enforcement_id": 42, "enforcement_ids": [1, 2, 3], "rule_ref": "pack.rule", "principal": None}
    line = one_object(emit(JsonFormatter("api"), "hello", extra=extra))
    assert line["enforcement_id"] == 42
    assert line["enforcement_ids"] == [1, 2, 3]
    assert line["rule_ref"] == "pack.rule"
    assert line["principal"] is None


class Opaque:
    def __str__(self) -> str:
        return "opaque thing"


def test_values_json_cannot_hold_are_written_as_text() -> None:
    extra = {
        "enforcement_id": Opaque(),
        "enforcement_ids": {3},
        "event_id": float("nan"),
        "rpc": b"bytes",
        "trigger_ref": [Opaque()],
    }
    line = one_object(emit(JsonFormatter("api"), "hello", extra=extra))
    assert line["enforcement_id"] == "opaque thing"
    assert line["enforcement_ids"] == "{3}"
    assert line["event_id"] == "nan"
    assert line["rpc"] == "b'bytes'"
    assert line["trigger_ref"].startswith("[<")


def test_unicode_survives_in_an_ascii_line() -> None:
    text = emit(JsonFormatter("web"), "café ☃ %s \u2028 🚀", "naïve", extra={"rule_ref": "règle.é"})
    assert text.isascii()
    line = one_object(text)
    assert line["message"] == "café ☃ naïve \u2028 🚀"
    assert line["rule_ref"] == "règle.é"


def test_trace_and_span_ids_inside_a_span() -> None:
    provider = TracerProvider(shutdown_on_exit=False)  # local: the global provider is left alone
    fmt = JsonFormatter("executor")
    with provider.get_tracer("tests.logs").start_as_current_span("work") as span:
        line = one_object(emit(fmt, "inside"))
        context = span.get_span_context()
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert int(line["trace_id"], 16) == context.trace_id
    assert int(line["span_id"], 16) == context.span_id
    # Outside the span again: no ids.
    assert not {"trace_id", "span_id"} & set(one_object(emit(fmt, "after")))


def test_no_trace_fields_outside_a_span_or_in_an_invalid_one() -> None:
    fmt = JsonFormatter("api")
    assert not {"trace_id", "span_id"} & set(one_object(emit(fmt, "no span")))
    with trace.use_span(trace.INVALID_SPAN):
        assert not {"trace_id", "span_id"} & set(one_object(emit(fmt, "invalid span")))


def test_without_opentelemetry_the_trace_fields_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "opentelemetry", None)  # its import now fails
        fmt = JsonFormatter("api")
    provider = TracerProvider(shutdown_on_exit=False)
    with provider.get_tracer("tests.logs").start_as_current_span("work"):
        line = one_object(emit(fmt, "inside", extra={"enforcement_id": 1}))
    assert line["message"] == "inside" and line["enforcement_id"] == 1
    assert not {"trace_id", "span_id"} & set(line)


def test_text_format_is_unchanged() -> None:
    record = logging.LogRecord("services.executor", logging.WARNING, __file__, 1, "enforcement %d", (7,), None)
    record.enforcement_id = 7  # extras never show in text
    expected = logging.Formatter("%(asctime)s %(levelname)s executor %(name)s: %(message)s").format(record)
    assert formatter("text", "executor").format(record) == expected
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING executor services.executor: enforcement 7", expected
    )
    assert text_format("api") == "%(asctime)s %(levelname)s api %(name)s: %(message)s"


def test_an_unknown_format_is_refused_by_the_formatter() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        formatter("xml", "api")


def test_log_format_defaults_to_text_and_is_read_by_every_service() -> None:
    url = {"DATABASE_URL": "postgresql://app@db/automation"}
    assert api_config(url).log_format == "text"
    assert executor_config({}).log_format == "text"
    assert web_config({}).log_format == "text"
    assert executor_config({"LOG_FORMAT": ""}).log_format == "text"
    assert api_config({**url, "LOG_FORMAT": "json"}).log_format == "json"
    assert executor_config({"LOG_FORMAT": " JSON "}).log_format == "json"
    assert web_config({"LOG_FORMAT": "Text"}).log_format == "text"


@pytest.mark.parametrize("read", [api_config, executor_config, web_config])
def test_an_unknown_log_format_is_a_configuration_error(read: Any) -> None:
    env = {"DATABASE_URL": "postgresql://app@db/automation", "LOG_FORMAT": "xml"}
    with pytest.raises(ConfigError, match=r"LOG_FORMAT must be text or json, got 'xml'"):
        read(env)


def _child_env(**settings: str) -> dict[str, str]:
    """This environment without any of the services' settings, plus ``settings``."""
    prefixes = ("API_", "EXECUTOR_", "LOG_", "RPC_", "RECONNECT_", "RULE_CACHE_", "SHUTDOWN_", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | settings


async def test_the_executor_writes_json_lines() -> None:
    env = _child_env(LOG_FORMAT="json", API_TARGET="127.0.0.1:1", RECONNECT_BACKOFF_MAX_SECONDS="0.2")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.executor",
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    first: list[bytes] = []
    try:
        # Nothing listens on port 1: it logs its start, the failed stream and its reconnects.
        async with asyncio.timeout(30):
            while len(first) < 4 and (raw := await proc.stderr.readline()):
                first.append(raw)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, rest = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            _, rest = await proc.communicate()
    lines = [raw.decode() for raw in first] + rest.decode().splitlines(keepends=True)
    assert len(first) == 4, lines
    assert proc.returncode == 0, lines
    parsed = [one_object(line) for line in lines]
    assert all(line["service"] == "executor" for line in parsed), lines
    start = parsed[0]
    assert start["message"].startswith("watching enforcements on 127.0.0.1:1 as "), start
    assert start["executor_id"] and start["message"].endswith(start["executor_id"])
    assert any(line["level"] == "WARNING" and "watch stream failed" in line["message"] for line in parsed), lines

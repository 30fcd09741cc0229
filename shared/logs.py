"""How log records are written: readable text (the default) or one JSON object per line.

``LOG_FORMAT=json`` is for log shippers: every record is one line, whatever its message holds
(newlines are escaped), with the service's name, the current OpenTelemetry trace and span ids
when a span is current, and the ids a call site passes through ``extra=`` (only those named in
:data:`CONTEXT_FIELDS`, so that a log line never carries more than was meant to be shipped)::

    log.warning("enforcement %d not resolved: %s", id_, error, extra={"enforcement_id": id_})

This module imports nothing beyond the standard library until a JSON formatter is made;
OpenTelemetry is optional: without it, the trace fields are left out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
"""The values LOG_FORMAT may take (``shared.config`` refuses any other)."""

CONTEXT_FIELDS = (
    "event_id",
    "enforcement_id",
    "enforcement_ids",
    "rule_ref",
    "trigger_ref",
    "executor_id",
    "rpc",
    "principal",
)
"""The ``extra=`` attributes a JSON line carries when a record has them; any other is left out."""


def text_format(service: str) -> str:
    """The text format: ``time LEVEL service logger: message``."""
    return f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"


SpanIds = Callable[[], tuple[str, str] | None]


def _span_reader() -> SpanIds:
    """A function giving the current span's (trace id, span id) in lowercase hex, or None when
    no valid span is current or OpenTelemetry is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return lambda: None

    def current() -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)

    return current


def _plain(value: object) -> Any:
    """``value`` when JSON can hold it as it is (NaN and infinities cannot), else ``str(value)``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, milliseconds), ``level``,
    ``service``, ``logger``, ``message``; ``exception`` and ``stack`` when the record has them;
    ``trace_id`` and ``span_id`` inside a span; then the :data:`CONTEXT_FIELDS` it was given."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._span_ids = _span_reader()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            # Cached on the record, as logging.Formatter does, for any other handler.
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        if (ids := self._span_ids()) is not None:
            line["trace_id"], line["span_id"] = ids
        fields = record.__dict__
        for name in CONTEXT_FIELDS:
            if name in fields:
                line[name] = _plain(fields[name])
        # ASCII only: a line is valid whatever encoding stderr has (other text is escaped).
        return json.dumps(line, ensure_ascii=True, separators=(",", ":"))


def formatter(fmt: str, service: str) -> logging.Formatter:
    """The formatter of LOG_FORMAT ``fmt`` for ``service``; ValueError for an unknown format."""
    if fmt == "text":
        return logging.Formatter(text_format(service))
    if fmt == "json":
        return JsonFormatter(service)
    raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")

"""What every answer must satisfy, what the fuzzer must never touch, and the failures kept.

Per call: the status is one a client can act on (never UNKNOWN, INTERNAL, UNAVAILABLE,
DEADLINE_EXCEEDED, DATA_LOSS, UNIMPLEMENTED; RESOURCE_EXHAUSTED only for a request above
the message size limit), an error's message is short, and an OK answer decodes with a
default client. A call that breaks one becomes a ``Violation``; the first of each kind is
also written to ``tests/fuzz_regressions/`` (see its README) so it is replayed by the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from shared import limits
from tools.fuzz.catalog import Method, enum_type, is_map, message_type
from tools.fuzz.strategies import json_depth

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS_DIR = ROOT / "tests" / "fuzz_regressions"

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
MAX_MESSAGE_CHARS = 1000
"""An error message longer than this is a violation (the api cuts its own at 512)."""
MUTATING_PREFIXES = ("Create", "Update", "Delete", "Disable", "Enable", "Set", "Patch", "Remove", "Publish")
"""Methods whose requests must not name the ordinary traffic's trigger or rule."""


BUDGET_WORDS = ("its share is", "at capacity", "ingest rate", "watch streams", "credit on this api")
"""What the api's refusals by a budget say (services/api/budgets.py): with many principals, one
principal over its share is refused, which is the contract, not a violation."""


def status_problems(code: grpc.StatusCode, message: str, request_bytes: int, principals: bool = False) -> list[str]:
    """What is wrong with one answer's status (an empty list: nothing). With ``principals``
    (calls made under tokens of every role), PERMISSION_DENIED and a budget's refusal are
    answers the contract allows too."""
    problems = []
    if principals and (
        code == grpc.StatusCode.PERMISSION_DENIED
        or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(w in message for w in BUDGET_WORDS))
    ):
        pass
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if request_bytes <= limits.MAX_MESSAGE_BYTES:
            problems.append(
                f"RESOURCE_EXHAUSTED for a {request_bytes:,}-byte request (allowed only above "
                f"{limits.MAX_MESSAGE_BYTES:,} bytes)"
            )
    elif code not in ALLOWED:
        problems.append(f"status {code.name}")
    if len(message) > MAX_MESSAGE_CHARS:
        problems.append(f"error message of {len(message):,} characters (at most {MAX_MESSAGE_CHARS:,})")
    return problems


def decode_problem(cls: type[Message], data: bytes) -> tuple[Message | None, str | None]:
    """The answer decoded, or why a default client cannot decode it."""
    try:
        return cls.FromString(data), None
    except DecodeError as exc:
        return None, f"OK answer of {len(data):,} bytes a default client cannot decode ({exc})"


# --- what the fuzzer must never touch --------------------------------------------------------
def _norm(text: str) -> str:
    return text.strip().lower()


@dataclass
class Protected:
    """The ordinary traffic's trigger and rule: no generated write may name them.

    Ids are small integers, so a generated id often *is* theirs; refs are compared after
    stripping and lower-casing, in case the api is lax about either.
    """

    refs: set[str] = field(default_factory=set)
    ids: set[int] = field(default_factory=set)
    skipped: int = 0

    def add(self, ref: str, id_: int) -> None:
        self.refs.add(_norm(ref))
        self.ids.add(id_)

    def touches(self, method: Method, message: Message) -> bool:
        if not method.name.startswith(MUTATING_PREFIXES):
            return False
        refs = {_norm(r) for r in self.refs}
        return any(
            (isinstance(v, str) and _norm(v) in refs)
            or (isinstance(v, int) and not isinstance(v, bool) and v in self.ids)
            for v in _scalars(message)
        )

    def touches_raw(self, method: Method, data: bytes) -> bool:
        """Raw bytes are judged by what the api would decode them to."""
        if not method.name.startswith(MUTATING_PREFIXES):
            return False
        try:
            message = method.request.FromString(data)
        except DecodeError:
            return False
        return self.touches(method, message)


def _scalars(message: Message) -> Iterable[Any]:
    """Every id-like and text value of the contract's own messages (not inside JSON)."""
    for fd, value in message.ListFields():
        items = list(value) if fd.is_repeated else [value]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            # A CloudEvent's type names its trigger: PublishBatch's events are looked into too.
            if message_type(fd).full_name.startswith(("automation.", "io.cloudevents.")) and not is_map(fd):
                for item in items:
                    yield from _scalars(item)
        elif fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64):
            yield from items


# --- describing a request in a line ----------------------------------------------------------
def _brief_text(s: str) -> str:
    notes = []
    if "\x00" in s:
        notes.append("NUL")
    if any(ord(c) > 0xFFFF for c in s):
        notes.append("astral")
    if len(s) > 40:
        return f"{repr(s[:16])[:40]}...({len(s):,} chars{', ' + ', '.join(notes) if notes else ''})"
    return repr(s) + (f" ({', '.join(notes)})" if notes else "")


def _brief_json(value: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    try:
        data = MessageToDict(value) if isinstance(value, Message) else value
    except (ValueError, RecursionError):
        data = None
    size = value.ByteSize() if isinstance(value, Message) else 0
    notes = [f"{size:,} B"]
    if data is not None:
        notes.insert(0, f"depth {json_depth(data)}")
        text = json.dumps(data, default=str)
        if "NaN" in text or "Infinity" in text:
            notes.append("NaN/Inf")
        if "\\u0000" in text:
            notes.append("NUL")
        if isinstance(data, dict) and len(data) > 20:
            notes.append(f"{len(data):,} keys")
        elif len(text) <= 60:
            return text
    return "{" + ", ".join(notes) + "}"


def describe(message: Message, budget: int = 400) -> str:
    """A short, readable account of a request: set fields only, big values summarised."""
    parts: list[str] = []
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            full = message_type(fd).full_name
            if full.startswith("google.protobuf.") and full.endswith(("Struct", "Value", "ListValue")):
                parts.append(f"{fd.name}={_brief_json(value)}")
            elif is_map(fd):  # before repeated: a map is a repeated field whose items are keys
                parts.append(f"{fd.name}=<{len(value)} entries>")
            elif fd.is_repeated:
                items = list(value)
                first = describe(items[0], 120) if items else ""
                parts.append(f"{fd.name}=[{len(items):,} x {{{first}}}]")
            else:
                parts.append(f"{fd.name}={{{describe(value, 200)}}}")
        elif fd.is_repeated:
            items = list(value)
            shown = ", ".join(_brief_text(v) if isinstance(v, str) else str(v) for v in items[:3])
            parts.append(f"{fd.name}=[{shown}{', ...' if len(items) > 3 else ''}] ({len(items):,})")
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            known = enum_type(fd).values_by_number.get(value)
            parts.append(f"{fd.name}={known.name if known else f'{value} (unknown)'}")
        elif isinstance(value, str):
            parts.append(f"{fd.name}={_brief_text(value)}")
        else:
            parts.append(f"{fd.name}={value!r}")
    text = ", ".join(parts) or "(empty)"
    return text if len(text) <= budget else text[: budget - 3] + "..."


# --- violations and regression files ---------------------------------------------------------
@dataclass
class Violation:
    """One broken invariant of one call (the first of its kind; ``count`` says how many)."""

    method: str
    origin: str
    code: str
    message: str
    problem: str
    request_bytes: int
    description: str
    payload: bytes = field(repr=False, default=b"")
    count: int = 1
    file: Path | None = None

    def line(self) -> str:
        where = (
            f" -> {self.file.relative_to(ROOT) if self.file.is_relative_to(ROOT) else self.file}" if self.file else ""
        )
        msg = self.message if len(self.message) <= 160 else self.message[:157] + "..."
        return (
            f"{self.method} [{self.origin}] x{self.count}: {self.problem}; got {self.code} {msg!r}; "
            f"request ({self.request_bytes:,} B): {self.description}{where}"
        )


_DIGITS = re.compile(r"\d+")


def signature(method: str, problem: str, code: str, message: str) -> str:
    """Violations alike enough to be one finding: numbers and long tails do not count."""
    kind = _DIGITS.sub("#", problem.split("(")[0])
    return f"{method}|{kind}|{code}|{_DIGITS.sub('#', message)[:60]}"


def regression_name(path: str, payload: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + payload).hexdigest()[:16] + ".json"


def write_regression(directory: Path, v: Violation, path: str, seed: int | None) -> Path:
    """The failing call as a replayable file; see tests/fuzz_regressions/README.md."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / regression_name(path, v.payload)
    record = {
        "method": path,
        "request_b64": base64.b64encode(v.payload).decode(),
        "request_bytes": len(v.payload),
        "origin": v.origin,
        "description": v.description,
        "observed": {"code": v.code, "message": v.message[:2000]},
        "problem": v.problem,
        "seed": seed,
        "found": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    target.write_text(json.dumps(record, indent=2, ensure_ascii=True) + "\n")
    return target


@dataclass
class Recorder:
    """Collects violations, one entry per kind, and keeps the first of each as a file."""

    directory: Path | None
    seed: int | None = None
    max_files: int = 40
    violations: dict[str, Violation] = field(default_factory=dict)
    files: int = 0

    def record(
        self,
        method: Method,
        origin: str,
        code: grpc.StatusCode,
        message: str,
        problem: str,
        payload: bytes,
        description: str,
    ) -> Violation:
        key = signature(method.path, problem, code.name, message)
        found = self.violations.get(key)
        if found is not None:
            found.count += 1
            return found
        v = Violation(
            method=method.short,
            origin=origin,
            code=code.name,
            message=message,
            problem=problem,
            request_bytes=len(payload),
            description=description,
            payload=payload,
        )
        self.violations[key] = v
        # Requests above a few hundred KiB would make the repository heavy: they are described
        # instead. Known cases and replays are in the tests already.
        keep = not origin.startswith(("known", "replay"))
        if keep and self.directory is not None and self.files < self.max_files and len(payload) <= 512 * 1024:
            v.file = write_regression(self.directory, v, method.path, self.seed)
            self.files += 1
        return v

    @property
    def total(self) -> int:
        return sum(v.count for v in self.violations.values())


# --- logs ------------------------------------------------------------------------------------
def last_error(path: Path) -> str:
    """The last exception line or ERROR/CRITICAL line of a log: why a child ended."""
    lines = path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line and not line.startswith((" ", "\t")) and ("Error" in line or "ERROR" in line or "CRITICAL" in line):
            return line[:240]
    return lines[-1][:240] if lines else "(empty log)"


def tracebacks(paths: Iterable[Path]) -> Counter[str]:
    """Tracebacks in the children's logs, by file and exception line."""
    found: Counter[str] = Counter()
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "Traceback (most recent call last)" not in line:
                continue
            # The exception is the first line after the traceback that is not indented.
            exc = next((x for x in lines[i + 1 : i + 400] if x and not x.startswith((" ", "\t"))), "?")
            found[f"{path.name}: {exc[:200]}"] += 1
    return found

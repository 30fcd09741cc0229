"""Checks of request fields against ``shared.limits``, before anything is written.

Every check names the field it refused by its full path (``event.payload.a.b``,
``rule.conditions[2].value``) and quotes the caller's value only through ``brief``. JSON
values are checked while they are converted from protobuf, in one pass: size first (in C,
``ByteSize``), then depth, keys, NUL characters and non-finite numbers, which PostgreSQL's
text and jsonb cannot hold.
"""

from __future__ import annotations

import math
import re
from typing import Any

from google.protobuf import struct_pb2

from shared import limits
from shared.errors import Violations, brief

# fullmatch, not match with "$": "$" also matches before a trailing newline.
REF = re.compile(r"[a-z0-9_-]+\.[a-z0-9_.-]+")
REF_HINT = "must look like pack.name (lower case letters, digits, '_', '-')"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_NUL = "contains a NUL character, which cannot be stored"


def ref(v: Violations, field: str, value: str, required: bool = True) -> None:
    if not value:
        if required:
            v.add(field, "is required")
    elif len(value) > limits.MAX_REF:
        v.add(field, f"must be at most {limits.MAX_REF} characters, got {len(value)}")
    elif not REF.fullmatch(value):
        v.add(field, f"{REF_HINT}, got {brief(value)}")


def ref_or_raise(field: str, value: str) -> str:
    v = Violations()
    ref(v, field, value)
    v.raise_if_any()
    return value


def id_or_raise(field: str, value: int) -> int:
    v = Violations()
    positive_id(v, field, value)
    v.raise_if_any()
    return value


def text(v: Violations, field: str, value: str, limit: int, required: bool = False) -> None:
    """Free text: bounded, and without NUL (PostgreSQL text cannot hold it)."""
    if not value:
        if required:
            v.add(field, "is required")
    elif len(value) > limit:
        v.add(field, f"must be at most {limit} characters, got {len(value)}")
    elif "\x00" in value:
        v.add(field, _NUL)


def filter_ref(v: Violations, field: str, value: str) -> None:
    """A ref given as a list filter: empty means "any"; otherwise it must be a possible ref."""
    ref(v, field, value, required=False)


def positive_id(v: Violations, field: str, value: int) -> None:
    if value <= 0:
        v.add(field, f"must be a positive id, got {value}")


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{brief(key, 40)}]"


class _Json:
    """One JSON value's conversion from protobuf, collecting what cannot be stored."""

    __slots__ = ("max_depth", "problems")

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.problems: list[tuple[str, str]] = []

    def value(self, path: str, value: struct_pb2.Value, depth: int) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            s = value.string_value
            if "\x00" in s:
                self.problems.append((path, _NUL))
            return s
        if kind == "number_value":
            n = value.number_value
            if not math.isfinite(n):
                self.problems.append((path, f"must be a finite number, got {n} (JSON has no NaN or Infinity)"))
                return None
            # Struct numbers are doubles; whole ones come back as ints so that 3 stays 3 in
            # storage and templates ("n=3", not "n=3.0").
            return int(n) if n.is_integer() and abs(n) < 2**53 else n
        if kind == "bool_value":
            return value.bool_value
        if kind == "struct_value":
            return self.struct(path, value.struct_value, depth + 1)
        if kind == "list_value":
            if depth + 1 > self.max_depth:
                self.problems.append((path, f"nests deeper than {self.max_depth} levels"))
                return None
            return [self.value(f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value.list_value.values)]
        return None

    def struct(self, path: str, struct: struct_pb2.Struct, depth: int) -> dict[str, Any] | None:
        if depth > self.max_depth:
            self.problems.append((path, f"nests deeper than {self.max_depth} levels"))
            return None
        out: dict[str, Any] = {}
        for key, item in struct.fields.items():
            if len(key) > limits.MAX_KEY:
                self.problems.append((f"{path}[{brief(key, 40)}]", f"keys may be at most {limits.MAX_KEY} characters"))
            elif "\x00" in key:
                self.problems.append((f"{path}[{brief(key, 40)}]", "a key " + _NUL))
            out[key] = self.value(_key_path(path, key), item, depth)
            if len(self.problems) > limits.MAX_VIOLATIONS:
                break  # enough to act on; the rest would not be shown
        return out


def _size(v: Violations, field: str, size: int, max_bytes: int) -> bool:
    if size > max_bytes:
        v.add(field, f"is {size:,} bytes encoded; at most {max_bytes:,} are accepted")
        return False
    return True


def json_object(
    v: Violations, field: str, struct: struct_pb2.Struct, max_bytes: int, max_depth: int = limits.MAX_JSON_DEPTH
) -> dict[str, Any]:
    """A Struct field as JSON data, its problems added to ``v`` (then the result is unusable)."""
    if not _size(v, field, struct.ByteSize(), max_bytes):
        return {}
    walk = _Json(max_depth)
    out = walk.struct(field, struct, 1)
    for f, why in walk.problems:
        v.add(f, why)
    return out or {}


def json_value(
    v: Violations, field: str, value: struct_pb2.Value, max_bytes: int, max_depth: int = limits.MAX_JSON_DEPTH
) -> Any:
    """A Value field as JSON data, its problems added to ``v``."""
    if not _size(v, field, value.ByteSize(), max_bytes):
        return None
    walk = _Json(max_depth)
    out = walk.value(field, value, 0)
    for f, why in walk.problems:
        v.add(f, why)
    return out

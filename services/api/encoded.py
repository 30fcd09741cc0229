"""Sizes and depths of JSON data as it will be encoded in ``google.protobuf.Struct`` messages.

The api refuses to store a record it could not send later, so derived records (a rendered
config, an enforcement, CreateEvent's answer) are measured before the write. Measuring walks
the value once; subtrees shared by reference (a template that inserts ``event.payload`` into
ten places of a config inserts the same object ten times) are measured once and remembered,
so a config that *encodes* to megabytes can be refused after microseconds of work.

The sizes are exact for the wire format (tested against ``ByteSize``).
"""

from __future__ import annotations

from typing import Any


def varint_len(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field(body: int) -> int:
    """A length-delimited field of ``body`` bytes: tag, length, body."""
    return 1 + varint_len(body) + body


class Measure:
    """Measures JSON values; remembers containers by identity for the life of the object."""

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        # id -> (object, size, depth); the object is kept so that its id stays unique.
        self._memo: dict[int, tuple[Any, int, int]] = {}

    def value(self, value: Any) -> tuple[int, int]:
        """(encoded size of a ``Value`` message's body, nesting depth) of JSON data."""
        kind = type(value)
        if kind is str:
            n = len(value) if value.isascii() else len(value.encode())
            return _field(n), 0
        if kind is int or kind is float:
            return 9, 0  # tag + fixed64
        if kind is bool or value is None:
            return 2, 0  # tag + one-byte varint (null_value is an enum set in a oneof)
        if kind is dict:
            size, depth = self.struct(value)
            return _field(size), depth
        if kind is list:
            size, depth = self.list(value)
            return _field(size), depth
        raise TypeError(f"not JSON data: {kind.__name__}")

    def struct(self, value: dict[str, Any]) -> tuple[int, int]:
        """(encoded size of a ``Struct`` message's body, depth counting the object itself)."""
        known = self._memo.get(id(value))
        if known is not None:
            return known[1], known[2]
        size, depth = 0, 0
        for key, item in value.items():
            k = len(key) if key.isascii() else len(key.encode())
            v, d = self.value(item)
            size += _field(_field(k) + _field(v))  # map entry: key field, value field
            depth = max(depth, d)
        self._memo[id(value)] = (value, size, depth + 1)
        return size, depth + 1

    def list(self, value: list[Any]) -> tuple[int, int]:
        known = self._memo.get(id(value))
        if known is not None:
            return known[1], known[2]
        size, depth = 0, 0
        for item in value:
            v, d = self.value(item)
            size += _field(v)
            depth = max(depth, d)
        self._memo[id(value)] = (value, size, depth + 1)
        return size, depth + 1


RECORD_OVERHEAD = 128
"""Bytes an event or enforcement message needs besides its JSON and text fields (ids, enums,
timestamps, tags), rounded up; the watch stream's Delivery wrapper fits in it too."""


def record_size(
    measure: Measure, texts: list[str], objects: list[dict[str, Any] | None], arrays: list[list[Any]]
) -> int:
    """Encoded size bound of one record message with these text, Struct and ListValue fields."""
    size = RECORD_OVERHEAD
    for t in texts:
        size += _field(len(t.encode()))
    for o in objects:
        if o is not None:
            size += _field(measure.struct(o)[0])
    for a in arrays:
        size += _field(measure.list(a)[0])
    return size

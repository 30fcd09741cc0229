"""The hand-rolled JSON -> protobuf conversion matches the library's, value for value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import struct_pb2

from services.api import convert, validate
from shared.errors import Violations

SAMPLES: list[dict[str, Any]] = [
    {},
    {"s": "x", "i": 3, "f": 1.5, "t": True, "fa": False, "n": None},
    {"nested": {"a": {"b": [1, "two", None, {"c": []}]}}, "empty": {}, "list": []},
    {"big": 2**40, "neg": -7, "unicode": "héllo ✓"},
]


@pytest.mark.parametrize("sample", SAMPLES)
def test_struct_matches_struct_update(sample: dict[str, Any]) -> None:
    expected = struct_pb2.Struct()
    expected.update(sample)
    assert convert.struct(sample) == expected
    # And back, as requests are read (whole numbers come back as ints).
    v = Violations()
    assert validate.json_object(v, "sample", convert.struct(sample), 1 << 20) == sample
    assert v.items == []


def test_list_value_matches_extend() -> None:
    items: list[Any] = [{"field": "a", "operator": "equals", "value": [1, {"x": None}]}, "s", 2, None, []]
    expected = struct_pb2.ListValue()
    expected.extend(items)
    assert convert.list_value(items) == expected


def test_non_json_values_are_refused() -> None:
    with pytest.raises(TypeError, match="not JSON data"):
        convert.struct({"when": datetime.now(UTC)})


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 24, 12, 30, 1, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2026, 6, 1, 14, 0, tzinfo=UTC) + timedelta(microseconds=1),
    ],
)
def test_timestamps_round_trip_exactly(when: datetime) -> None:
    stamp = convert.ts(when)
    assert 0 <= stamp.nanos < 10**9
    assert convert.from_ts(stamp) == when

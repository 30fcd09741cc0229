"""Payload search: ListEvents' ``payload_contains``, checked and bounded before any read. Pure
functions, no I/O.

The filter is answered by PostgreSQL's jsonb containment (``payload @> filter``) through the
GIN index of migration 0021. What bounds it here is its shape (bytes, depth, values); what
bounds its cost on the server is its own statement timeout (``limits.SEARCH_TIMEOUT_S``,
applied by the store).

Containment is also a way to ask "does this event's secret field hold X?" without being shown
the field: a reader without the ``reveal`` role could guess a masked token one search at a
time. So a filter that reaches a path some schema marks secret (``secrets``) is refused to
them, as asking for the value in clear would be.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf import struct_pb2

from services.api import secrets, validate
from shared import limits
from shared.errors import InvalidArgument, Violations

FIELD = "payload_contains"


def payload_filter(struct: struct_pb2.Struct) -> dict[str, Any] | None:
    """The filter as JSON data, or None for none (an empty object contains in every payload);
    INVALID_ARGUMENT naming ``payload_contains`` past its bounds."""
    if not struct.fields:
        return None
    v = Violations()
    value = validate.json_object(v, FIELD, struct, limits.MAX_SEARCH_BYTES, limits.MAX_SEARCH_DEPTH)
    v.raise_if_any()
    count = sum(1 for _ in leaf_paths(value))
    if count > limits.MAX_SEARCH_VALUES:
        raise InvalidArgument.one(FIELD, f"has {count} values; at most {limits.MAX_SEARCH_VALUES} are searched at once")
    return value


def as_json(value: dict[str, Any]) -> str:
    """The filter as the text bound to the query: keys sorted, so that the same filter is the
    same page-token scope however a client ordered it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def leaf_paths(value: Any, at: secrets.Path = ()) -> Iterator[secrets.Path]:
    """Every path the filter tests: to each scalar, and to each empty object or array (which
    tests only that a container is there). An array's items match items at any index, so
    their segment is ``secrets.ANY``."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaf_paths(item, (*at, key))
    elif isinstance(value, list) and value:
        for item in value:
            yield from leaf_paths(item, (*at, secrets.ANY))
    else:
        yield at


def _same(a: Any, b: Any) -> bool:
    return a is secrets.ANY or b is secrets.ANY or (type(a) is type(b) and a == b)


def overlaps(searched: secrets.Path, secret: secrets.Path) -> bool:
    """Whether testing ``searched`` can tell something of the value at ``secret``: one is a
    prefix of the other (a test below a secret reads part of it; a test above it, such as an
    object holding the secret, compares it whole)."""
    return all(_same(a, b) for a, b in zip(searched, secret, strict=False))


def secret_reached(value: dict[str, Any], secret_paths: Iterable[secrets.Path]) -> str | None:
    """The first path of the filter that reaches a secret path, as text; None when none does."""
    marked = list(secret_paths)
    if not marked:
        return None
    for path in leaf_paths(value):
        if any(overlaps(path, s) for s in marked):
            return secrets.path_text(path)
    return None

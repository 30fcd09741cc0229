"""Hypothesis strategies for every request of the contract, built by walking descriptors.

The design is hypothesis-protobuf's: one strategy per scalar field type, recursion for
message fields, ``st.lists`` for repeated ones, and per-field overrides by full name (a
strategy, or a function of the default strategy). Three things are added:

- **Edges.** Every scalar strategy leans on the values that break code: empty, NUL, astral
  and combining characters, right-to-left marks, strings just around each ``shared.limits``
  value, int64 extremes, unknown enum numbers (proto3 enums are open), non-finite doubles,
  JSON nested up to 40 levels, payloads around and above the size limits, thousands of keys.
  Big values are drawn as a small *recipe* (a chunk and a count) and expanded in Python:
  hypothesis then spends a handful of choices on a 4 MiB string, not four million.
- **Meaning by field name.** ``*_ref`` fields get references (known ones, fresh valid ones,
  and near misses: upper case, trailing newline, 300 characters), id fields get ids seen in
  earlier answers, ``page_token`` gets tokens collected from *any* list (so one list's token
  is fed to another), and so on. A ``Pool`` holds what the answers showed.
- **Validity on purpose.** Two walkers: ``edge`` (anything goes) and ``plausible`` (values a
  client would send). Write paths also have *scenarios* (``SCENARIOS``): triggers, rules
  with conditions and templated action parameters, and events that match them, so that deep
  code paths (matching, rendering, hand-off, the executor) see the edge values too.

``Strategies.call(method)`` mixes them, and adds raw corruption (random bytes, truncated,
bit-flipped or padded encodings of valid requests) sent without a serializer.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import duration_pb2, empty_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from shared import limits
from shared.gen.automation.v1 import common_pb2, condition_pb2, enforcement_pb2, event_pb2, rule_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2
from tools.fuzz.catalog import Method, enum_type, is_map, message_class, message_type

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Json = Any

KiB = limits.KiB
MiB = limits.MiB

# --- the namespace of the fuzzer's own triggers and rules ------------------------------------
# A few fixed refs, so that creates collide (ALREADY_EXISTS), rules land on triggers that
# events are sent to, and events match rules.
FUZZ_TRIGGERS = tuple(f"fz.t{i}" for i in range(6))
FUZZ_RULES = tuple(f"fz.r{i}" for i in range(40))
FUZZ_ACTIONS = ("core.echo", "fz.act", "")
PAYLOAD_KEYS = ("a", "b", "kind", "n")

# --- scalar edges ----------------------------------------------------------------------------
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_EDGES = (
    0,
    1,
    -1,
    2,
    INT32_MAX,
    INT32_MAX + 1,
    2**32,
    2**53,
    2**53 + 1,
    2**62,
    INT64_MAX,
    INT64_MIN,
    INT64_MIN + 1,
    INT32_MIN,
)
INT32_EDGES = (0, 1, -1, 2, 15, 16, 17, 49, 50, 51, 99, 100, 101, 999, 1000, 1001, 4096, INT32_MAX, INT32_MIN)
FLOAT_EDGES = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    -0.0,
    0.0,
    2.0**53,
    2.0**53 + 2,
    2.0**63,
    2.0**64,
    1e-300,
    0.1,
    3.0,
)
# Characters that break things: NUL, line ends, combining marks, bidi controls, zero-width
# joiners, astral-plane emoji and letters, BOM, non-characters, quotes and template braces.
EDGE_CHARS = (
    "\x00",
    "\n",
    "\r\n",
    "\t",
    "\x7f",
    "\u0301",
    "e\u0301\u0302\u0303",
    "\u202e",
    "\u200f",
    "\u061c",
    "\u200b",
    "\ufeff",
    "\uffff",
    "\ufffd",
    "😀",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U00010348",
    "\U0001d518",
    "\U0010ffff",
    "ǅ",
    "İ",
    "ß",
    "ﬃ",
    "'",
    '"',
    "\\",
    "%",
    "%s",
    "{{",
    "}}",
    "$1",
    "'; --",
    "\u0430",
    "שלום",
    "مرحبا",
)
# Lengths just around the limits of text fields.
TEXT_SIZES = tuple(
    sorted(
        {
            n + d
            for n in (
                limits.MAX_REF,
                limits.MAX_KEY,
                limits.MAX_REQUEST_ID,
                limits.MAX_PAGE_TOKEN,
                limits.MAX_REASON,
                limits.MAX_DESCRIPTION,
                limits.MAX_FIELD_PATH,
            )
            for d in (-1, 0, 1)
        }
        | {5000, 10_000, 70_000}
    )
)
# Bytes of one big JSON string: around each JSON size limit, and (huge only) above the
# message size limit, where gRPC itself must answer RESOURCE_EXHAUSTED.
BIG_SIZES = tuple(
    sorted(
        {
            n + d
            for n in (limits.MAX_CONFIG_BYTES, limits.MAX_PAYLOAD_BYTES, limits.MAX_CONDITION_VALUE_BYTES)
            for d in (-64, 0, 64)
        }
        | {limits.MAX_ENFORCEMENT_BYTES, limits.MAX_CREATE_RESPONSE_BYTES}
    )
)
HUGE_SIZES = (limits.MAX_MESSAGE_BYTES - 64, limits.MAX_MESSAGE_BYTES + 1024)
DEPTHS = (1, 2, 3, limits.MAX_JSON_DEPTH - 1, limits.MAX_JSON_DEPTH, limits.MAX_JSON_DEPTH + 1, 31, 32, 33, 40)
COUNTS = (0, 1, 2, 999, 1000, 1001, 1500)
KEY_COUNTS = (0, 1, 100, 1000, 1500, 5000)
TEMPLATES = (
    "{{ event.payload.a }}",
    "{{event.payload.a}}",
    "{{ event.payload.b }}",
    "{{ event.payload.b.c }}",
    "{{ event.payload.n }}",
    "{{ event.payload }}",
    "{{ event.id }}",
    "{{ event.trigger }}",
    "{{ event.created }}",
    "{{ rule.ref }}",
    "{{ event.payload.missing.x }}",
    "{{ event.payload.a.0 }}",
    "x={{ event.payload.a }} y={{ event.payload.b }}",
    "{{",
    "}}",
    "{{ }}",
    "{{ x }}",
    "{{ event.payload." + ".".join(["a"] * (limits.MAX_FIELD_SEGMENTS + 1)) + " }}",
    "{{ event.payload." + "a" * (limits.MAX_FIELD_PATH + 1) + " }}",
    "{{ event.payload.a }}" * (limits.MAX_TEMPLATES + 1),
    "{{ event.payload.a }}" * 8,
)
FIELD_PATHS = (
    "a",
    "b",
    "b.c",
    "kind",
    "n",
    "a.0",
    "a.b.c.d",
    "",
    ".",
    ".a",
    "a.",
    "a..b",
    "a b",
    "a\x00b",
    "a\n",
    ".".join(["a"] * limits.MAX_FIELD_SEGMENTS),
    ".".join(["a"] * (limits.MAX_FIELD_SEGMENTS + 1)),
    "a" * limits.MAX_FIELD_PATH,
    "a" * (limits.MAX_FIELD_PATH + 1),
    "ключ",
    "😀",
)
JSON_KEYS = (
    "a",
    "b",
    "c",
    "kind",
    "n",
    "x",
    "",
    "\x00",
    "a\x00",
    "a.b",
    "{{",
    "$",
    "ключ",
    "🔑",
    "A",
    " a",
    "a" * limits.MAX_KEY,
    "a" * (limits.MAX_KEY + 1),
)
UPDATABLE_GUESSES = (
    "label",
    "description",
    "action_ref",
    "action_params",
    "conditions",
    "condition",
    "enabled",
    "ref",
    "id",
    "trigger_ref",
    "created",
    "rule.enabled",
    "conditions.0",
    "actionRef",
    "",
    "*",
    "\x00",
    "x" * 300,
)
# Unix seconds: protobuf's own bounds (years 1 and 9999) and just beyond, the epoch, int64's.
TS_SECONDS = (
    0,
    -1,
    1,
    -62135596800,
    -62135596801,
    253402300799,
    253402300800,
    INT64_MAX,
    INT64_MIN,
    2**32,
    -(2**31),
)
NANOS = (0, -1, 1, 999_999_999, 1_000_000_000, INT32_MAX, INT32_MIN)


# --- what the answers showed -----------------------------------------------------------------
ID_KINDS = ("event", "enforcement", "rule", "trigger", "execution", "history")
REF_KINDS = ("trigger", "rule", "action", "pack", "source")
_ID_FIELD_KIND = {
    "event": "event",
    "event_id": "event",
    "enforcement": "enforcement",
    "enforcement_ids": "enforcement",
    "rule": "rule",
    "trigger": "trigger",
    "execution_id": "execution",
    "entity_id": "execution",
    "parent": "execution",
}
_MESSAGE_KIND = {
    "automation.v1.Event": "event",
    "automation.v1.Enforcement": "enforcement",
    "automation.v1.Rule": "rule",
    "automation.v1.Trigger": "trigger",
    "automation.v1.Execution": "execution",
    "automation.v1.HistoryRecord": "history",
    "automation.v1.ResolutionOutcome": "enforcement",
    "automation.v1.ExhaustedEnforcement": "enforcement",
}


def id_kind_of(message: Descriptor | None) -> str:
    """Whose id a message's ``id`` field holds, from the message's name (GetRuleRequest: a
    rule's; ResolveEnforcementRequest: an enforcement's)."""
    name = message.name.lower() if message is not None else ""
    for kind in ("enforcement", "execution", "event", "rule", "trigger", "history"):
        if kind in name:
            return kind
    return "enforcement" if name.startswith(("resolve", "release", "retry")) else "event"


def ref_kind(name: str) -> str:
    """Which references a ``*_ref`` field holds, from its name."""
    for kind in REF_KINDS:
        if name.startswith(kind):
            return kind
    if name in ("ref", "refs"):
        return "any"
    return "any"


class Pool:
    """Ids, references, page tokens and keys seen in answers, offered back to later requests.

    Written by the event loop and read by the generator thread; each deque is bounded and
    every access takes the lock.
    """

    def __init__(self, size: int = 256) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, deque[int]] = {k: deque(maxlen=size) for k in ID_KINDS}
        self._refs: dict[str, deque[str]] = {k: deque(maxlen=size) for k in (*REF_KINDS, "any")}
        self._tokens: deque[str] = deque(maxlen=size)
        self._request_ids: deque[str] = deque(maxlen=size)
        self._executors: deque[str] = deque(maxlen=32)

    # writers
    def add_id(self, kind: str, value: int) -> None:
        if value > 0:
            with self._lock:
                self._ids.setdefault(kind, deque(maxlen=256)).append(value)

    def add_ref(self, kind: str, value: str) -> None:
        if value:
            with self._lock:
                self._refs.setdefault(kind, deque(maxlen=256)).append(value)
                self._refs["any"].append(value)

    def add_token(self, token: str) -> None:
        if token:
            with self._lock:
                self._tokens.append(token)

    def add_request_id(self, value: str) -> None:
        if value:
            with self._lock:
                self._request_ids.append(value)

    def add_executor(self, value: str) -> None:
        if value:
            with self._lock:
                self._executors.append(value)

    def observe(self, message: Message) -> None:
        """Collects ids, refs, tokens and executor ids from an answer, by walking it."""
        kind = _MESSAGE_KIND.get(message.DESCRIPTOR.full_name)
        for fd, value in message.ListFields():
            name = fd.name
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if is_map(fd):
                    continue
                items = list(value) if fd.is_repeated else [value]
                if message_type(fd).full_name.startswith("automation."):
                    for item in items:
                        self.observe(item)
                continue
            values = list(value) if fd.is_repeated else [value]
            for v in values:
                if isinstance(v, bool):
                    continue
                if isinstance(v, int) and fd.type != FieldDescriptor.TYPE_ENUM:
                    if name == "id" and kind:
                        self.add_id(kind, v)
                    elif name in _ID_FIELD_KIND:
                        self.add_id(_ID_FIELD_KIND[name], v)
                elif isinstance(v, str):
                    if name == "next_page_token":
                        self.add_token(v)
                    elif name == "executor_id":
                        self.add_executor(v)
                    elif name == "ref" and kind in ("rule", "trigger"):
                        self.add_ref(kind, v)
                    elif name.endswith(("_ref", "_refs")):
                        self.add_ref(ref_kind(name), v)

    # readers: ``i`` is drawn by hypothesis, so the choice is part of the example
    def id(self, kind: str, i: int) -> int | None:
        with self._lock:
            pool = self._ids.get(kind) or self._ids["event"]
            return pool[i % len(pool)] if pool else None

    def ref(self, kind: str, i: int) -> str | None:
        with self._lock:
            pool = self._refs.get(kind) or self._refs["any"]
            return pool[i % len(pool)] if pool else None

    def token(self, i: int) -> str | None:
        with self._lock:
            return self._tokens[i % len(self._tokens)] if self._tokens else None

    def request_id(self, i: int) -> str | None:
        with self._lock:
            return self._request_ids[i % len(self._request_ids)] if self._request_ids else None

    def executor(self, i: int) -> str | None:
        with self._lock:
            return self._executors[i % len(self._executors)] if self._executors else None

    def sizes(self) -> dict[str, int]:
        with self._lock:
            out = {f"ids.{k}": len(v) for k, v in self._ids.items()}
            out |= {f"refs.{k}": len(v) for k, v in self._refs.items()}
            out["tokens"] = len(self._tokens)
            return out


# --- small helpers ---------------------------------------------------------------------------
def _repeat(chunk: str, size: int) -> str:
    """``chunk`` repeated to ``size`` UTF-8 bytes or just over (a big value from a small draw)."""
    if not chunk:
        chunk = "x"
    per = max(1, len(chunk.encode()))
    return chunk * max(1, size // per)


def _weighted(*options: tuple[int, SearchStrategy[T]]) -> SearchStrategy[T]:
    """One of ``options``, chosen with the given weights (``st.one_of`` has none)."""
    table: list[SearchStrategy[T]] = []
    for weight, strategy in options:
        table.extend([strategy] * weight)
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def nest(depth: int, leaf: Json, bits: int, key: str) -> Json:
    """A JSON value ``depth`` containers deep: objects and lists as the bits of ``bits`` say."""
    value = leaf
    for level in range(depth):
        value = [value] if (bits >> (level % 48)) & 1 else {key: value}
    return value


Fill = Callable[[Any], None]
"""Fills a message in place. Message strategies draw fills, not messages: protobuf copies a
message by encoding and decoding it, and a decoder refuses more than 100 levels, so a deep
payload built on its own could never be copied into its request. Filled in place, it can be
built, encoded and sent (and the api must refuse it cleanly)."""


def set_value(target: struct_pb2.Value, value: Json) -> None:
    """Sets a ``google.protobuf.Value`` in place from JSON data."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, dict):
        target.struct_value.SetInParent()
        target.struct_value.update(value)
    else:
        target.list_value.SetInParent()
        target.list_value.extend(value)


def fill_struct(value: Mapping[str, Json]) -> Fill:
    return lambda target: target.update(dict(value))


def fill_value(value: Json) -> Fill:
    return lambda target: set_value(target, value)


def fill_copy(message: Message) -> Fill:
    """For small messages (timestamps, masks): a copy is safe there."""
    return lambda target: target.CopyFrom(message)


def build(cls: type[M], fill: Fill) -> M:
    message = cls()
    fill(message)
    return message


def json_depth(value: Json) -> int:
    """Containers on the deepest path (0 for a scalar); iterative, values may be deep."""
    deepest = 0
    stack: list[tuple[Json, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
            deepest = max(deepest, d + 1)
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
            deepest = max(deepest, d + 1)
    return deepest


def near_misses(ref: str) -> tuple[str, ...]:
    """References that almost are ``ref``: what a lax parser would take for it."""
    pack, _, name = ref.partition(".")
    return (
        ref + "\n",
        "\n" + ref,
        ref.upper(),
        ref[:1].upper() + ref[1:],
        " " + ref,
        ref + " ",
        ref + "\x00",
        ref.replace(".", "", 1),
        ref + ".",
        "." + ref,
        (ref + "x" * 300)[:300],
        (pack + "." + name + "x" * 300)[: limits.MAX_REF],
        (pack + "." + name + "x" * 300)[: limits.MAX_REF + 1],
        ref.replace("a", "\u0430"),
        "\u200b" + ref,
        ref + "\u0301",
        ref + "/" + ref,
        ref.replace(".", ".."),
        ref + "%",
        ref + "*",
    )


# --- text, numbers, JSON ---------------------------------------------------------------------
def texts(plausible: bool = False) -> SearchStrategy[str]:
    """Strings leaning on edge characters and sizes around the limits."""
    if plausible:
        return st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=12)
    return _weighted(
        (2, st.just("")),
        (4, st.text(max_size=24)),
        (4, st.lists(st.sampled_from(EDGE_CHARS) | st.text(max_size=3), max_size=10).map("".join)),
        (2, st.builds(_repeat, st.text(min_size=1, max_size=3), st.sampled_from(TEXT_SIZES))),
        (1, st.builds(_repeat, st.text(min_size=1, max_size=3), st.integers(0, 6000))),
    )


def floats() -> SearchStrategy[float]:
    return st.sampled_from(FLOAT_EDGES) | st.floats(allow_nan=True, allow_infinity=True)


def json_scalars(plausible: bool = False) -> SearchStrategy[Json]:
    if plausible:
        return st.none() | st.booleans() | st.integers(-1000, 1000) | texts(plausible=True) | st.sampled_from("xyz")
    return _weighted(
        (1, st.none()),
        (1, st.booleans()),
        (2, st.integers(-(2**53), 2**53)),
        (2, floats()),
        (3, texts()),
        (2, st.sampled_from(TEMPLATES)),
        (2, st.sampled_from(("x", "y", "tick", "greet"))),
    )


def json_keys(plausible: bool = False) -> SearchStrategy[str]:
    if plausible:
        return st.sampled_from(PAYLOAD_KEYS) | st.text(st.characters(codec="ascii", categories=["L"]), max_size=8)
    return st.sampled_from(JSON_KEYS) | st.sampled_from(PAYLOAD_KEYS) | texts()


class JsonValues:
    """JSON value strategies; ``huge`` adds values above the message size limit."""

    def __init__(self, huge: bool = True) -> None:
        self.huge = huge

    def small(self, plausible: bool = False) -> SearchStrategy[Json]:
        leaves = json_scalars(plausible)
        return st.recursive(
            leaves,
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys(plausible), inner, max_size=4),
            max_leaves=10,
        )

    def deep(self) -> SearchStrategy[Json]:
        return st.builds(
            nest,
            st.sampled_from(DEPTHS) | st.integers(1, 40),
            json_scalars(),
            st.integers(0, 2**48),
            st.sampled_from(PAYLOAD_KEYS),
        )

    def wide(self) -> SearchStrategy[Json]:
        return st.builds(
            lambda prefix, n, leaf: {f"{prefix}{i}": leaf for i in range(n)},
            st.sampled_from(("k", "", "ключ", "a" * 200)),
            st.sampled_from(KEY_COUNTS) | st.integers(0, 2000),
            json_scalars(),
        )

    def long_list(self) -> SearchStrategy[Json]:
        return st.builds(lambda n, leaf: [leaf] * n, st.sampled_from(COUNTS) | st.integers(0, 3000), json_scalars())

    def big_string(self) -> SearchStrategy[Json]:
        sizes = st.sampled_from(BIG_SIZES + HUGE_SIZES if self.huge else BIG_SIZES)
        return st.builds(_repeat, st.text(min_size=1, max_size=4), sizes)

    def values(self) -> SearchStrategy[Json]:
        """Any JSON value, edge-biased; big ones are rare (they cost the api real work)."""
        return _weighted(
            (6, json_scalars()),
            (6, self.small()),
            (3, self.deep()),
            (1, self.wide()),
            (1, self.long_list()),
            (1, self.big_string()),
        )

    def objects(self) -> SearchStrategy[dict[str, Json]]:
        """A JSON object (what a Struct holds)."""
        return _weighted(
            (2, st.just({})),
            (6, st.dictionaries(json_keys(), self.values(), max_size=5)),
            (2, self.deep().map(lambda v: {"a": v})),
            (1, self.wide()),
        )

    def payloads(self) -> SearchStrategy[dict[str, Json]]:
        """Event payloads with the keys rules look at: half of them plain (so that events are
        stored, match and reach the executor), half with edge values in them."""
        plain = st.fixed_dictionaries(
            {"kind": st.sampled_from(("x", "y", "tick", "greet"))},
            optional={
                "a": self.small(plausible=True),
                "b": st.fixed_dictionaries({}, optional={"c": self.small(plausible=True)}),
                "n": st.integers(-5, 5),
            },
        )
        return _weighted((1, plain), (1, self.edge_payloads()))

    def edge_payloads(self) -> SearchStrategy[dict[str, Json]]:
        return (
            st.fixed_dictionaries(
                {},
                optional={
                    "a": self.values(),
                    "b": st.fixed_dictionaries({}, optional={"c": self.values()}) | self.values(),
                    "kind": st.sampled_from(("x", "y", "tick", "greet")) | json_scalars(),
                    "n": st.integers(-5, 5) | floats(),
                },
            )
            | self.objects()
        )

    def action_params(self) -> SearchStrategy[dict[str, Json]]:
        return st.dictionaries(
            json_keys(plausible=True) | json_keys(),
            st.sampled_from(TEMPLATES) | self.values(),
            max_size=6,
        ) | st.builds(lambda t: {f"p{i}": t for i in range(limits.MAX_TEMPLATES + 1)}, st.sampled_from(TEMPLATES))


# --- the descriptor walker -------------------------------------------------------------------
Override = SearchStrategy[Any] | Callable[[SearchStrategy[Any]], SearchStrategy[Any]]

_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"
_LIST_VALUE = "google.protobuf.ListValue"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_FIELD_MASK = "google.protobuf.FieldMask"
_EMPTY = "google.protobuf.Empty"

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
}
_UINT_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}
_INT32_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_SIZE_FIELDS = {"page_size", "max_in_flight", "exhausted_limit", "attempts", "in_flight", "code"}
_TEXT_LIMITS = {
    "label": limits.MAX_LABEL,
    "description": limits.MAX_DESCRIPTION,
    "reason": limits.MAX_REASON,
    "error": limits.MAX_REASON,
    "request_id": limits.MAX_REQUEST_ID,
    "executor_id": limits.MAX_EXECUTOR_ID,
    "changed_field": limits.MAX_FILTER_TEXT,
    "operation": limits.MAX_FILTER_TEXT,
}


class Walker:
    """Strategies for messages, from their descriptors (hypothesis-protobuf's design).

    ``plausible`` walkers send what a client would; edge walkers anything. ``overrides`` maps
    a field's full name to a strategy or to a function of the strategy it would get.
    """

    def __init__(
        self,
        pool: Pool,
        json: JsonValues,
        *,
        plausible: bool,
        overrides: Mapping[str, Override] | None = None,
    ) -> None:
        self.pool = pool
        self.json = json
        self.plausible = plausible
        self.overrides = dict(overrides or {})
        self._messages: dict[tuple[str, int], SearchStrategy[Fill]] = {}

    # -- messages
    def message(self, descriptor: Descriptor, depth: int = 0) -> SearchStrategy[Fill]:
        """Fills of a message of type ``descriptor`` (see ``Fill``)."""
        special = self._well_known(descriptor)
        if special is not None:
            return special
        key = (descriptor.full_name, min(depth, 8))
        if key not in self._messages:
            # Deferred: a message type may (indirectly) contain itself.
            self._messages[key] = st.deferred(lambda: self._build(descriptor, depth))
        return self._messages[key]

    def _build(self, descriptor: Descriptor, depth: int) -> SearchStrategy[Fill]:
        if depth >= 8:
            return st.just(lambda target: None)
        plain = [(f, self.field(f, depth)) for f in descriptor.fields if f.containing_oneof is None]
        oneofs = [[(f, self.field(f, depth)) for f in o.fields] for o in descriptor.oneofs]
        # Edge walkers leave fields unset more often: "unset" is an edge of its own.
        present = 6 if self.plausible else 5

        @st.composite
        def fields(draw: st.DrawFn) -> Fill:
            chosen: list[tuple[FieldDescriptor, Any]] = []
            for f, strategy in plain:
                if draw(st.integers(0, 9)) < present:
                    chosen.append((f, draw(strategy)))
            for members in oneofs:
                i = draw(st.integers(-1, len(members) - 1))
                if i >= 0:
                    f, strategy = members[i]
                    chosen.append((f, draw(strategy)))

            def fill(target: Message) -> None:
                for f, value in chosen:
                    assign(target, f, value)

            return fill

        return fields()

    def _well_known(self, d: Descriptor) -> SearchStrategy[Fill] | None:
        name = d.full_name
        if name == _STRUCT:
            objects = self.json.small(plausible=True) if self.plausible else self.json.objects()
            return objects.filter(lambda v: isinstance(v, dict)).map(fill_struct)
        if name == _VALUE:
            values = self.json.small(plausible=True) if self.plausible else self.json.values()
            return values.map(fill_value)
        if name == _LIST_VALUE:
            items = st.lists(self.json.small(self.plausible), max_size=5)
            return items.map(lambda values: lambda target: target.extend(values))
        if name == _TIMESTAMP:
            return self.timestamps().map(fill_copy)
        if name == _DURATION:
            return st.builds(
                duration_pb2.Duration,
                seconds=st.sampled_from(TS_SECONDS) | st.integers(-(10**6), 10**6),
                nanos=st.sampled_from(NANOS),
            ).map(fill_copy)
        if name == _FIELD_MASK:
            paths = st.sampled_from(UPDATABLE_GUESSES[:7] if self.plausible else UPDATABLE_GUESSES)
            return st.lists(paths, max_size=4).map(lambda p: fill_copy(field_mask_pb2.FieldMask(paths=p)))
        if name == _EMPTY:
            return st.just(fill_copy(empty_pb2.Empty()))
        return None

    def timestamps(self) -> SearchStrategy[timestamp_pb2.Timestamp]:
        now = int(time.time())
        recent = st.integers(now - 3 * 86400, now + 3600)
        if self.plausible:
            return st.builds(timestamp_pb2.Timestamp, seconds=recent, nanos=st.integers(0, 999_999_999))
        return st.builds(
            timestamp_pb2.Timestamp,
            seconds=recent | st.sampled_from(TS_SECONDS) | st.integers(INT64_MIN, INT64_MAX),
            nanos=st.integers(0, 999_999_999) | st.sampled_from(NANOS),
        )

    # -- fields
    def field(self, f: FieldDescriptor, depth: int = 0) -> SearchStrategy[Any]:
        base = self._field(f, depth)
        override = self.overrides.get(f.full_name)
        if override is None:
            return base
        if isinstance(override, SearchStrategy):
            return override
        return override(base)

    def _field(self, f: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
        if is_map(f):
            entry = message_type(f)
            key_f, value_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
            return st.dictionaries(self.single(key_f, depth + 1), self.single(value_f, depth + 1), max_size=4)
        element = self.single(f, depth + 1)
        if not f.is_repeated:
            return element
        return self.repeated(element, f)

    def repeated(self, element: SearchStrategy[T], f: FieldDescriptor) -> SearchStrategy[list[T]]:
        if self.plausible:
            return st.lists(element, max_size=3)
        # Long lists are a few drawn elements cycled to the length: 1,500 drawn messages would
        # exhaust hypothesis's budget for one example.
        long = st.builds(
            lambda items, n: cycle(items, n, f),
            st.lists(element, min_size=1, max_size=3),
            st.sampled_from(COUNTS) | st.integers(0, 1500),
        )
        if f.type in _INT64_TYPES:
            # Distinct ids in a row (a batch of decisions), around a drawn start.
            long = long | st.builds(
                lambda start, n: list(range(start, start + n)),
                st.integers(-3, 400),
                st.sampled_from(COUNTS) | st.integers(0, 1500),
            )
        return _weighted((5, st.lists(element, max_size=4)), (1, long))

    def single(self, f: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
        t = f.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.message(message_type(f), depth)
        if t == FieldDescriptor.TYPE_ENUM:
            return self.enum(enum_type(f))
        if t == FieldDescriptor.TYPE_STRING:
            return self.string(f.name)
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=8 if self.plausible else 64)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(-1e6, 1e6) if self.plausible else floats()
        if t in _INT64_TYPES:
            return self.int64(f)
        if t in _INT32_TYPES:
            return self.int32(f.name)
        if t in _UINT_TYPES:
            bits = 64 if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64) else 32
            return st.sampled_from((0, 1, 2**bits - 1)) | st.integers(0, 2**bits - 1)
        raise TypeError(f"unhandled field type {t} of {f.full_name}")

    def enum(self, e: EnumDescriptor) -> SearchStrategy[int]:
        known = [v.number for v in e.values]
        if self.plausible:
            return st.sampled_from([n for n in known if n] or known)
        # proto3 enums are open: any int32 goes over the wire and must be refused cleanly.
        unknown = (-1, max(known) + 1, 99, INT32_MAX, INT32_MIN)
        return _weighted((4, st.sampled_from(known)), (1, st.sampled_from(unknown)), (1, st.integers(-10, 100)))

    # -- meaning by name
    def string(self, name: str) -> SearchStrategy[str]:
        if name == "page_token" or name.endswith("_token"):
            return self.tokens()
        if name == "source_ref":
            return self._text_around(limits.MAX_SOURCE_REF, ("sensor.a", "fz.sensor"))
        if name == "ref" or name.endswith(("_ref", "_refs")):
            return self.refs(ref_kind(name))
        if name == "request_id":
            return self.request_ids()
        if name == "executor_id":
            return self.executor_ids()
        if name == "entity_type":
            return st.sampled_from(("execution", "worker")) | (
                st.nothing() if self.plausible else st.sampled_from(("", "event", "EXECUTION", "execution\n")) | texts()
            )
        if name == "operation":
            return st.sampled_from(("INSERT", "UPDATE", "DELETE")) | (
                st.nothing() if self.plausible else st.sampled_from(("insert", "TRUNCATE", "")) | texts()
            )
        if name == "field":
            return st.sampled_from(FIELD_PATHS[:5]) if self.plausible else st.sampled_from(FIELD_PATHS) | texts()
        if name in _TEXT_LIMITS:
            return self._text_around(_TEXT_LIMITS[name], ("fuzz", "ok"))
        return texts(self.plausible)

    def _text_around(self, limit: int, plain: tuple[str, ...]) -> SearchStrategy[str]:
        if self.plausible:
            return st.sampled_from(plain) | texts(plausible=True)
        sizes = st.sampled_from((limit - 1, limit, limit + 1, 5000))
        return _weighted((3, texts()), (1, st.builds(_repeat, st.sampled_from(("x", "é", "😀", "\x00")), sizes)))

    def refs(self, kind: str = "any") -> SearchStrategy[str]:
        """References: seen ones, the fuzzer's own, fresh valid ones, and near misses."""
        fuzz = {
            "trigger": FUZZ_TRIGGERS,
            "rule": FUZZ_RULES,
            "action": FUZZ_ACTIONS[:2],
            "pack": ("fz", "core", "ordinary"),
        }.get(kind, FUZZ_TRIGGERS + FUZZ_RULES)
        known = st.builds(lambda i, d: self.pool.ref(kind, i) or d, st.integers(0, 2**16), st.sampled_from(fuzz))
        fresh = st.builds(
            lambda p, n: f"{p}.{n}",
            st.text("abcxyz019_-", min_size=1, max_size=8),
            st.text("abcxyz019_-.", min_size=1, max_size=12),
        )
        if self.plausible:
            return _weighted((4, known), (3, st.sampled_from(fuzz)), (1, fresh), (1, st.just("")))
        misses = st.builds(lambda r, i: near_misses(r)[i % 20], known | st.sampled_from(fuzz), st.integers(0, 19))
        return _weighted((3, known), (2, st.sampled_from(fuzz)), (1, fresh), (3, misses), (2, texts()))

    def ids(self, kind: str) -> SearchStrategy[int]:
        known = st.builds(lambda i, d: self.pool.id(kind, i) or d, st.integers(0, 2**16), st.integers(1, 50))
        if self.plausible:
            return _weighted((4, known), (1, st.integers(1, 500)))
        return _weighted(
            (4, known),
            (2, st.integers(1, 300)),
            (2, st.sampled_from(INT64_EDGES)),
            (1, st.integers(INT64_MIN, INT64_MAX)),
        )

    def int64(self, f: FieldDescriptor) -> SearchStrategy[int]:
        name = f.name
        kind = _ID_FIELD_KIND.get(name) or (id_kind_of(f.containing_type) if name == "id" else "")
        if kind or name.endswith(("_id", "_ids")) or name in ("source", "executor"):
            return self.ids(kind or "event")
        if self.plausible:
            return st.integers(0, 1000)
        return st.sampled_from(INT64_EDGES) | st.integers(INT64_MIN, INT64_MAX)

    def int32(self, name: str) -> SearchStrategy[int]:
        if self.plausible:
            return st.sampled_from((0, 1, 2, 10, 50)) if name in _SIZE_FIELDS else st.integers(0, 100)
        return _weighted((3, st.sampled_from(INT32_EDGES)), (1, st.integers(INT32_MIN, INT32_MAX)))

    def tokens(self) -> SearchStrategy[str]:
        """Page tokens seen in any list (fed to this one, whichever it is), and mutants."""
        seen = st.builds(lambda i: self.pool.token(i) or "", st.integers(0, 2**16))
        if self.plausible:
            return _weighted((3, seen), (2, st.just("")))
        return _weighted(
            (3, seen),
            (2, st.builds(_mutate_token, seen, st.integers(0, 9), st.integers(0, 2**16))),
            (
                1,
                st.builds(
                    lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="), st.binary(min_size=41, max_size=41)
                ),
            ),
            (1, st.sampled_from(("", "=", "AAAA", "%%%", "e30", "null", "x" * 512, "x" * 513, "\x00"))),
            (1, texts()),
        )

    def request_ids(self) -> SearchStrategy[str]:
        seen = st.builds(lambda i: self.pool.request_id(i) or "", st.integers(0, 2**16))
        fresh = st.builds(lambda n: f"fz-{n:x}", st.integers(0, 2**64))
        if self.plausible:
            return _weighted((2, fresh), (1, seen), (2, st.just("")))
        return _weighted((2, fresh), (2, seen), (1, self._text_around(limits.MAX_REQUEST_ID, ("k",))))

    def executor_ids(self) -> SearchStrategy[str]:
        seen = st.builds(lambda i: self.pool.executor(i) or "fz-watch", st.integers(0, 2**16))
        mine = st.builds(lambda n: f"fz-watch-{n}", st.integers(0, 7))
        if self.plausible:
            return mine
        return _weighted((3, mine), (1, seen), (1, self._text_around(limits.MAX_EXECUTOR_ID, ("fz",))))


def _mutate_token(token: str, how: int, at: int) -> str:
    """A page token altered the way clients and proxies alter them."""
    if not token:
        return token
    i = at % len(token)
    flipped = chr(ord(token[i]) ^ 1) if token[i].isascii() else "A"
    return (
        token[:-1],
        token + "A",
        token + "=",
        token[:i] + flipped + token[i + 1 :],
        token.upper(),
        token * 2,
        token + "\n",
        token.replace("-", "+").replace("_", "/"),
        token[:i],
        token + "=" * 600,
    )[how % 10]


REQUEST_BUDGET = limits.MAX_MESSAGE_BYTES + 2 * MiB
"""Roughly the most a cycled list may add to a request: past the message size limit (the api
must refuse it), but a thousand copies of a 4 MiB payload would be 4 GiB in this process."""


MAX_REQUEST_BYTES = 2 * limits.MAX_MESSAGE_BYTES + MiB
"""Requests bigger than this are not sent: twice past the limit shows all there is to see."""


def _encoded_size(f: FieldDescriptor, item: Any) -> int:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        scratch = message_class(message_type(f))()
        item(scratch)
        return scratch.ByteSize() + 6
    if isinstance(item, str):
        return len(item.encode()) + 6
    if isinstance(item, bytes):
        return len(item) + 6
    return 10


def cycle(items: list[T], n: int, f: FieldDescriptor) -> list[T]:
    """``items`` repeated to ``n`` elements, fewer if that would exceed ``REQUEST_BUDGET``."""
    biggest = max(_encoded_size(f, item) for item in items)
    n = min(n, max(1, REQUEST_BUDGET // biggest))
    return [items[i % len(items)] for i in range(n)]


def assign(msg: Message, f: FieldDescriptor, value: Any) -> None:
    """Sets ``f`` of ``msg`` to a drawn value: scalars and lists of them as they are, message
    fields (and lists and maps of them) through their fills, in place."""
    target = getattr(msg, f.name)
    if is_map(f):
        value_f = message_type(f).fields_by_name["value"]
        for k, v in value.items():
            if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                v(target[k])
            else:
                target[k] = v
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.is_repeated:
            for fill in value:
                fill(target.add())
        else:
            target.SetInParent()  # chosen means present, even when empty
            value(target)
    elif f.is_repeated:
        target.extend(value)
    else:
        setattr(msg, f.name, value)


# --- scenarios: valid requests on purpose ----------------------------------------------------
Scenario = Callable[["Strategies"], SearchStrategy[Message]]


def _scenario_trigger(s: Strategies) -> SearchStrategy[Message]:
    def make(ref: str, label: str, schema: dict[str, Json] | None, out: Fill | None, mode: int) -> Message:
        request = rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref, label=label))
        if schema is not None:
            request.trigger.param_schema.update(schema)
        if out is not None:
            out(request.trigger.out_schema)
        request.trigger.schema_mode = rule_pb2.SchemaMode.ValueType(mode)
        return request

    return st.builds(
        make,
        st.sampled_from(FUZZ_TRIGGERS),
        st.sampled_from(("", "Fuzz trigger")) | texts(),
        st.none() | s.json.small(plausible=True).filter(lambda v: isinstance(v, dict)),
        _weighted((2, st.none()), (3, out_schemas())),
        schema_modes(),
    )


# --- trigger schemas: plausible and hostile ----------------------------------------------------
def _chain(n: int, twice: bool) -> dict[str, Json]:
    """$defs each referring to the one before (twice: the inlined size doubles per link)."""
    defs: dict[str, Json] = {"d0": {"type": "string", "pattern": "^a+$"}}
    for i in range(1, n + 1):
        ref = {"$ref": f"#/$defs/d{i - 1}"}
        defs[f"d{i}"] = {"allOf": [ref, ref]} if twice else ref
    return {"$defs": defs, "$ref": f"#/$defs/d{n}"}


def _deep_schema(depth: int, through: str) -> dict[str, Json]:
    """A schema ``depth`` subschemas deep, through properties, items or allOf."""
    node: dict[str, Json] = {"type": "string"}
    for _ in range(depth):
        if through == "properties":
            node = {"type": "object", "properties": {"a": node}}
        elif through == "items":
            node = {"type": "array", "items": node}
        else:
            node = {"allOf": [node]}
    return node


_PATTERNS = (
    "(a+)+$",  # catastrophic for a backtracking engine, linear here
    "^(a|a)*$",
    "(x+x+)+y",
    "a{1000}{1000}",  # a compiled size far over the bound
    "(?:a{1,1000}){1,1000}",
    "(a)\\1",  # a backreference: no linear engine has one
    "(?<=a)b",  # lookbehind, likewise
    "[",
    "\\p{L}+",
    "",
)
PLAUSIBLE_SCHEMA: dict[str, Json] = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["x", "y", "tick", "greet"]},
        "n": {"type": "integer"},
        "b": {"type": "object", "properties": {"c": {}}},
        "secret": {"type": "string", "x-secret": True},
    },
}
"""What the plain payloads of ``JsonValues.payloads`` conform to, so events keep flowing."""


def hostile_schemas() -> SearchStrategy[dict[str, Json]]:
    """out_schemas that must be refused, or accepted, in bounded time: deep nesting, huge and
    backtracking patterns, $ref cycles and chains that expand past the subschema bound,
    remote and dynamic references, unknown drafts, wrong keyword shapes."""
    fixed: list[dict[str, Json]] = [
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"$anchor": "x", "properties": {"p": {"$ref": "#x"}}}}, "$ref": "#x"},
        {"properties": {"p": {"$ref": "#/properties/p"}}},
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "other.json#/a"},
        {"$ref": "#/$defs/missing"},
        {"$dynamicRef": "#meta"},
        {"$defs": {"a": {"$id": "https://example.com/a", "type": "string"}}},
        {"$schema": "http://json-schema.org/draft-03/schema#"},
        {"$schema": 5},
        {"type": 5},
        {"type": "objekt"},
        {"properties": []},
        {"required": "a"},
        {"enum": []},
        {"x-secret": "yes"},
        {"properties": {"a": {"x-secret": True, "type": "object", "properties": {"b": {"x-secret": True}}}}},
        {"format": "email", "type": "string"},
        {"properties": {f"p{i}": {"type": "string"} for i in range(2500)}},
        {"patternProperties": {p: {} for p in _PATTERNS[:3]}, "additionalProperties": False},
    ]
    return _weighted(
        (3, st.sampled_from(fixed)),
        (2, st.sampled_from(_PATTERNS).map(lambda p: {"type": "string", "pattern": p})),
        (1, st.sampled_from(_PATTERNS).map(lambda p: {"patternProperties": {p: {"type": "integer"}}})),
        (1, st.builds(lambda n, p: {"type": "string", "pattern": p * n}, st.integers(1, 4000), st.sampled_from("a("))),
        (
            2,
            st.builds(
                _deep_schema, st.sampled_from((8, 15, 16, 17, 40)), st.sampled_from(("properties", "items", "allOf"))
            ),
        ),
        (2, st.builds(_chain, st.sampled_from((3, 10, 11, 12, 20, 40)), st.booleans())),
    )


def out_schemas() -> SearchStrategy[Fill]:
    """Fills of an out_schema Struct: plausible ones (so enforcement runs on real events) and
    hostile ones. Deep ones are filled in place (see ``Fill``)."""
    plausible = st.sampled_from(
        (
            PLAUSIBLE_SCHEMA,
            {**PLAUSIBLE_SCHEMA, "additionalProperties": False},
            {**PLAUSIBLE_SCHEMA, "$schema": "http://json-schema.org/draft-07/schema#"},
            {"type": "object", "required": ["kind"]},
            {},
        )
    )
    return _weighted((2, plausible), (3, hostile_schemas())).map(fill_struct)


def schema_modes() -> SearchStrategy[int]:
    """Mostly modes that let events through (warn, off), some enforce, some unknown numbers."""
    return _weighted(
        (3, st.just(rule_pb2.SCHEMA_MODE_WARN)),
        (2, st.just(rule_pb2.SCHEMA_MODE_OFF)),
        (2, st.just(rule_pb2.SCHEMA_MODE_UNSPECIFIED)),
        (1, st.just(rule_pb2.SCHEMA_MODE_ENFORCE)),
        (1, st.sampled_from((4, -1, INT32_MAX))),
    )


def _scenario_update_trigger(s: Strategies) -> SearchStrategy[Message]:
    def make(key: str | int, paths: list[str], out: Fill | None, mode: int) -> Message:
        request = rule_pb2.UpdateTriggerRequest(update_mask=field_mask_pb2.FieldMask(paths=paths))
        if isinstance(key, str):
            request.trigger.ref = key
        else:
            request.trigger.id = key
        if out is not None:
            out(request.trigger.out_schema)
        request.trigger.schema_mode = rule_pb2.SchemaMode.ValueType(mode)
        return request

    paths = st.lists(
        st.sampled_from(("out_schema", "schema_mode", "param_schema", "label")), min_size=1, max_size=3, unique=True
    )
    return st.builds(
        make,
        st.sampled_from(FUZZ_TRIGGERS) | s.plausible.ids("trigger"),
        paths,
        _weighted((1, st.none()), (4, out_schemas())),
        schema_modes(),
    )


def _scenario_check_schema(s: Strategies) -> SearchStrategy[Message]:
    def make(key: str | int, out: Fill | None, limit: int) -> Message:
        request = rule_pb2.CheckSchemaRequest(limit=limit)
        if isinstance(key, str):
            request.trigger_ref = key
        else:
            request.trigger_id = key
        if out is not None:
            out(request.out_schema)
        return request

    return st.builds(
        make,
        st.sampled_from(FUZZ_TRIGGERS) | s.plausible.ids("trigger"),
        _weighted((1, st.none()), (4, out_schemas())),
        st.sampled_from((0, 1, 10, limits.MAX_SCHEMA_CHECK, limits.MAX_SCHEMA_CHECK + 1, -1, INT32_MAX)),
    )


# --- CloudEvents (EventService.Publish / PublishBatch) -----------------------------------------
def _cloudevent(s: Strategies) -> SearchStrategy[Fill]:
    """CloudEvents a producer sends: mostly well-formed (type a fuzz trigger, JSON data), with
    edge ids, sources, attributes and data (not JSON, a wrong content type, proto data, too
    large) mixed in."""
    attribute = cloudevents_pb2.CloudEvent.CloudEventAttributeValue

    def make(type_: str, source: str, id_: str, spec: str, data: tuple[str, Json], attrs: dict[str, Json]) -> Fill:
        def fill(ce: cloudevents_pb2.CloudEvent) -> None:
            ce.type, ce.source, ce.id, ce.spec_version = type_, source, id_, spec
            kind, value = data
            if kind == "text":
                ce.text_data = value
            elif kind == "binary":
                ce.binary_data = value
            elif kind == "proto":
                ce.proto_data.Pack(timestamp_pb2.Timestamp(seconds=1))
            for name, v in attrs.items():
                if isinstance(v, bool):
                    ce.attributes[name].CopyFrom(attribute(ce_boolean=v))
                elif isinstance(v, int):
                    ce.attributes[name].CopyFrom(attribute(ce_integer=v))
                elif isinstance(v, bytes):
                    ce.attributes[name].CopyFrom(attribute(ce_bytes=v))
                elif v is None:
                    ce.attributes[name].CopyFrom(attribute())
                else:
                    ce.attributes[name].CopyFrom(attribute(ce_string=str(v)))

        return fill

    json_data = s.json.payloads().map(lambda p: ("text", _dumps(p)))
    data = _weighted(
        (5, json_data),
        (2, s.json.payloads().map(lambda p: ("binary", _dumps(p).encode()))),
        (1, st.just(("none", None))),
        (
            1,
            st.sampled_from(("[1, 2]", "not json", '{"a": NaN}', '{"a": 1', "\x00", '"text"')).map(
                lambda t: ("text", t)
            ),
        ),
        (1, st.binary(max_size=64).map(lambda b: ("binary", b))),
        (1, st.just(("proto", None))),
        (
            1,
            st.builds(
                lambda n: ("text", '{"a": "' + "x" * n + '"}'), st.sampled_from((limits.MAX_PAYLOAD_BYTES, 4 * MiB))
            ),
        ),
    )
    attrs = st.dictionaries(
        st.sampled_from(("datacontenttype", "subject", "time", "dataschema", "traceparent", "x-y", "Upper", "")),
        st.sampled_from(("application/json", "text/plain", "application/cloudevents+json", "2026-01-01T00:00:00Z"))
        | st.booleans()
        | st.integers(INT32_MIN, INT32_MAX)
        | st.binary(max_size=16)
        | st.none()
        | texts(),
        max_size=4,
    )
    return st.builds(
        make,
        _weighted((5, st.sampled_from(FUZZ_TRIGGERS)), (1, s.edge.string("type")), (1, st.just(""))),
        _weighted((4, st.sampled_from(("fz.sensor", "//fuzz/source", "https://example.com/x"))), (1, texts())),
        _weighted((4, st.integers(0, 50).map(str)), (1, texts()), (1, st.just(""))),
        _weighted((6, st.just("1.0")), (1, st.sampled_from(("0.3", "", "1.0\x00")))),
        data,
        _weighted((2, st.just({})), (2, st.just({"datacontenttype": "application/json"})), (1, attrs)),
    )


def _dumps(value: Json) -> str:
    # NaN and Infinity written as JavaScript would: the api must refuse them, not choke.
    return json.dumps(value, allow_nan=True)


def _scenario_publish(s: Strategies) -> SearchStrategy[Message]:
    return _cloudevent(s).map(lambda fill: build(cloudevents_pb2.CloudEvent, fill))


def _scenario_publish_batch(s: Strategies) -> SearchStrategy[Message]:
    events = cloudevents_pb2.CloudEventBatch.DESCRIPTOR.fields_by_name["events"]
    many = st.builds(
        lambda items, n: cycle(items, n, events),
        st.lists(_cloudevent(s), min_size=1, max_size=3),
        st.sampled_from((limits.MAX_BATCH, limits.MAX_BATCH + 1)),
    )

    def make(fills: list[Fill]) -> Message:
        request = cloudevents_pb2.CloudEventBatch()
        for fill in fills:
            fill(request.events.add())
        return request

    return _weighted((4, st.lists(_cloudevent(s), max_size=8)), (1, many)).map(make)


def _condition(s: Strategies) -> SearchStrategy[Fill]:
    def make(field: str, op: int, value: Json) -> Fill:
        def fill(target: condition_pb2.RuleCondition) -> None:
            target.field = field
            target.operator = condition_pb2.ConditionOperator.ValueType(op)
            set_value(target.value, value)

        return fill

    return st.builds(
        make,
        st.sampled_from(FIELD_PATHS[:5]),
        # Every operator, with values that suit some of them (regexes, wildcards, timestamps).
        st.sampled_from(sorted(condition_pb2.ConditionOperator.values())),
        st.sampled_from(("x", "y", "tick", "greet", 1, True, "(a+)+$", "t*[!x]?", "2026-01-01T00:00:00Z", "any"))
        | s.json.values(),
    )


def _rule(s: Strategies) -> SearchStrategy[Fill]:
    """Rules on the fuzzer's triggers, with conditions on the payload keys events carry and
    action parameters that template payload values into the rendered config."""

    def make(ref: str, trigger: str, action: str, params: dict[str, Json], conds: list[Fill], mode: int) -> Fill:
        def fill(rule: rule_pb2.Rule) -> None:
            rule.ref, rule.trigger_ref, rule.action_ref = ref, trigger, action
            rule.condition = common_pb2.EnforcementCondition.ValueType(mode)
            rule.action_params.update(params)
            for c in conds:
                c(rule.conditions.add())

        return fill

    plain_params = st.just({"x": "{{ event.payload.a }}", "y": "{{ event.payload.b.c }}", "id": "{{ event.id }}"})
    return st.builds(
        make,
        st.sampled_from(FUZZ_RULES),
        st.sampled_from(FUZZ_TRIGGERS),
        st.sampled_from(FUZZ_ACTIONS),
        plain_params | s.json.action_params(),
        _weighted(
            (3, st.just([])), (3, st.lists(_condition(s), max_size=3)), (1, st.lists(_condition(s), max_size=70))
        ),
        st.sampled_from((0, 1, 2)),
    )


def _scenario_rule(s: Strategies) -> SearchStrategy[Message]:
    return _rule(s).map(lambda fill: build(rule_pb2.CreateRuleRequest, lambda r: fill(r.rule)))


def _new_event(s: Strategies) -> SearchStrategy[Fill]:
    def make(trigger: str, payload: dict[str, Json], source_ref: str, rule_ref: str, request_id: str) -> Fill:
        def fill(event: event_pb2.NewEvent) -> None:
            event.trigger_ref, event.source_ref, event.rule_ref = trigger, source_ref, rule_ref
            event.request_id = request_id
            event.payload.update(payload)

        return fill

    return st.builds(
        make,
        _weighted((4, st.sampled_from(FUZZ_TRIGGERS)), (1, s.plausible.refs("trigger"))),
        s.json.payloads(),
        _weighted((4, st.just("")), (2, st.just("fz.sensor")), (1, s.edge.string("source_ref"))),
        _weighted((5, st.just("")), (1, s.plausible.refs("rule"))),
        _weighted((4, st.just("")), (2, s.edge.request_ids())),
    )


def _scenario_event(s: Strategies) -> SearchStrategy[Message]:
    return _new_event(s).map(lambda fill: build(event_pb2.CreateEventRequest, lambda r: fill(r.event)))


def _scenario_events(s: Strategies) -> SearchStrategy[Message]:
    events = event_pb2.CreateEventsRequest.DESCRIPTOR.fields_by_name["events"]
    many = st.builds(
        lambda items, n: cycle(items, n, events),
        st.lists(_new_event(s), min_size=1, max_size=3),
        st.sampled_from((limits.MAX_BATCH, limits.MAX_BATCH + 1)),
    )

    def make(fills: list[Fill]) -> Message:
        request = event_pb2.CreateEventsRequest()
        for fill in fills:
            fill(request.events.add())
        return request

    return _weighted((4, st.lists(_new_event(s), min_size=1, max_size=8)), (1, many)).map(make)


def _scenario_enforcement(s: Strategies) -> SearchStrategy[Message]:
    def make(
        rule: str, event: int | None, payload: dict[str, Json], config: dict[str, Json] | None, key: str
    ) -> Message:
        request = enforcement_pb2.CreateEnforcementRequest(rule_ref=rule, request_id=key)
        if event is not None:
            request.event = event
        request.payload.update(payload)
        if config is not None:
            request.config.SetInParent()
            request.config.update(config)
        return request

    return st.builds(
        make,
        _weighted((4, st.sampled_from(FUZZ_RULES)), (1, s.plausible.refs("rule"))),
        st.none() | s.plausible.ids("event"),
        s.json.payloads(),
        st.none() | s.json.objects(),
        _weighted((3, st.just("")), (1, s.edge.request_ids())),
    )


def _scenario_update_rule(s: Strategies) -> SearchStrategy[Message]:
    def make(key: str | int, paths: list[str], enabled: bool, fill: Fill) -> Message:
        request = rule_pb2.UpdateRuleRequest(update_mask=field_mask_pb2.FieldMask(paths=paths))
        fill(request.rule)
        request.rule.ClearField("trigger_ref")
        request.rule.ClearField("ref")
        if isinstance(key, str):
            request.rule.ref = key
        else:
            request.rule.id = key
        request.rule.enabled = enabled
        return request

    return st.builds(
        make,
        st.sampled_from(FUZZ_RULES) | s.plausible.ids("rule"),
        st.lists(st.sampled_from(UPDATABLE_GUESSES[:7]), min_size=1, max_size=4, unique=True),
        st.booleans(),
        _rule(s),
    )


SCENARIOS: dict[str, Scenario] = {
    # Keyed by method name. Only write paths need them: reads are valid often enough from the
    # plausible walker. A method without a scenario is still fuzzed (walkers and raw bytes).
    "CreateTrigger": _scenario_trigger,
    "CreateRule": _scenario_rule,
    "CreateEvent": _scenario_event,
    "CreateEvents": _scenario_events,
    "CreateEnforcement": _scenario_enforcement,
    "UpdateRule": _scenario_update_rule,
    "UpdateTrigger": _scenario_update_trigger,
    "CheckSchema": _scenario_check_schema,
    "Publish": _scenario_publish,
    "PublishBatch": _scenario_publish_batch,
}


# --- planned calls ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Call:
    """One call the fuzzer makes: the method, the request bytes, and how they were made."""

    method: Method
    payload: bytes
    origin: str
    """``scenario``, ``plausible``, ``edge``, or ``raw:<how>``."""
    message: Message | None = None
    """The request, unless it is raw bytes."""


def _corrupt(how: int, data: bytes, noise: bytes, at: int) -> tuple[str, bytes]:
    """Raw bytes a broken client (or a hostile one) would send, from a valid encoding."""
    cut = at % (len(data) + 1) if data else 0
    options: tuple[tuple[str, bytes], ...] = (
        ("raw:random", noise),
        ("raw:truncated", data[: max(cut, 1) - 1] if data else noise),
        (
            "raw:bitflip",
            data[:cut] + bytes([(data[cut] ^ (1 << (at % 8)))]) + data[cut + 1 :] if cut < len(data) else noise,
        ),
        ("raw:appended", data + noise),
        ("raw:overlong-length", b"\x0a\xff\xff\xff\xff\x0f" + noise),
        ("raw:deep-groups", b"\x0b" * 200 + noise),
        ("raw:wrong-wire-type", b"\x0d\x00\x00\x00\x00" + data),
        ("raw:unknown-field", data + b"\xf8\xff\xff\xff\x0f\x01"),
    )
    return options[how % len(options)]


class Strategies:
    """Every strategy of a run, sharing one pool of seen values."""

    def __init__(self, pool: Pool | None = None, *, huge: bool = True) -> None:
        self.pool = pool or Pool()
        self.json = JsonValues(huge=huge)
        overrides: dict[str, Override] = {
            # Payloads carry the keys the rules look at; action parameters carry templates.
            "automation.v1.NewEvent.payload": self.json.payloads().map(fill_struct),
            "automation.v1.CreateEnforcementRequest.payload": self.json.payloads().map(fill_struct),
            "automation.v1.Rule.action_params": self.json.action_params().map(fill_struct),
        }
        self.edge = Walker(self.pool, self.json, plausible=False, overrides=overrides)
        self.plausible = Walker(self.pool, self.json, plausible=True)
        self._requests: dict[str, SearchStrategy[Call]] = {}

    def request(self, method: Method) -> SearchStrategy[Call]:
        """A typed request for ``method``: scenario, plausible or edge."""
        if method.path in self._requests:
            return self._requests[method.path]
        d = method.descriptor

        def call(origin: str) -> Callable[[Message], Call]:
            return lambda msg: Call(method, msg.SerializeToString(), origin, msg)

        def filled(origin: str) -> Callable[[Fill], Call]:
            return lambda fill: call(origin)(build(method.request, fill))

        options: list[tuple[int, SearchStrategy[Call]]] = [
            (3, self.plausible.message(d).map(filled("plausible"))),
            (4, self.edge.message(d).map(filled("edge"))),
        ]
        scenario = SCENARIOS.get(method.name)
        if scenario is not None:
            options.append((5, scenario(self).map(call("scenario"))))
        # Several big values can land in one request; past the cap they only cost time.
        strategy = _weighted(*options).filter(lambda c: len(c.payload) <= MAX_REQUEST_BYTES)
        self._requests[method.path] = strategy
        return strategy

    def raw(self, method: Method) -> SearchStrategy[Call]:
        """Corrupt bytes for ``method``, sent without a serializer."""

        def make(fill: Fill, how: int, noise: bytes, at: int) -> Call:
            origin, data = _corrupt(how, build(method.request, fill).SerializeToString(), noise, at)
            return Call(method, data, origin)

        return st.builds(
            make,
            self.plausible.message(method.descriptor),
            st.integers(0, 7),
            st.binary(max_size=300),
            st.integers(0, 2**16),
        )

    def call(self, method: Method) -> SearchStrategy[Call]:
        return _weighted((9, self.request(method)), (1, self.raw(method)))

    def calls(self, methods: Iterable[Method]) -> SearchStrategy[Call]:
        """A call of any of ``methods`` (uniformly), typed or raw."""
        table = [self.call(m) for m in methods]
        return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])

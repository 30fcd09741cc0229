"""Typed rows of the data-access layer. Field order matches the SELECT lists of the queries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")

JSON = Any


def columns(cls: type, prefix: str = "", as_text: tuple[str, ...] = ()) -> str:
    """The column list of a row type, for SELECTs built from constants; the columns named in
    ``as_text`` (JSON ones) come as their text, under their own names."""
    names = getattr(cls, "_fields", None) or [f.name for f in fields(cls)]  # a named tuple's, or a dataclass's
    return ", ".join(f"{prefix}{name}::text AS {name}" if name in as_text else f"{prefix}{name}" for name in names)


@dataclass(frozen=True, slots=True)
class Trigger:
    id: int
    ref: str
    pack_ref: str
    label: str
    description: str
    param_schema: JSON | None
    out_schema: JSON | None
    created: datetime
    updated: datetime
    updated_by: str | None = None
    """The principal that created or last changed it through the api (None: not known)."""
    webhook_enabled: bool = False
    webhook_key: str = ""
    webhook_signed: bool = False
    """Whether it has a webhook secret (the secret itself is never read back)."""
    schema_mode: str = "off"
    """How events are checked against out_schema: 'off', 'warn' or 'enforce'."""
    schema_version: int = 1
    """Bumped by every change of out_schema or schema_mode."""


@dataclass(frozen=True, slots=True)
class Webhook:
    """What a delivery needs of its trigger."""

    trigger_id: int
    trigger_ref: str
    enabled: bool
    secret: str | None


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    ref: str
    pack_ref: str
    label: str
    description: str
    trigger: int | None
    trigger_ref: str
    action_ref: str | None
    action_params: dict[str, JSON]
    conditions: list[dict[str, JSON]]
    condition: str
    enabled: bool
    created: datetime
    updated: datetime
    updated_by: str | None = None
    """The principal that created or last changed it through the api (None: not known)."""
    backstop: bool = False
    """Fires only for events no standard rule of its trigger matched."""


# Events and enforcements are read by the hundred per list page and streamed by tails and
# watches, so they are named tuples: as immutable as the frozen dataclasses of the other rows,
# and built several times faster (a frozen dataclass sets each field through
# object.__setattr__). Change a copy with ``_replace``.


class Event(NamedTuple):
    id: int
    trigger: int | None
    trigger_ref: str
    config: dict[str, JSON] | None
    payload: dict[str, JSON]
    source: int | None
    source_ref: str | None
    rule: int | None
    rule_ref: str | None
    created: datetime
    reemit_of: int | None = None
    """The event this one re-emits (ReemitEvent)."""
    schema_version: int | None = None
    """The trigger's schema_version it was checked against (None: not checked)."""
    schema_errors: list[str] | None = None
    """Its first schema problems when stored in 'warn' mode without conforming (None: conforms)."""


class Enforcement(NamedTuple):
    id: int
    rule: int | None
    rule_ref: str
    trigger_ref: str
    config: dict[str, JSON] | None
    event: int | None
    status: str
    payload: dict[str, JSON]
    condition: str
    conditions: list[JSON]
    created: datetime
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class Execution:
    id: int
    action_ref: str
    config: dict[str, JSON]
    enforcement: int | None
    parent: int | None
    executor: int | None
    status: str
    result: JSON | None
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    id: int
    time: datetime
    operation: str
    entity_id: int
    entity_ref: str | None
    changed_fields: list[str]
    old_values: dict[str, JSON] | None
    new_values: dict[str, JSON] | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One change made through the api, as the audit trail keeps it."""

    id: int
    time: datetime
    principal: str
    rpc: str
    entity_type: str
    entity_id: int | None
    entity_ref: str | None
    change: dict[str, JSON]


# A 30-day volume answer is thousands of rows (720 hours x refs x statuses): named tuples with
# the bucket as whole seconds, which go straight into a Timestamp (no datetime per row).


class EventVolume(NamedTuple):
    bucket: int
    """The hour's start, in seconds since the Unix epoch."""
    trigger_ref: str
    event_count: int


class EnforcementVolume(NamedTuple):
    bucket: int
    """The hour's start, in seconds since the Unix epoch."""
    rule_ref: str
    status: str
    enforcement_count: int


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change through the api, and by which RPC: what its audit record names."""

    principal: str
    rpc: str
    """The full method name, such as ``automation.v1.RuleService/UpdateRule``."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to store, as validated by the api."""

    trigger_ref: str
    payload: dict[str, JSON]
    config: dict[str, JSON] | None = None
    source: int | None = None
    source_ref: str | None = None
    rule_ref: str | None = None
    request_id: str | None = None
    reemit_of: int | None = None
    config_in_fingerprint: bool = True
    """False for webhook deliveries: a sender's retry carries the same body but new headers."""
    traceparent: str | None = None
    """W3C traceparent of the call storing it (tracing on), stored with its enforcements."""


@dataclass(frozen=True, slots=True)
class CreatedEvent:
    """The result of storing one event: the event and the enforcements it produced."""

    event: Event
    enforcements: list[Enforcement]
    replayed: bool = False
    traceparent: str | None = None
    """The traceparent its enforcements were stored with (None for a replay)."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """A resolved enforcement and the execution it requested (None when disabled)."""

    enforcement: Enforcement
    execution: Execution | None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """An enforcement leased to one watch stream."""

    enforcement: Enforcement
    attempt: int
    lease_expires_at: datetime
    traceparent: str | None = None
    """W3C traceparent of the call that created the enforcement (None: not traced)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A watch stream that takes new enforcements as they are inserted (direct hand-off)."""

    executor_id: str
    token: str
    seconds: float
    principal: str | None = None
    """The authenticated principal of the stream: only it may resolve or release the lease."""


@dataclass(frozen=True, slots=True)
class ExhaustedEnforcement:
    id: int
    rule_ref: str
    attempts: int
    last_error: str | None
    created: datetime


@dataclass(frozen=True, slots=True)
class DispatchState:
    pending: int
    waiting: int
    oldest_pending_created: datetime | None
    now: datetime
    leases: list[tuple[str, int]]
    exhausted: list[ExhaustedEnforcement]
    exhausted_count: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list and the token of the next (empty at the end)."""

    items: list[T]
    next_token: str
    token_after: Callable[[T], str] | None = field(default=None, repr=False, compare=False)
    """The token of the page that continues after a given item, bound and signed as next_token
    is (set by the list that built the page)."""

    def cut(self, n: int) -> Page[T]:
        """The first ``n`` items, with the token of the page that continues right after them.

        For a caller that must stop a page short (the servicer, when the answer would exceed its
        byte budget): asked with that token, the list goes on from item ``n``.
        """
        if not 1 <= n < len(self.items):
            raise ValueError(f"a page of {len(self.items)} items cuts to 1 .. {len(self.items) - 1} items, not {n}")
        if self.token_after is None:
            raise ValueError("this page was not built by a list, so it cannot issue a token to cut it with")
        kept = self.items[:n]
        return Page(kept, self.token_after(kept[-1]), self.token_after)

"""What every servicer does with a request: the call's context type, checked filters, time
ranges, keys, the acting principal, and list pages cut to their byte budget.

Public on purpose: each service module imports these, and none imports another's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from services.api import convert, secrets, validate
from services.api._rpc import current_rpc
from services.api.auth import REVEAL, current_principal
from services.api.store import Actor, AuditRecord, Enforcement, Event, Execution, HistoryRecord, Page, Rule, Store
from shared import limits
from shared.errors import (
    InvalidArgument,
    PermissionDenied,
    Violations,
)
from shared.gen.automation.v1 import (
    common_pb2,
)

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
MAX_VOLUME_RANGE = timedelta(days=90)
M = TypeVar("M", bound=Message)
T = TypeVar("T")
R = TypeVar("R", Event, Enforcement)


_finishing: set[asyncio.Task[Any]] = set()


async def finish_anyway(write: Coroutine[Any, Any, T]) -> T:
    """Runs a write to its end even when the call that asked for it ends first (its deadline
    passed, the client went away); returns its result to a caller still there.

    Cancelling a statement in flight costs its connection (the pool discards an interrupted
    connection rather than wait on a cancel request that a half-open path would never carry),
    so on a slow link every expired deadline would otherwise mean a new connection, each slower
    to set up than the deadline: ingest collapses. Finished instead, the write commits or fails
    on its own (bounded by the statement timeout), the connection goes back to the pool, and
    the client's retry with the same key is answered from what committed.
    """
    task = asyncio.ensure_future(write)
    _finishing.add(task)
    task.add_done_callback(_finished)
    return await asyncio.shield(task)


def _finished(task: asyncio.Task[Any]) -> None:
    _finishing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Also retrieved by the caller when it was still waiting; logged for when it was not.
        log.debug("a write finished after its caller had gone: %r", task.exception())


def to_datetime(field: str, t: timestamp_pb2.Timestamp) -> datetime:
    try:
        return convert.from_ts(t)
    except ValueError as exc:  # seconds outside years 1..9999, or nanos outside [0, 1e9)
        raise InvalidArgument.one(field, str(exc)) from None


def time_range_of(field: str, r: common_pb2.TimeRange) -> tuple[datetime | None, datetime | None]:
    start = to_datetime(f"{field}.start", r.start) if r.HasField("start") else None
    end = to_datetime(f"{field}.end", r.end) if r.HasField("end") else None
    if start and end and start >= end:
        raise InvalidArgument.one(field, "start must be before end")
    return start, end


def status_filter(value: int, names: Mapping[Any, str]) -> str:
    """A status filter's stored name; '' for UNSPECIFIED (0, any status)."""
    if value == 0:
        return ""
    if value not in names:
        raise InvalidArgument.one("status", f"unknown status {value}")
    return names[value]


def key_of(request: Any, what: str) -> int | str:
    which = request.WhichOneof("key")
    if which == "id":
        return validate.id_or_raise("id", request.id)
    if which == "ref":
        return validate.ref_or_raise("ref", request.ref)
    raise InvalidArgument.one("key", f"give the {what}'s id or ref")


def actor_of_call() -> Actor:
    """Who makes a change, by which RPC: what its audit record names."""
    return Actor(current_principal().name, current_rpc())


def lease_holder() -> str | None:
    """Whose leases the caller may resolve: its own (and unleased work); an operator's, any."""
    principal = current_principal()
    return None if principal.is_operator else principal.name


def check_filters(
    request: Any, refs: tuple[str, ...] = (), texts: tuple[str, ...] = (), ids: tuple[str, ...] = ()
) -> None:
    """Checks a list request's filters: refs must be possible refs, text is bounded and has no
    NUL, optional ids are positive."""
    v = Violations()
    for name in refs:
        validate.filter_ref(v, name, getattr(request, name))
    for name in texts:
        validate.text(v, name, getattr(request, name), limits.MAX_FILTER_TEXT)
    for name in ids:
        if request.HasField(name):
            validate.positive_id(v, name, getattr(request, name))
    v.raise_if_any()


def page_of(page: Page[T], to_message: Callable[[T], M]) -> tuple[list[M], str]:
    """A page's messages, cut short (with a token to go on from there) before their encoded
    size would pass MAX_PAGE_BYTES, so that every default-configured client can receive it."""
    out: list[M] = []
    total = 0
    for item in page.items:
        message = to_message(item)
        total += message.ByteSize() + 8  # the repeated field's tag and length
        if total > limits.MAX_PAGE_BYTES and out:
            return out, page.cut(len(out)).next_token
        out.append(message)
    return out, page.next_token


def fill_page(response: Message, repeated: Any, page: Page[T], fill: Callable[[Any, T], None]) -> str:
    """Adds a page's messages to ``repeated``, a field of ``response`` (its only field set yet),
    cut as ``page_of`` cuts; returns the token to go on with.

    Filled in place, the messages are not copied into the response, and the size of the whole
    page is one call: their sizes plus 8 each can only pass the budget when that does."""
    add = repeated.add
    for item in page.items:
        fill(add(), item)
    n = len(repeated)
    if response.ByteSize() + 8 * n <= limits.MAX_PAGE_BYTES:
        return page.next_token
    total = 0
    for i, message in enumerate(repeated):
        total += message.ByteSize() + 8
        if total > limits.MAX_PAGE_BYTES and i:
            del repeated[i:]
            return page.cut(i).next_token
    return page.next_token


def volume_range(r: common_pb2.TimeRange, field: str = "range") -> tuple[datetime, datetime]:
    """A bounded range: end defaults to now, start to 24 hours before end; at most 90 days."""
    start, end = time_range_of(field, r)
    end = end or datetime.now(UTC)
    if start is None:
        try:
            start = end - timedelta(hours=24)
        except OverflowError:
            raise InvalidArgument.one(f"{field}.end", "is too early to default start to 24 hours before it") from None
    if start >= end:
        raise InvalidArgument.one(field, "start must be before end")
    if end - start > MAX_VOLUME_RANGE:
        raise InvalidArgument.one(field, "may cover at most 90 days")
    return start, end


VOLUME_BUCKET_HOURS = (1, 2, 3, 4, 6, 8, 12, 24)


def volume_width(hours: int, field: str = "bucket_hours") -> timedelta:
    """A volume bucket's width: 0 means an hour; others must divide a day, so that every
    bucket starts on a multiple of its width since the epoch and days stay whole."""
    if hours == 0:
        hours = 1
    if hours not in VOLUME_BUCKET_HOURS:
        allowed = ", ".join(str(h) for h in VOLUME_BUCKET_HOURS)
        raise InvalidArgument.one(field, f"must be 0 (an hour) or one of {allowed}, got {hours}")
    return timedelta(hours=hours)


def may_reveal(reveal: bool) -> bool:
    """Whether a read asked to show secret fields in clear; refuses the ask (PERMISSION_DENIED
    naming ``reveal``) from a principal without the ``reveal`` role. Check it before reading:
    a refused call reads nothing."""
    if reveal and not current_principal().may_reveal:
        raise PermissionDenied(f"reveal: showing secret fields in clear needs the {REVEAL!r} role")
    return reveal


@dataclass(frozen=True, slots=True)
class Revealed:
    """What a read that asked to reveal holds in clear: the ids to audit, as they are sent."""

    kind: str
    """The audit record's entity type: event, enforcement, execution or rule."""
    ids: frozenset[int] = frozenset()

    async def audit(self, store: Store, sent: Iterable[int]) -> None:
        """Audits the reveal of those of ``sent`` that held a secret: one record, written
        before the caller answers, so a reveal the audit trail cannot record is not made. A
        page cut at its byte budget audits only what it sends."""
        ids = list(dict.fromkeys(i for i in sent if i in self.ids))
        if ids:
            await store.audit.revealed(actor_of_call(), self.kind, ids)


async def shown_unaudited(store: Store, records: Sequence[R], *, reveal: bool = False) -> tuple[list[R], Revealed]:
    """Events or enforcements as a read sends them: the one place where their secret fields
    are masked, for every read path that returns payloads (Get, List, the tails, and whatever
    else sends stored payloads to a reader, such as a CloudEvents rendering of a tail). The
    caller audits what it sends with the ``Revealed`` (``shown`` does both, for a read that
    sends all it read).

    Without ``reveal`` (checked by ``may_reveal``), every value at a secret path of the schema
    version that masks the record (``store.schema_versions``, one lookup for all the records)
    is ``"***"``, and so is every rendered action parameter or schema problem that holds a
    secret's text (``secrets.mask_rendered``) and every condition value of an enforcement's
    snapshot whose field is secret (``secrets.mask_conditions``). With it, the records go as
    stored.

    The executor's WatchEnforcements does not come here: executors act on the clear values."""
    kind = "event" if records and isinstance(records[0], Event) else "enforcement"
    if not records:
        return [], Revealed(kind)
    paths = await store.schema_versions.secret_paths(
        [(r.trigger_ref, r.schema_version if isinstance(r, Event) else None, r.created) for r in records]
    )
    masked = [cast(R, _masked(r, p)) if p else r for r, p in zip(records, paths, strict=True)]
    if reveal:
        held = frozenset(r.id for r, m in zip(records, masked, strict=True) if m is not r)
        return list(records), Revealed(kind, held)
    return masked, Revealed(kind)


async def shown(store: Store, records: Sequence[R], *, reveal: bool = False) -> list[R]:
    """``shown_unaudited``, and the audit of a reveal of every record."""
    out, revealed = await shown_unaudited(store, records, reveal=reveal)
    await revealed.audit(store, (r.id for r in out))
    return out


def _masked(record: Event | Enforcement, paths: tuple[secrets.Path, ...]) -> Event | Enforcement:
    """The record masked, or the record itself when nothing in it is secret."""
    values = secrets.secret_values(record.payload, paths)
    if isinstance(record, Event):
        if not values:
            return record
        payload, _ = secrets.mask_payload(record.payload, paths)
        errors = record.schema_errors
        if errors:
            errors, _ = secrets.mask_rendered(errors, values)
        return record._replace(payload=payload, schema_errors=errors)
    # The rule's conditions may name a secret value whatever this payload holds.
    conditions, in_rule = secrets.mask_conditions(record.conditions, paths)
    if not values:
        return record._replace(conditions=conditions) if in_rule else record
    payload, _ = secrets.mask_payload(record.payload, paths)
    config, _ = secrets.mask_rendered(record.config, values)
    return record._replace(payload=payload, config=config, conditions=conditions)


_NOW_ON = datetime.max.replace(tzinfo=UTC)
"""A rule is masked by its trigger's schema as it is now: the version in effect from its
``since`` on, whenever that was."""


async def shown_rules(store: Store, rules: Sequence[Rule], *, reveal: bool = False) -> tuple[list[Rule], Revealed]:
    """Rules as a read sends them: the ``value`` of every condition whose field is (or holds,
    or lies in) a secret path of the schema its trigger has now is ``"***"`` (one lookup for
    all the rules). With ``reveal``, as stored; the caller audits what it sends."""
    if not rules:
        return [], Revealed("rule")
    paths = await store.schema_versions.secret_paths([(r.trigger_ref, None, _NOW_ON) for r in rules])
    out: list[Rule] = []
    held: set[int] = set()
    for r, p in zip(rules, paths, strict=True):
        conditions, changed = secrets.mask_conditions(r.conditions, p)
        if changed:
            held.add(r.id)
        out.append(replace(r, conditions=conditions) if changed and not reveal else r)
    return out, Revealed("rule", frozenset(held) if reveal else frozenset())


async def shown_audit(store: Store, records: Sequence[AuditRecord]) -> list[AuditRecord]:
    """Audit records as ListAuditRecords sends them: the conditions a rule's record holds (its
    create, an update's old and new) with the value of every test on a secret field shown as
    ``"***"``, as GetRule shows the rule (by its trigger's schema as it is now). The trail is
    read by operators who need not hold ``reveal``; the rule read with ``reveal`` has the
    values. A record whose rule and trigger are both gone is masked by every path any schema
    marks secret: nothing says which trigger's it was."""
    held = [r for r in records if r.entity_type == "rule" and "conditions" in r.change]
    if not held:
        return list(records)
    # Which trigger each side of a record's conditions belongs to: the record's own
    # trigger_ref when it holds one (a create; an update that moved the rule), else the rule's.
    sides: dict[int, tuple[str | None, str | None]] = {}
    asked: list[int] = []
    for r in held:
        moved = r.change.get("trigger_ref")
        if isinstance(moved, str):
            sides[r.id] = (moved, moved)
        elif isinstance(moved, dict) and isinstance(moved.get("old"), str) and isinstance(moved.get("new"), str):
            sides[r.id] = (moved["old"], moved["new"])
        elif r.entity_id is not None:
            asked.append(r.entity_id)
    now = await store.rules.triggers_of(asked)
    for r in held:
        if r.id not in sides:
            ref = now.get(r.entity_id) if r.entity_id is not None else None
            sides[r.id] = (ref, ref)
    refs = sorted({ref for pair in sides.values() for ref in pair if ref is not None})
    found = await store.schema_versions.secret_paths([(ref, None, _NOW_ON) for ref in refs])
    paths: dict[str | None, tuple[secrets.Path, ...]] = dict(zip(refs, found, strict=True))
    if any(ref is None for pair in sides.values() for ref in pair):
        paths[None] = await store.schema_versions.marked()

    def masked(conditions: Any, ref: str | None) -> Any:
        if not isinstance(conditions, list):
            return conditions
        return secrets.mask_conditions(conditions, paths[ref])[0]

    out: list[AuditRecord] = []
    for r in records:
        if r.id not in sides:
            out.append(r)
            continue
        old_ref, new_ref = sides[r.id]
        change = dict(r.change)
        value = change["conditions"]
        if isinstance(value, dict) and ("old" in value or "new" in value):
            change["conditions"] = {
                **value,
                "old": masked(value.get("old"), old_ref),
                "new": masked(value.get("new"), new_ref),
            }
        else:
            change["conditions"] = masked(value, new_ref)
        out.append(replace(r, change=change))
    return out


async def refuse_masked_values(store: Store, trigger_ref: str, conditions: Sequence[Any], field: str) -> None:
    """INVALID_ARGUMENT when a rule's conditions hold ``"***"`` where its trigger's schema has a
    secret: the mask a read without ``reveal`` shows, written back, would replace the value."""
    if secrets.MASK not in json.dumps(conditions):
        return
    (paths,) = await store.schema_versions.secret_paths([(trigger_ref, None, _NOW_ON)])
    masked = secrets.masked_on_secrets(conditions, paths)
    if masked:
        raise InvalidArgument.one(
            field,
            f'compares {", ".join(masked)} (secret fields) with "***", the mask of a read without reveal: '
            "read the rule with reveal to edit those values, or type them",
        )


async def _execution_secrets(store: Store, ids: Sequence[int]) -> dict[int, list[Any]]:
    """By execution id, the clear secret values its enforcement's payload held: what its config
    and result may have taken (two or three statements for a page, whatever its length)."""
    sources = await store.executions.sources(ids)
    if not sources:
        return {}
    keyed = list(sources.items())
    paths = await store.schema_versions.secret_paths([(s.trigger_ref, None, s.created) for _, s in keyed])
    out: dict[int, list[Any]] = {}
    for (id_, source), p in zip(keyed, paths, strict=True):
        if p and (values := secrets.secret_values(source.payload, p)):
            out[id_] = values
    return out


async def shown_executions(
    store: Store, executions: Sequence[Execution], *, reveal: bool = False
) -> tuple[list[Execution], Revealed]:
    """Executions as a read sends them: an execution's config is what its enforcement's
    parameters rendered, so it is masked as the enforcement's config is (every value holding
    a secret of the enforcement's payload is ``"***"``), and its result the same way (an
    action may echo what it was given). With ``reveal``, as stored; the caller audits."""
    values = await _execution_secrets(store, [x.id for x in executions if x.enforcement is not None])
    out: list[Execution] = []
    held: set[int] = set()
    for x in executions:
        found = values.get(x.id)
        if not found:
            out.append(x)
            continue
        config, in_config = secrets.mask_rendered(x.config, found)
        result, in_result = secrets.mask_rendered(x.result, found)
        if in_config or in_result:
            held.add(x.id)
            out.append(x if reveal else replace(x, config=config, result=result))
        else:
            out.append(x)
    return out, Revealed("execution", frozenset(held) if reveal else frozenset())


async def shown_history(
    store: Store, entity_type: str, records: Sequence[HistoryRecord], *, reveal: bool = False
) -> tuple[list[HistoryRecord], Revealed]:
    """History records as a read sends them: an execution's changes hold its config and
    result, masked as ``shown_executions`` masks them. The audit names the executions."""
    if entity_type != "execution":
        return list(records), Revealed("execution")
    values = await _execution_secrets(store, [r.entity_id for r in records])
    out: list[HistoryRecord] = []
    held: set[int] = set()
    for r in records:
        found = values.get(r.entity_id)
        if not found:
            out.append(r)
            continue
        old, in_old = secrets.mask_rendered(r.old_values, found)
        new, in_new = secrets.mask_rendered(r.new_values, found)
        if in_old or in_new:
            held.add(r.entity_id)
            out.append(r if reveal else replace(r, old_values=old, new_values=new))
        else:
            out.append(r)
    return out, Revealed("execution", frozenset(held) if reveal else frozenset())

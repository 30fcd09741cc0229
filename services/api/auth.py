"""Who is calling, and what they may do: principals, roles, tokens and the access table.

A principal is a named caller with one or more roles: a bearer token's owner, or a client
certificate's subject mapped to a name (mutual TLS). ``AuthInterceptor`` identifies the
caller of every call before any handler runs and checks ``ACCESS``, the one table of which
roles may call which method: a method without an entry is refused (fail closed), and a test
walks every method of every service so that a new RPC cannot ship without one.

Tokens are verified against an in-memory copy of every token's hash (``Authenticator``),
reloaded every few seconds: a call never waits for the database to be authenticated, and a
revocation reaches every api replica within the reload interval. Streams are checked again at
every reload: a revoked or expired token's tails, watches and replays end then with
UNAUTHENTICATED (a watch stream's leases are released as it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

import grpc

from services.api._guard import Handler, HandlerCache, responses
from services.api.store.tokens import TokenRow
from shared.errors import DomainError, PermissionDenied, to_status

log = logging.getLogger("services.api.auth")

SENSOR, EXECUTOR, VIEWER, OPERATOR, WEBHOOK = "sensor", "executor", "viewer", "operator", "webhook"
REVEAL = "reveal"
ROLES = (SENSOR, EXECUTOR, VIEWER, OPERATOR, WEBHOOK, REVEAL)
"""``webhook`` is the web service's: it alone hands webhook deliveries over, and a delivery
carries what only the web service can assert (the signature checked, the client address).
``reveal`` calls nothing by itself: beside ``viewer`` or ``operator`` it lets reads that ask
for it (``reveal = true``) show secret fields in clear (README, Schemas); operators do not
have it unless given."""
TOKEN_PREFIX = "atk_"

_P = "automation.v1."
# Which roles may call each method. Operators may call everything (added below), so an entry
# lists who else may.
_ACCESS: dict[str, tuple[str, ...]] = {
    _P + "EventService/CreateEvent": (SENSOR,),
    _P + "EventService/CreateEvents": (SENSOR,),
    _P + "EventService/GetEvent": (VIEWER,),
    _P + "EventService/ListEvents": (VIEWER,),
    _P + "EventService/TailEvents": (VIEWER,),
    _P + "EventService/Publish": (SENSOR,),
    _P + "EventService/PublishBatch": (SENSOR,),
    _P + "EventService/ReemitEvent": (),
    _P + "EnforcementService/CreateEnforcement": (),
    _P + "EnforcementService/GetEnforcement": (VIEWER,),
    _P + "EnforcementService/ListEnforcements": (VIEWER,),
    _P + "EnforcementService/TailEnforcements": (VIEWER,),
    _P + "EnforcementService/ResolveEnforcement": (EXECUTOR,),
    _P + "EnforcementService/ResolveEnforcements": (EXECUTOR,),
    _P + "EnforcementService/ReleaseEnforcement": (EXECUTOR,),
    _P + "EnforcementService/WatchEnforcements": (EXECUTOR,),
    _P + "EnforcementService/GetDispatchState": (VIEWER,),
    _P + "EnforcementService/RetryEnforcement": (),
    _P + "EnforcementService/ListExecutors": (VIEWER,),
    _P + "EnforcementService/ListAttempts": (VIEWER,),
    _P + "EnforcementService/RetryEnforcements": (),
    _P + "RuleService/CreateTrigger": (),
    _P + "RuleService/GetTrigger": (VIEWER,),
    _P + "RuleService/ListTriggers": (VIEWER,),
    _P + "RuleService/DeleteTrigger": (),
    _P + "RuleService/UpdateTrigger": (),
    _P + "RuleService/RotateWebhookKey": (),
    # Only the web service (its own role): a delivery asserts a checked signature and the
    # client's address, which a sensor must not be able to claim.
    _P + "WebhookService/DeliverWebhook": (WEBHOOK,),
    _P + "CloudEventService/DeliverCloudEvents": (WEBHOOK,),
    _P + "RuleService/CreateRule": (),
    # Executors read the rule of each enforcement to decide it.
    _P + "RuleService/GetRule": (VIEWER, EXECUTOR),
    _P + "RuleService/ListRules": (VIEWER,),
    _P + "RuleService/UpdateRule": (),
    _P + "RuleService/DeleteRule": (),
    # Reads only; ReplayRule's `fire` also needs the operator role (checked by the servicer).
    _P + "RuleService/TestRule": (VIEWER,),
    _P + "RuleService/ReplayRule": (VIEWER,),
    # Operators only: a dry run of a change only they may make, and a proposed schema could
    # otherwise ask yes/no questions of stored values that reads mask (secret fields).
    _P + "RuleService/CheckSchema": (),
    _P + "ExecutionService/GetExecution": (VIEWER,),
    _P + "ExecutionService/ListExecutions": (VIEWER,),
    _P + "HistoryService/ListHistory": (VIEWER,),
    _P + "AnalyticsService/QueryEventVolume": (VIEWER,),
    _P + "AnalyticsService/QueryEnforcementVolume": (VIEWER,),
    _P + "AuditService/ListAuditRecords": (),
    _P + "AuthService/WhoAmI": (SENSOR, EXECUTOR, VIEWER, WEBHOOK, REVEAL),
}
ACCESS: Mapping[str, frozenset[str]] = {m: frozenset((*roles, OPERATOR)) for m, roles in _ACCESS.items()}
"""Method (``package.Service/Method``) -> the roles that may call it."""

OPEN = frozenset({"grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"})
"""Methods anyone may call: load balancers and compose probe health without credentials."""
REFLECTION = frozenset(
    {
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
"""Reflection needs a valid principal of any role, unless configured public."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    roles: frozenset[str]

    @property
    def is_operator(self) -> bool:
        return OPERATOR in self.roles

    @property
    def may_reveal(self) -> bool:
        return REVEAL in self.roles


DEVELOPMENT = Principal("insecure-development", frozenset(ROLES))
"""The caller of every call when authentication is off (development only)."""

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=DEVELOPMENT)


def current_principal() -> Principal:
    """The principal of the call being handled (DEVELOPMENT when authentication is off)."""
    return _current.get()


def new_token() -> tuple[str, bytes]:
    """A fresh token (256 random bits) and the hash that is stored instead of it."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class _Known:
    principal: Principal
    expires_at: float | None  # epoch seconds
    revoked: bool


class TokenSource(Protocol):
    """Where the authenticator reads tokens from (the store's ``Tokens``)."""

    async def all(self) -> Sequence[TokenRow]: ...

    async def touch(self, last_used: dict[bytes, datetime]) -> None: ...


class Authenticator:
    """Verifies bearer tokens against an in-memory copy of every token, reloaded every
    ``refresh_s``; records last use in memory and writes it back every ``touch_s``."""

    def __init__(self, source: TokenSource, refresh_s: float = 2.0, touch_s: float = 15.0) -> None:
        self._source = source
        self._refresh_s = refresh_s
        self._touch_s = touch_s
        self._known: dict[bytes, _Known] = {}
        self._used: dict[bytes, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._open: dict[int, _Open] = {}
        self._ending: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        rows = await self._source.all()
        self._known = {
            bytes(r.token_hash): _Known(
                Principal(r.name, frozenset(r.roles)),
                r.expires_at.timestamp() if r.expires_at else None,
                r.revoked_at is not None,
            )
            for r in rows
        }

    def verify(self, token: str) -> Principal | None:
        """The token's principal, or None for an unknown, expired or revoked token."""
        digest = token_hash(token)
        principal = self._valid(digest, time.time())
        if principal is not None:
            self._used[digest] = datetime.now(UTC)
        return principal

    def _valid(self, digest: bytes, now: float) -> Principal | None:
        known = self._known.get(digest)
        if known is None or known.revoked:
            return None
        if known.expires_at is not None and now >= known.expires_at:
            return None
        return known.principal

    def opened(self, token: str, context: Any) -> Callable[[], None]:
        """Registers a stream opened with ``token``: when a reload finds the token revoked,
        expired or gone, the stream is ended with UNAUTHENTICATED (``_end_invalid``). Returns
        what unregisters it (call it when the stream ends)."""
        task = asyncio.current_task()
        if task is None:
            return lambda: None
        key = id(task)
        self._open[key] = _Open(token_hash(token), context, task)

        def closed() -> None:
            self._open.pop(key, None)

        return closed

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def _end_invalid(self) -> None:
        """Ends every open stream whose token is no longer valid."""
        now = time.time()
        for key, stream in list(self._open.items()):
            if self._valid(stream.digest, now) is None:
                del self._open[key]
                ending = asyncio.create_task(_end_stream(stream), name="end-revoked-stream")
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)

    async def start(self) -> None:
        """Loads the tokens and keeps them fresh. If the first load fails (the database is
        away, or migrations are pending), every call is refused until a reload succeeds."""
        try:
            await self.load()
        except Exception as exc:  # noqa: BLE001 - fail closed and keep trying
            log.warning("could not load tokens; refusing every call until they load: %s", exc)
        self._task = asyncio.create_task(self._run(), name="auth-refresh")

    async def _run(self) -> None:
        next_touch = time.monotonic() + self._touch_s
        failing = False
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.load()
                self._end_invalid()
                if failing:
                    log.info("tokens reloaded")
                failing = False
                if time.monotonic() >= next_touch:
                    await self.flush()
                    next_touch = time.monotonic() + self._touch_s
            except Exception as exc:  # noqa: BLE001 - keep the last good copy; try again soon
                if not failing:
                    log.warning("could not reload tokens (keeping the last copy): %s", exc)
                failing = True

    async def flush(self) -> None:
        """Writes the last uses recorded since the previous flush."""
        used, self._used = self._used, {}
        if used:
            await self._source.touch(used)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # last uses are a courtesy, not a record
            await self.flush()


class Unauthenticated(DomainError):
    """Missing or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


@dataclass(frozen=True, slots=True)
class _Open:
    """A stream open under a token: ended when the token stops being valid."""

    digest: bytes
    context: Any
    task: asyncio.Task[Any]


async def _end_stream(stream: _Open) -> None:
    """Ends a stream whose token was revoked or expired: its status is sent first (from here:
    the stream's own task may be waiting for work, or for a client that does not read), then
    its task is cancelled, which runs its cleanup (a watch stream releases its leases at once)."""
    log.info("ending a stream: its token was revoked or expired")
    error = Unauthenticated("the token was revoked or has expired: this stream has ended", reason="TOKEN_REVOKED")
    # Abort always raises (AbortError) once the status is sent, or when the stream has ended.
    with contextlib.suppress(Exception):
        await stream.context.abort_with_status(to_status(error))
    if not stream.task.done():
        stream.task.cancel()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Identifies the caller of every call and checks ``ACCESS`` before any handler runs.

    The check runs inside the handler (wrapped for each of the four kinds of call), where the
    servicer context tells the peer's verified certificate for mutual TLS and where aborting
    works for streaming calls too.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        reflection_public: bool = False,
        certificate_principals: Mapping[str, Principal] | None = None,
    ) -> None:
        self._auth = authenticator
        self._reflection_public = reflection_public
        self._by_subject = dict(certificate_principals or {})
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method.lstrip("/")
        if handler is None or method in OPEN or (self._reflection_public and method in REFLECTION):
            return handler
        allowed = None if method in REFLECTION else ACCESS.get(method, frozenset())
        return self._cache.get(
            method,
            handler,
            lambda: _wrap(handler, lambda context: self._check(context, method, allowed), method, self.opened),
        )

    def opened(self, context: grpc.aio.ServicerContext[Any, Any]) -> Callable[[], None]:
        """Registers the stream being opened with its bearer token, so that revoking or
        expiring the token ends it; what unregisters it. A certificate's principal has no
        token to revoke."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self._auth.opened(str(value).partition(" ")[2].strip(), context)
        return lambda: None

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The caller: its bearer token's principal, else its client certificate's."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("the authorization header must be 'Bearer <token>'")
                principal = self._auth.verify(token.strip())
                if principal is None:
                    raise Unauthenticated("the token is not valid: unknown, expired or revoked")
                return principal
        if self._by_subject:
            for subject in context.auth_context().get("x509_common_name", ()):
                principal = self._by_subject.get(subject.decode(errors="replace"))
                if principal is not None:
                    return principal
        raise Unauthenticated(
            "credentials required: send 'authorization: Bearer <token>' "
            "(python -m services.api tokens create --name NAME --role ROLE)"
        )

    def _check(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, allowed: frozenset[str] | None
    ) -> Principal | DomainError:
        """The caller, or why it is refused. Synchronous: on the path of every call, it costs
        no coroutine unless the call is refused."""
        try:
            principal = self.identify(context)
        except DomainError as exc:
            return exc
        if allowed is not None and not (principal.roles & allowed):
            needed = " or ".join(sorted(allowed)) if allowed else "a rule in the access table"
            return PermissionDenied(
                f"{principal.name} ({', '.join(sorted(principal.roles))}) may not call {method}; it needs {needed}"
            )
        return principal


async def _refuse(context: Any, method: str, error: DomainError) -> NoReturn:
    log.info("%s refused: %s %s", method, error.code.name, error.message)
    await context.abort_with_status(to_status(error))
    raise AssertionError("unreachable")  # abort_with_status always raises


def _wrap(
    handler: Handler,
    check: Callable[[Any], Principal | DomainError],
    method: str,
    opened: Callable[[Any], Callable[[], None]],
) -> Handler:
    """The handler with ``check`` run first and its principal current while it runs; a
    stream is registered (``opened``) so that revoking its token ends it."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

    async def caller(context: Any) -> Principal:
        found = check(context)
        if isinstance(found, DomainError):
            await _refuse(context, method, found)
        return found

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            found = check(context)
            if isinstance(found, DomainError):
                await _refuse(context, method, found)
            token = _current.set(found)
            try:
                return await inner_uu(request, context)
            finally:
                _current.reset(token)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            _current.set(await caller(context))  # a generator runs in its own context
            closed = opened(context)
            try:
                async for item in responses(inner_us(request, context)):
                    yield item
            finally:
                closed()

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            token = _current.set(await caller(context))
            try:
                return await inner_su(requests, context)
            finally:
                _current.reset(token)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        _current.set(await caller(context))
        closed = opened(context)
        try:
            async for item in responses(inner_ss(requests, context)):
                yield item
        finally:
            closed()

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

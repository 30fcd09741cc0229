"""A server interceptor that answers undecodable requests with INVALID_ARGUMENT and bounds the
memory that requests being handled can take.

grpc decodes a request before any handler runs; when that fails (bytes that are not the
message, invalid UTF-8 in a string, nesting past the decoder's 100 levels) it answers
UNKNOWN with a Python class name. This interceptor receives the request as bytes instead
and decodes it itself, so a corrupt request gets a canonical status that names the message.
Only this api's own services are wrapped (their streaming methods are async generators);
health and reflection keep grpc's own handling.

Memory: a request's decoded form, what is derived from it and its answer can take several
times its size. Each call holds ``REQUEST_AMPLIFICATION`` times its size of one shared
budget (``MAX_REQUEST_MEMORY_BYTES``) while it is handled; when the budget is spent, calls
wait their turn (first come, first served) within their deadline. Small calls are well
under it; only many large ones at once queue, instead of taking the process's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from shared import limits
from shared.errors import InvalidArgument, ResourceExhausted, to_status

log = logging.getLogger("services.api.rpc")
# grpc's stubs type handlers for the sync server; the aio ones differ in their behaviours.
Handler = Any
_PREFIX = "/automation.v1."


def _message_name(method: str) -> str:
    """``automation.v1.CreateEventRequest`` for ``/automation.v1.EventService/CreateEvent``."""
    try:
        service, name = method.lstrip("/").split("/")
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
        return str(found.input_type.full_name)
    except (KeyError, ValueError, AttributeError):
        return "request"


async def _decode(
    raw: bytes, deserialize: Callable[[bytes], Any], name: str, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    try:
        return deserialize(raw)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the caller's bad bytes
        log.info("undecodable %s (%d bytes): %s", name, len(raw), exc.__class__.__name__)
        error = InvalidArgument.one(
            name,
            "could not be decoded: not a valid protobuf encoding of this message (corrupt or truncated bytes, "
            "invalid UTF-8 in a string, or nested more than 100 levels deep)",
        )
        await context.abort_with_status(to_status(error))
        raise AssertionError("unreachable") from None  # abort_with_status always raises


async def responses(result: Any) -> AsyncIterator[Any]:
    """What a streaming handler answers, as one async iterator: an async generator's items, or
    nothing for a handler that writes with ``context.write`` and returns a coroutine (grpc's own
    Health.Watch). Every interceptor that wraps streaming handlers iterates them through this."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


class HandlerCache:
    """The wrapped handler of each method, made once: grpc's generic handlers answer the same
    handler object for a method on every call, so an interceptor need not wrap it again."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, handler: Handler, make: Callable[[], Handler]) -> Handler:
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = make()
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ByteBudget:
    """Bytes shared by the calls being handled; ``hold(n)`` waits (FIFO) until ``n`` are free.

    With an ``owner`` (the call's principal), what one owner's calls hold and wait for together
    may not pass ``owner_share``: past it the call is refused (RESOURCE_EXHAUSTED), not queued,
    so that one client's big requests cannot take the budget, or the queue, from the others.
    A call of an owner holding nothing always gets in line."""

    def __init__(self, total: int, owner_share: int | None = None) -> None:
        self.total = total
        self.free = total
        self.owner_share = owner_share
        self._owners: dict[str, int] = {}
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def check(self, n: int, owner: str | None) -> None:
        """Raises ResourceExhausted when holding ``n`` more would put ``owner`` past its share."""
        if owner is None or self.owner_share is None:
            return
        held = self._owners.get(owner, 0)
        if held and held + min(n, self.total) > self.owner_share:
            raise ResourceExhausted(
                f"{owner}'s requests being handled hold {held} bytes of request memory; its share is "
                f"{self.owner_share} (API_PRINCIPAL_MEMORY_FRACTION of {self.total})",
                reason="REQUEST_MEMORY",
                retry_after=0.5,
            )

    @contextlib.asynccontextmanager
    async def hold(self, n: int, owner: str | None = None) -> AsyncIterator[None]:
        """Holds ``n`` bytes (waiting for them, FIFO) while the block runs; counted against
        ``owner``'s share from the call on (``check`` first)."""
        n = min(n, self.total)  # a call larger than the whole budget waits for all of it
        if owner is not None and self.owner_share is not None and n > 0:
            self._owners[owner] = self._owners.get(owner, 0) + n
            try:
                async with self.hold(n):
                    yield
            finally:
                left = self._owners.get(owner, 0) - n
                if left > 0:
                    self._owners[owner] = left
                else:
                    self._owners.pop(owner, None)
            return
        if self.free >= n and not self._waiters:
            self.free -= n
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((n, future))
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._give(n)  # granted just as we were cancelled
                else:
                    self._waiters.remove((n, future))
                    self._grant()
                raise
        try:
            yield
        finally:
            self._give(n)

    @property
    def waiting(self) -> int:
        """Calls waiting for their share."""
        return len(self._waiters)

    def _give(self, n: int) -> None:
        self.free += n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, future = self._waiters.popleft()
            if not future.done():
                self.free -= n
                future.set_result(None)


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self, budget: ByteBudget | None = None, owner: Callable[[], str | None] = lambda: None) -> None:
        self.budget = budget or ByteBudget(limits.MAX_REQUEST_MEMORY_BYTES)
        self._owner = owner
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or not method.startswith(_PREFIX)
            or handler.request_streaming
            or handler.request_deserializer is None
        ):
            return handler
        return self._cache.get(method, handler, lambda: _wrap(handler, _message_name(method), self.budget, self._owner))


async def _within_share(budget: ByteBudget, n: int, owner: str | None, context: Any) -> None:
    try:
        budget.check(n, owner)
    except ResourceExhausted as exc:
        await context.abort_with_status(to_status(exc))
        raise AssertionError("unreachable") from None  # abort_with_status always raises


def _wrap(handler: Handler, name: str, budget: ByteBudget, owner: Callable[[], str | None]) -> Handler:
    deserialize = handler.request_deserializer
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            # A stream lives long: it holds the budget only while its request is decoded.
            n, who = len(raw) * limits.REQUEST_AMPLIFICATION, owner()
            await _within_share(budget, n, who, context)
            async with budget.hold(n, who):
                request = await _decode(raw, deserialize, name, context)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)

    inner = handler.unary_unary

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        n, who = len(raw) * limits.REQUEST_AMPLIFICATION, owner()
        await _within_share(budget, n, who, context)
        async with budget.hold(n, who):
            return await inner(await _decode(raw, deserialize, name, context), context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)

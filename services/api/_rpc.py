"""Turns every failure inside a servicer method into a canonical gRPC status, logged once."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from services.api.store import set_deadline, translate
from shared.errors import DomainError, internal_status, to_status

log = logging.getLogger("services.api.rpc")

F = TypeVar("F", bound=Callable[..., Any])


async def _abort(method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    mapped = translate(exc)
    if isinstance(mapped, DomainError):
        level = logging.WARNING if mapped.code == grpc.StatusCode.UNAVAILABLE else logging.INFO
        log.log(level, "%s failed: %s %s", method, mapped.code.name, mapped.message, extra={"rpc": method})
        await context.abort_with_status(to_status(mapped))
    log.exception("%s failed with an unexpected error", method, extra={"rpc": method})
    await context.abort_with_status(internal_status())
    raise AssertionError("unreachable")  # abort_with_status always raises


_current_rpc: contextvars.ContextVar[str] = contextvars.ContextVar("rpc", default="")


def current_rpc() -> str:
    """The full name of the RPC being handled (``automation.v1.RuleService/UpdateRule``), as the
    audit trail records it."""
    return _current_rpc.get()


def rpc(fn: F) -> F:
    """Decorates a unary or server-streaming servicer method with the error mapping."""
    method = fn.__name__
    # The servicer class is named after its service: RuleService.UpdateRule.
    full_name = "automation.v1." + fn.__qualname__.replace(".", "/")
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            _current_rpc.set(full_name)  # a generator runs in its call's own context
            try:
                async for item in fn(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                await _abort(method, exc, context)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = _current_rpc.set(full_name)
        set_deadline(context.time_remaining())
        try:
            return await fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await _abort(method, exc, context)
        finally:
            _current_rpc.reset(token)

    return unary  # type: ignore[return-value]

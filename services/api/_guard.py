"""A server interceptor that answers undecodable requests with INVALID_ARGUMENT.

grpc decodes a request before any handler runs; when that fails (bytes that are not the
message, invalid UTF-8 in a string, nesting past the decoder's 100 levels) it answers
UNKNOWN with a Python class name. This interceptor receives the request as bytes instead
and decodes it itself, so a corrupt request gets a canonical status that names the message.
Only this api's own services are wrapped (their streaming methods are async generators);
health and reflection keep grpc's own handling.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from shared.errors import InvalidArgument, to_status

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


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # The generic handlers answer the same handler object for a method every time, so its
        # wrapper is made once.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

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
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, _message_name(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(handler: Handler, name: str) -> Handler:
    deserialize = handler.request_deserializer
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            request = await _decode(raw, deserialize, name, context)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)

    inner = handler.unary_unary

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await inner(await _decode(raw, deserialize, name, context), context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)

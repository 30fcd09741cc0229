"""The domain errors both services speak, and their canonical gRPC form.

One root, ``DomainError``; each subclass carries its gRPC code and a stable ``reason`` for the
``google.rpc.ErrorInfo`` detail. Invalid input lists every bad field in a
``google.rpc.BadRequest`` detail, so grpcurl shows the field names.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.limits import MAX_ECHO, MAX_ERROR_MESSAGE, MAX_VIOLATIONS

DOMAIN = "automation.v1"
# With MAX_VIOLATIONS and MAX_ERROR_MESSAGE, a status stays under ~6 KiB of trailing metadata,
# below the 8 KiB a default gRPC client accepts.
_MAX_FIELD = 120
_MAX_DESCRIPTION = 200


def brief(value: object, limit: int = MAX_ECHO) -> str:
    """A caller's value as an error message may quote it: repr, ASCII only (NUL, control and
    non-ASCII characters escaped), at most ``limit`` characters, with the full length named when
    cut. Messages travel in metadata, where an echoed 5,000-character input would not fit."""
    text = ascii(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, everything but printable ASCII escaped: control
    characters break logs, and in the ``grpc-message`` header every other byte costs three."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    safe = "".join(c if c.isascii() and c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


class DomainError(Exception):
    """Something the caller can act on went wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str | None = None, reason: str | None = None) -> None:
        super().__init__(clip(message or (self.__doc__ or "").strip(), MAX_ERROR_MESSAGE))
        if reason:
            self.reason = reason  # a more specific ErrorInfo reason than the class's

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFound(DomainError):
    """The requested record does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A record with this key already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The record is not in a state that allows this operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Aborted(DomainError):
    """The operation conflicted with a concurrent one and changed nothing; retry it."""

    code = grpc.StatusCode.ABORTED
    reason = "CONFLICT"


class ResourceExhausted(DomainError):
    """A per-caller quota is used up; free some of it first."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str | None = None, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after
        """Seconds to wait before trying again (a ``google.rpc.RetryInfo`` detail), if known."""


class Unavailable(DomainError):
    """The database is unreachable; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


class InvalidArgument(DomainError):
    """The request has invalid fields."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        # Bounded, so that the status (message and BadRequest detail) always fits the metadata
        # a client accepts, however many fields a request got wrong.
        items = [(clip(f, _MAX_FIELD), clip(d, _MAX_DESCRIPTION)) for f, d in violations[:MAX_VIOLATIONS]]
        if len(violations) > MAX_VIOLATIONS:
            items.append(("", f"and {len(violations) - MAX_VIOLATIONS} more violations"))
        self.violations = items
        super().__init__("; ".join(f"{field}: {why}" if field else why for field, why in self.violations))

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([(field, description)])


class Violations:
    """Collects every bad field of a request, so that one error names them all."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def to_status(error: DomainError) -> grpc.Status:
    """The rich gRPC status of a domain error (code, message, ErrorInfo, BadRequest)."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
    details.append(info)
    if isinstance(error, InvalidArgument):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
                ]
            )
        )
        details.append(bad)
    if isinstance(error, ResourceExhausted) and error.retry_after is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(int(error.retry_after * 1e9), 0))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code = getattr(code_pb2, error.code.name)
    return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))


def internal_status(message: str = "internal error; the server log has the details") -> grpc.Status:
    """A plain INTERNAL status that leaks no stack trace."""
    return to_status(DomainError(message))


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason carried in a failed call's rich status, or '' when there is none."""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.TypeName() == error_details_pb2.ErrorInfo.DESCRIPTOR.full_name:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
    return ""


def field_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations a failed call carries, in order, as (field, why): what a
    form shows next to each field it names."""
    out: list[tuple[str, str]] = []
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.TypeName() == error_details_pb2.BadRequest.DESCRIPTOR.full_name:
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out.extend((v.field, v.description) for v in bad.field_violations)
    return out

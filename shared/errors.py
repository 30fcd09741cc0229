"""The domain errors both services speak, and their canonical gRPC form.

One root, ``DomainError``; each subclass carries its gRPC code and a stable ``reason`` for the
``google.rpc.ErrorInfo`` detail. Invalid input lists every bad field in a
``google.rpc.BadRequest`` detail, so grpcurl shows the field names.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "automation.v1"


class DomainError(Exception):
    """Something the caller can act on went wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

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

    def __init__(self, message: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class Unavailable(DomainError):
    """The database is unreachable; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


class InvalidArgument(DomainError):
    """The request has invalid fields."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{field}: {why}" for field, why in self.violations))

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

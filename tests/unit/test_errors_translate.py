"""Database failures map to domain errors: connection trouble is UNAVAILABLE, never INTERNAL."""

from __future__ import annotations

import asyncpg
import pytest

from services.api.store import translate
from shared.errors import AlreadyExists, Unavailable


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset"),
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        asyncpg.ConnectionDoesNotExistError("closed"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
    ],
)
def test_connection_failures_are_unavailable(exc: Exception) -> None:
    assert isinstance(translate(exc), Unavailable)


def test_unique_violation_is_already_exists() -> None:
    assert isinstance(translate(asyncpg.UniqueViolationError("duplicate key")), AlreadyExists)


def test_unknown_errors_are_left_to_the_caller() -> None:
    assert translate(RuntimeError("bug")) is None

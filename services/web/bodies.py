"""Request bodies read with bounds: a size limit (refused as soon as it is passed, never read
whole first), a deadline, and a budget of bytes held at once by all uploads in flight."""

from __future__ import annotations

import asyncio

from starlette.requests import Request


class TooLarge(Exception):
    """The body passes ``limit`` bytes (declared, or once that much has arrived)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} bytes")
        self.limit = limit


class TooSlow(Exception):
    """The body did not arrive whole within the deadline."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(f"the body did not arrive within {deadline_s:g} s")
        self.deadline_s = deadline_s


def declared_length(request: Request) -> int | None:
    """The Content-Length the client declared, when it is a plain number."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None


async def read_body(request: Request, limit: int, deadline_s: float | None = None) -> bytes:
    """The raw body, at most ``limit`` bytes; TooLarge past it, TooSlow past ``deadline_s``.
    A client that hangs up raises starlette's ClientDisconnect."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise TooLarge(limit)
    body = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise TooLarge(limit)
    except TimeoutError:
        raise TooSlow(deadline_s or 0.0) from None
    return bytes(body)


class Budget:
    """Bytes that bodies in flight may hold in all. A claim is taken whole before a body is
    read, or refused at once: waiting would keep the connection (and what arrived) held, which
    is what the budget is there to bound."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0

    def claim(self, n: int) -> bool:
        if self.held + n > self.total:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n

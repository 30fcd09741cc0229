"""Request bodies read with a bound: refused as soon as they pass it, never read whole first."""

from __future__ import annotations

from starlette.requests import Request


class TooLarge(Exception):
    """The body passes ``limit`` bytes (declared, or once that much has arrived)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} bytes")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes; TooLarge past it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(limit)
    return bytes(body)

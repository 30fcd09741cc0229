"""The service's edge: who the client is (its address, proxies considered), how long a
request's headers may take, and the uvicorn settings that go with both."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import uvicorn
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.config import WebConfig

Networks = tuple[IPv4Network | IPv6Network, ...]


def _trusted(address: IPv4Address | IPv6Address, proxies: Networks) -> bool:
    return any(address in net for net in proxies)


def client_address(request: Request, proxies: Networks) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then, walking
    X-Forwarded-For from the right (each proxy appends the address it saw), the first address
    that is not a trusted proxy. Entries left of it were written by the client itself and are
    never believed; an entry that is not an address ends the walk at the last one believed."""
    peer = request.client.host if request.client else ""
    if not proxies:
        return peer
    try:
        current = ip_address(peer)
    except ValueError:
        return peer
    entries = [e.strip() for h in request.headers.getlist("x-forwarded-for") for e in h.split(",")]
    for entry in reversed(entries):
        if not _trusted(current, proxies):
            break
        try:
            current = ip_address(entry)
        except ValueError:
            break
    return str(current)


def _header_deadline(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    ``seconds`` after it opened or after its previous answer (uvicorn has no such limit: a
    client sending a byte now and then held a connection for ever)."""

    class HeaderDeadline(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _late(self) -> None:
            self._timer = None
            # A request the application has (headers complete, answer not sent) is its to
            # bound; one whose headers are still coming is closed.
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def server_options(config: WebConfig) -> dict[str, Any]:
    """uvicorn settings that belong to the edge's rules (the same in tests as in production)."""
    return {
        "http": _header_deadline(config.read_deadline_s),
        # The client address is ours to decide (client_address): uvicorn's own proxy handling
        # believes X-Forwarded-For from a loopback peer even when no proxy is configured.
        "proxy_headers": False,
        "forwarded_allow_ips": "",
        "log_config": None,  # our logging setup, not uvicorn's
        "access_log": False,
    }


def server_config(app: Any, config: WebConfig, **extra: Any) -> uvicorn.Config:
    host, _, port = config.addr.rpartition(":")
    return uvicorn.Config(app, host=host or "127.0.0.1", port=int(port), **server_options(config), **extra)

"""Console sign-in: an api token in a cookie, and who it belongs to.

The console holds no accounts of its own: a person signs in with an api token (viewer or
operator), which the api verifies (``AuthService/WhoAmI``) and which then goes with every call
the console makes for them, so the api's roles and audit trail apply to the person, never to
the web service. The service's own token (role webhook) is for webhook deliveries only; a console
call without a person's token is never made (``User.metadata`` always carries theirs).

The cookie is HttpOnly (page scripts cannot read it) and SameSite=Strict (another site cannot
make the browser send it); forms carry a CSRF value derived from the token as well, so a
change is made only by a page of this console. Sign-in has no token yet: its form carries a
random value that must equal the one in a SameSite=Strict cookie the sign-in page set
(``SIGNIN_COOKIE``), so another site cannot sign a browser in under the attacker's token.
Failed sign-ins are throttled per client address (``Throttle``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import ip_network

import grpc
from starlette.requests import Request

from shared.gen.automation.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("services.web.session")

COOKIE = "console_token"
SIGNIN_COOKIE = "console_signin"
"""The sign-in form's CSRF value (random, set by the sign-in page)."""
MAX_TOKEN = 512
"""Longest token accepted (the api's are 47 characters)."""
WHO_TTL_S = 30.0
"""How long a token's principal is remembered: a revoked token stops showing buttons within
this long (the api refuses its calls at once)."""
_CACHE = 1024


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in person: their token and what the api says it may do."""

    token: str
    name: str
    roles: frozenset[str]
    authentication: bool
    """False when the api has authentication off (development only)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    @property
    def operator(self) -> bool:
        return "operator" in self.roles

    @property
    def viewer(self) -> bool:
        return bool(self.roles & {"viewer", "operator"})

    @property
    def csrf(self) -> str:
        return csrf_of(self.token)


def csrf_of(token: str) -> str:
    return hmac.new(token.encode(), b"console-csrf", hashlib.sha256).hexdigest()[:32]


def usable(token: str) -> bool:
    """Whether ``token`` can go into gRPC metadata at all (printable ASCII, no spaces)."""
    return 0 < len(token) <= MAX_TOKEN and token.isascii() and token.isprintable() and " " not in token


class Sessions:
    """Finds the person behind a request's cookie, asking the api at most every WHO_TTL_S."""

    def __init__(self, stub: auth_pb2_grpc.AuthServiceAsyncStub, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._known: OrderedDict[bytes, tuple[float, User]] = OrderedDict()

    async def verify(self, token: str) -> User | None:
        """The token's user; None when the api does not accept it. Other api failures raise."""
        if not usable(token):
            return None
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._known.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            me = await self._stub.WhoAmI(
                auth_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self._known.pop(key, None)
                return None
            raise
        user = User(token, me.name, frozenset(me.roles), me.authentication)
        self._known[key] = (now + WHO_TTL_S, user)
        self._known.move_to_end(key)
        while len(self._known) > _CACHE:
            self._known.popitem(last=False)
        return user

    def forget(self, token: str) -> None:
        self._known.pop(hashlib.sha256(token.encode()).digest(), None)

    async def user(self, request: Request) -> User | None:
        token = request.cookies.get(COOKIE, "")
        return await self.verify(token) if token else None


def signin_nonce() -> str:
    return secrets.token_hex(16)


def signin_csrf_ok(request: Request, given: str) -> bool:
    """Whether a sign-in form's CSRF value matches the cookie its page set."""
    cookie = request.cookies.get(SIGNIN_COOKIE, "")
    return len(cookie) == 32 and hmac.compare_digest(cookie.encode(), given.encode())


class Throttle:
    """Failed sign-ins per client address, a token bucket: ``burst`` in a row, then one more
    every ``refill_s``. Every sign-in from an address with no try left is refused before the
    token is looked at (a right guess included), so guessing costs time, not just a request.
    IPv6 addresses count per /64, which one host usually holds whole."""

    def __init__(self, burst: int, refill_s: float, size: int = 10_000) -> None:
        self._burst = burst
        self._refill_s = refill_s
        self._size = size
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @staticmethod
    def _key(address: str) -> str:
        try:
            net = ip_network(address, strict=False)
        except ValueError:
            return address
        return str(net.supernet(new_prefix=64)) if net.version == 6 else str(net)

    def _tries(self, key: str, now: float) -> float:
        hit = self._buckets.get(key)
        if hit is None:
            return float(self._burst)
        tries, at = hit
        return min(float(self._burst), tries + (now - at) / self._refill_s)

    def wait_s(self, address: str) -> int:
        """Seconds until ``address`` may try again: 0 when it may now."""
        tries = self._tries(self._key(address), time.monotonic())
        return 0 if tries >= 1 else max(1, math.ceil((1 - tries) * self._refill_s))

    def failed(self, address: str) -> None:
        key, now = self._key(address), time.monotonic()
        self._buckets[key] = (max(0.0, self._tries(key, now) - 1), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._size:
            self._buckets.popitem(last=False)

"""Console sign-in: an api token in a cookie, and who it belongs to.

The console holds no accounts of its own: a person signs in with an api token (viewer or
operator), which the api verifies (``AuthService/WhoAmI``) and which then goes with every call
the console makes for them, so the api's roles and audit trail apply to the person, never to
the web service. The service's own token (sensor) is for webhook deliveries only; a console
call without a person's token is never made (``User.metadata`` always carries theirs).

The cookie is HttpOnly (page scripts cannot read it) and SameSite=Strict (another site cannot
make the browser send it); forms carry a CSRF value derived from the token as well, so a
change is made only by a page of this console.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from starlette.requests import Request

from shared.gen.automation.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("services.web.session")

COOKIE = "console_token"
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

"""The operator console: server-rendered pages over the api's gRPC reads and operator RPCs.

Every page is rendered from the api's answers for the signed-in person (their token, their
roles: ``session``); nothing is cached or stored here. Changes (re-emit, retry, enable or
disable, webhook settings) are forms posted back with a CSRF value, then a redirect to the
page that shows the result. Live updates are in ``live``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

import grpc
from google.protobuf import field_mask_pb2, json_format
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from services.web.bodies import TooLarge, TooSlow, read_body
from services.web.edge import client_address
from services.web.render import STATUS_BY_NAME, STATUS_NAMES, environment
from services.web.session import (
    COOKIE,
    SIGNIN_COOKIE,
    Sessions,
    Throttle,
    User,
    csrf_of,
    signin_csrf_ok,
    signin_nonce,
)
from shared import limits
from shared.config import WebConfig
from shared.gen.automation.v1 import (
    analytics_pb2,
    analytics_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)

log = logging.getLogger("services.web.console")

PAGE_SIZE = 50
"""Rows per list page."""
MAX_FORM_BYTES = limits.MAX_PAYLOAD_BYTES + 64 * 1024
"""Largest form the console accepts: a rule test's payload and the form's other fields."""
SIGNIN_FORM_BYTES = 4096
"""A sign-in form: a token and where to go next."""
SECURITY_HEADERS = {
    # Nothing but this console's own files runs or loads; no page may be framed (its buttons
    # cannot be clickjacked), forms post only here.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
VOLUME_RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
VOLUME_BARS = {
    "24h": ("hour", timedelta(hours=1)),
    "7d": ("4 hours", timedelta(hours=4)),
    "30d": ("day", timedelta(days=1)),
}
"""What one bar of each range's charts covers: 720 hourly bars for 30 days drew 1.3 px each and
made a 500 KB page that took 300 ms to build; a bar a day draws the same month in 30."""
NOTICES = {
    "reemitted": "Re-emitted: this is the new event.",
    "retried": "Offered again to executors.",
    "enabled": "Enabled.",
    "disabled": "Disabled.",
    "webhook-on": "Webhook enabled.",
    "webhook-off": "Webhook disabled.",
    "rotated": "New webhook key: senders must use the new URL.",
    "none-retried": "None of them was exhausted any more: nothing was retried.",
    "created": "Created.",
    "saved": "Saved.",
    "rule-deleted": "Rule deleted.",
    "trigger-deleted": "Trigger deleted.",
}
"""What a redirect after a change may announce: a fixed set, so no text is reflected."""

UNSIGNED_WARNING = (
    "This webhook would accept unsigned deliveries: anyone who learns its URL can create events "
    "on this trigger. Set a secret, or confirm that you want it unsigned."
)
"""What enabling a webhook without a secret is confirmed with (here and on the trigger form)."""

Handler = Callable[[Request, User], Awaitable[Response]]
RETRY_FILTERS = ("rule_ref", "trigger_ref", "from", "to")
"""The filters of a bulk retry of exhausted enforcements."""
EXECUTION_STATUS_BY_NAME: dict[str, int] = {
    execution_pb2.ExecutionStatus.Name(v).removeprefix("EXECUTION_STATUS_").lower(): v
    for v in execution_pb2.ExecutionStatus.values()
    if v
}


def _full_rpc(text: str) -> str:
    """A method as typed: ``RuleService/UpdateRule`` (or the full name) as the trail keeps it."""
    if text and "/" in text and not text.startswith("automation."):
        return f"automation.v1.{text}"
    return text


class Stubs:
    """The api's services, over the web service's one channel (calls carry the person's token)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.events = event_pb2_grpc.EventServiceStub(channel)
        self.enforcements = enforcement_pb2_grpc.EnforcementServiceStub(channel)
        self.rules = rule_pb2_grpc.RuleServiceStub(channel)
        self.executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        self.analytics = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)
        self.history = history_pb2_grpc.HistoryServiceStub(channel)


class Refused(Exception):
    """A console request refused before the api is asked."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Filters:
    """A list page's filters, as typed in its form (kept for the form and the paging links)."""

    values: dict[str, str]

    @classmethod
    def of(cls, request: Request, names: tuple[str, ...]) -> Filters:
        return cls({n: request.query_params.get(n, "").strip() for n in names})

    def query(self, **extra: str) -> str:
        return urlencode({k: v for k, v in {**self.values, **extra}.items() if v})

    def time_range(self, start: str = "from", end: str = "to") -> common_pb2.TimeRange | None:
        """The range typed in the ``start`` and ``end`` fields (``YYYY-MM-DDTHH:MM``, a
        datetime-local input's value, in UTC: the server cannot know the browser's zone, and
        the labels say UTC); None when neither is given."""
        bounds = [self._utc(start), self._utc(end)]
        if bounds == [None, None]:
            return None
        if bounds[0] and bounds[1] and bounds[0] >= bounds[1]:
            raise Refused(400, f"{start}: must be before {end}")
        window = common_pb2.TimeRange()
        if bounds[0]:
            window.start.FromDatetime(bounds[0])
        if bounds[1]:
            window.end.FromDatetime(bounds[1])
        return window

    def _utc(self, name: str) -> datetime | None:
        text = self.values.get(name, "")
        if not text:
            return None
        try:
            at = datetime.fromisoformat(text[:32])
        except ValueError:
            raise Refused(400, f"{name}: a time such as 2024-05-01T13:30 (UTC), got {text[:40]!r}") from None
        if not 1970 <= at.year <= 9999:
            raise Refused(400, f"{name}: a year from 1970 on")
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

    @property
    def timed(self) -> bool:
        """A time range is given: the list is a fixed window, not followed live (the tails
        have no time filter, and new rows fall outside a range that ends in the past)."""
        return bool(self.values.get("from") or self.values.get("to"))

    def id(self, name: str) -> int | None:
        text = self.values.get(name, "")
        if not text:
            return None
        if (id_ := positive_id(text)) is None:
            raise Refused(400, f"{name}: must be a positive whole number (got {text[:40]!r})")
        return id_


def payload_filter(text: str) -> dict[str, Any] | None:
    """The payload search as typed: a JSON object (``{"repo": {"name": "x"}}``), or None when
    the box is empty. The api bounds it and says what is wrong with it; here only what it
    cannot be sent as is refused."""
    if not text:
        return None
    if len(text.encode()) > limits.MAX_SEARCH_BYTES:
        raise Refused(400, f"payload: a search may be at most {limits.MAX_SEARCH_BYTES:,} bytes of JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Refused(400, f"payload: not JSON ({exc.msg} at character {exc.pos + 1})") from None
    except RecursionError:
        value = None  # thousands of brackets: refused below as too deep
    if not isinstance(value, dict):
        raise Refused(400, 'payload: a JSON object, such as {"repo": {"name": "x"}}')
    # Checked here too: a Struct much deeper than this is not even carried to the api.
    if _depth(value) > limits.MAX_SEARCH_DEPTH:
        raise Refused(400, f"payload: a search nests at most {limits.MAX_SEARCH_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """Levels of a JSON value (a scalar is 0), counted without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
    return deepest


def positive_id(text: str) -> int | None:
    """An id as typed (ASCII digits, 1 to 2**63-1), or None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if 0 < value < 2**63 else None


def path_id(request: Request) -> int:
    """The record id in the path; an id no record can have is not found."""
    id_ = positive_id(request.path_params["id"])
    if id_ is None:
        raise Refused(404, f"there is no record with id {request.path_params['id'][:40]!r}")
    return id_


async def read_form(request: Request, limit: int, deadline_s: float | None = None) -> dict[str, str]:
    """A URL-encoded form body, refused past ``limit`` bytes without reading it whole, and
    when it has not arrived within ``deadline_s``; the first value of each field."""
    return {k: v[0] for k, v in (await read_form_lists(request, limit, deadline_s)).items()}


async def read_form_lists(request: Request, limit: int, deadline_s: float | None = None) -> dict[str, list[str]]:
    """A URL-encoded form body with every value of each field (checkboxes of one name)."""
    try:
        body = await read_body(request, limit, deadline_s)
    except TooLarge:
        raise Refused(413, f"the form may be at most {limit:,} bytes") from None
    except TooSlow as exc:
        raise Refused(408, str(exc)) from None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise Refused(400, "the form is not UTF-8") from None
    return fields


def safe_next(target: str) -> str:
    """Where to go after sign-in: a path of this site only (never another host)."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


class Console:
    def __init__(self, config: WebConfig, stubs: Stubs, sessions: Sessions) -> None:
        self.config = config
        self.api = stubs
        self.sessions = sessions
        self.throttle = Throttle(config.signin_burst, config.signin_refill_s)
        self.env = environment()

    # ---- plumbing ---------------------------------------------------------------------------

    def render(self, request: Request, user: User | None, template: str, status: int = 200, **ctx: Any) -> Response:
        notice = NOTICES.get(request.query_params.get("notice", ""), "")
        n = positive_id(request.query_params.get("n", ""))
        if request.query_params.get("notice") == "bulk-retried" and n:
            notice = f"Offered {n:,} exhausted enforcement{'s' if n != 1 else ''} to executors again."
        html = self.env.get_template(template).render(request=request, user=user, notice=notice, **ctx)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def call(self, user: User) -> dict[str, Any]:
        """Keyword arguments of every api call made for ``user``."""
        return {"metadata": user.metadata, "timeout": self.config.rpc_timeout_s}

    def page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A console route: signed in, or sent to sign in; api refusals as pages."""

        async def endpoint(request: Request) -> Response:
            user: User | None = None
            try:
                user = await self.sessions.user(request)
                if user is None:
                    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    if request.method != "GET":
                        back = "/"
                    return RedirectResponse(f"/signin?{urlencode({'next': back})}", status_code=303)
                return await handler(request, user)
            except Refused as exc:
                return self.render(request, user, "error.html", exc.status, title="Refused", message=str(exc))
            except grpc.aio.AioRpcError as exc:
                return self.failure(request, user, exc)

        return endpoint

    def failure(self, request: Request, user: User | None, exc: grpc.aio.AioRpcError) -> Response:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if user is not None:
                self.sessions.forget(user.token)
            response: Response = RedirectResponse("/signin?expired=1", status_code=303)
            response.delete_cookie(COOKIE, path="/")
            return response
        status, title = {
            grpc.StatusCode.NOT_FOUND: (404, "Not found"),
            grpc.StatusCode.PERMISSION_DENIED: (403, "Not allowed"),
            grpc.StatusCode.INVALID_ARGUMENT: (400, "Refused"),
            grpc.StatusCode.FAILED_PRECONDITION: (409, "Not possible now"),
            grpc.StatusCode.ALREADY_EXISTS: (409, "Already exists"),
        }.get(code, (503, "The api cannot answer now"))
        if status == 503:
            log.warning("console %s %s: api %s %s", request.method, request.url.path, code.name, details)
            details = f"{code.name}: {details}. This page tries again by itself."
        response = self.render(request, user, "error.html", status, title=title, message=details, retry=status == 503)
        if status == 503:
            response.headers["Retry-After"] = "5"
        return response

    async def form(self, request: Request, user: User) -> dict[str, str]:
        """A posted form (URL-encoded, bounded), once its CSRF value is checked."""
        return {k: v[0] for k, v in (await self.form_lists(request, user)).items()}

    async def form_lists(self, request: Request, user: User, limit: int = MAX_FORM_BYTES) -> dict[str, list[str]]:
        """``form`` with every value of each field."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise Refused(415, "forms are posted as application/x-www-form-urlencoded")
        form = await read_form_lists(request, limit)
        if not hmac.compare_digest((form.get("csrf") or [""])[0], user.csrf):
            raise Refused(403, "this form is stale or did not come from this console; reload the page and retry")
        return form

    @staticmethod
    def operator(user: User) -> None:
        if not user.operator:
            raise Refused(403, "this needs the operator role; you are signed in without it")

    # ---- sign-in ----------------------------------------------------------------------------

    async def signin_page(self, request: Request) -> Response:
        return self._signin_form(
            request,
            200,
            next=safe_next(request.query_params.get("next", "/")),
            expired=bool(request.query_params.get("expired")),
        )

    def _signin_form(self, request: Request, status: int, **ctx: Any) -> Response:
        """The sign-in page, its form carrying the CSRF value of its cookie (a new one if the
        browser has none)."""
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        fresh = len(nonce) != 32
        if fresh:
            nonce = signin_nonce()
        response = self.render(request, None, "signin.html", status, signin_csrf=nonce, **ctx)
        if fresh:
            response.set_cookie(
                SIGNIN_COOKIE,
                nonce,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/signin",
            )
        return response

    async def signin(self, request: Request) -> Response:
        address = client_address(request, self.config.trusted_proxies)
        wait = self.throttle.wait_s(address)
        if wait:
            log.warning("console: sign-in from %s refused: too many failed sign-ins", address)
            response = self._signin_form(
                request, 429, next="/", error=f"Too many failed sign-ins: try again in {wait} s."
            )
            response.headers["Retry-After"] = str(wait)
            return response
        try:
            fields = await read_form(request, SIGNIN_FORM_BYTES, self.config.read_deadline_s)
        except Refused as exc:
            return self._signin_form(request, exc.status, next="/", error=str(exc))
        target = safe_next(fields.get("next", "/"))
        if not signin_csrf_ok(request, fields.get("csrf", "")):
            return self._signin_form(
                request, 403, next=target, error="This sign-in form did not come from this console: sign in again."
            )
        token = fields.get("token", "").strip()
        try:
            user = await self.sessions.verify(token)
        except grpc.aio.AioRpcError as exc:
            return self.failure(request, None, exc)
        if user is None:
            self.throttle.failed(address)
            return self._signin_form(request, 401, next=target, error="The api does not accept this token.")
        if not user.viewer:
            return self._signin_form(
                request,
                403,
                next=target,
                error=f"This token ({user.name}) has neither the viewer nor the operator role.",
            )
        log.info("console: %s signed in (%s)", user.name, ", ".join(sorted(user.roles)))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
        )
        return response

    async def signout(self, request: Request) -> Response:
        token = request.cookies.get(COOKIE, "")
        if token:
            # Signing someone out is a change like any other: only this console's own form may.
            try:
                fields = await read_form(request, SIGNIN_FORM_BYTES, self.config.read_deadline_s)
            except Refused as exc:
                return self.render(request, None, "error.html", exc.status, title="Refused", message=str(exc))
            if not hmac.compare_digest(fields.get("csrf", ""), csrf_of(token)):
                return self.render(
                    request,
                    None,
                    "error.html",
                    403,
                    title="Refused",
                    message="this form is stale or did not come from this console; reload the page and retry",
                )
            self.sessions.forget(token)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # ---- events -----------------------------------------------------------------------------

    async def listed(
        self,
        request: Request,
        user: User,
        filters: Filters,
        read: Callable[[str], Awaitable[tuple[list[Any], str]]],
        template: str,
        live: str,
        shown: dict[str, Any] | None = None,
    ) -> Response:
        """A list page: the page ``read(page_token)`` answers, or, when its filters are refused
        (here or by the api), the page with the reason in a banner and no live stream.
        ``shown``: more for the template, which ``read`` may fill (the count)."""
        token = request.query_params.get("page_token", "")
        error, next_token = "", ""
        rows: list[Any] = []
        try:
            rows, next_token = await read(token)
        except Refused as exc:
            error = str(exc)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            error = exc.details() or "refused"
        return self.render(
            request,
            user,
            template,
            400 if error else 200,
            rows=rows,
            filters=filters,
            first_page=not token,
            next_token=next_token,
            error=error,
            live=f"{live}?{filters.query()}" if live and not error and not filters.timed else "",
            **(shown or {}),
        )

    async def counted(self, user: User, call: Any, req: Any, shown: dict[str, Any]) -> Any:
        """A list call that also asks for the count (only on a list's first page: the count
        covers every page), which ``shown["count"]`` then holds as (n, more), or
        ``shown["count_failed"]`` when the api stopped counting (it took too long)."""
        if req.page_token:
            return await call(req, **self.call(user))
        req.count_matching = True
        resp = await call(req, **self.call(user))
        if resp.matching_count_stopped:
            shown["count_failed"] = True
        else:
            shown["count"] = (resp.matching_count, resp.matching_count_more)
        return resp

    async def events(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("trigger_ref", "source_ref", "rule_ref", "reemit_of", "payload", "from", "to"))
        shown: dict[str, Any] = {}

        async def read(token: str) -> tuple[list[Any], str]:
            req = event_pb2.ListEventsRequest(
                created=filters.time_range(),
                page_size=PAGE_SIZE,
                page_token=token,
                trigger_ref=filters.values["trigger_ref"],
                source_ref=filters.values["source_ref"],
                rule_ref=filters.values["rule_ref"],
            )
            if (reemit_of := filters.id("reemit_of")) is not None:
                req.reemit_of = reemit_of
            if (contains := payload_filter(filters.values["payload"])) is not None:
                req.payload_contains.update(contains)
            resp = await self.counted(user, self.api.events.ListEvents, req, shown)
            if resp.HasField("searched_from"):
                since = resp.searched_from.ToDatetime(tzinfo=UTC)
                shown["searched_from"] = since
                shown["searched_days"] = max(math.ceil((datetime.now(UTC) - since) / timedelta(days=1)), 1)
            return list(resp.events), resp.next_page_token

        # A search is a fixed list, as a time range is: the live tail has no payload filter.
        live = "" if filters.values["payload"] else "/live/events"
        return await self.listed(request, user, filters, read, "events.html", live, shown)

    async def event(self, request: Request, user: User) -> Response:
        id_ = path_id(request)
        kw = self.call(user)
        event = await self.api.events.GetEvent(event_pb2.GetEventRequest(id=id_), **kw)
        # An event's enforcements and re-emissions are stored with it or after it: a range
        # starting at its time lets TimescaleDB leave out every older chunk (an event's id alone
        # carries no time, so each list would read all 90 days, compressed ones included).
        since = common_pb2.TimeRange(start=event.created)
        enforcements, reemits = await asyncio.gather(
            self.api.enforcements.ListEnforcements(
                enforcement_pb2.ListEnforcementsRequest(event=id_, created=since, page_size=PAGE_SIZE), **kw
            ),
            self.api.events.ListEvents(event_pb2.ListEventsRequest(reemit_of=id_, created=since, page_size=20), **kw),
        )
        return self.render(
            request,
            user,
            "event.html",
            event=event,
            enforcements=list(enforcements.enforcements),
            reemits=list(reemits.events),
            request_id=f"console:{uuid.uuid4()}",
            live=f"/live/enforcements?{urlencode({'event': id_})}",
        )

    async def reemit(self, request: Request, user: User) -> Response:
        form = await self.form(request, user)
        self.operator(user)
        request_id = form.get("request_id", "")[: limits.MAX_REQUEST_ID]
        resp = await self.api.events.ReemitEvent(
            event_pb2.ReemitEventRequest(id=path_id(request), request_id=request_id), **self.call(user)
        )
        log.info("console: %s re-emitted event %s as %s", user.name, request.path_params["id"], resp.event.id)
        return RedirectResponse(f"/events/{resp.event.id}?notice=reemitted", status_code=303)

    # ---- enforcements -----------------------------------------------------------------------

    def enforcement_filters(self, filters: Filters) -> dict[str, Any]:
        """The list filters as request fields, shared by the list and its live tail."""
        out: dict[str, Any] = {"rule_ref": filters.values["rule_ref"], "trigger_ref": filters.values["trigger_ref"]}
        if (event := filters.id("event")) is not None:
            out["event"] = event
        return out

    async def enforcements(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("rule_ref", "trigger_ref", "status", "event", "from", "to"))
        shown: dict[str, Any] = {}

        async def read(token: str) -> tuple[list[Any], str]:
            status = filters.values["status"]
            if status and status not in STATUS_BY_NAME:
                raise Refused(400, f"status: must be one of {', '.join(STATUS_BY_NAME)} (got {status[:40]!r})")
            req = enforcement_pb2.ListEnforcementsRequest(
                page_size=PAGE_SIZE,
                page_token=token,
                status=STATUS_BY_NAME.get(status, 0),  # type: ignore[arg-type]
                created=filters.time_range(),
                **self.enforcement_filters(filters),
            )
            resp = await self.counted(user, self.api.enforcements.ListEnforcements, req, shown)
            return list(resp.enforcements), resp.next_page_token

        return await self.listed(request, user, filters, read, "enforcements.html", "/live/enforcements", shown)

    async def enforcement_parts(self, user: User, id_: int) -> dict[str, Any]:
        """What the enforcement page shows, read fresh: also what a live update re-renders."""
        kw = self.call(user)
        enforcement = await self.api.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=id_), **kw)
        executions = await self.api.executions.ListExecutions(
            execution_pb2.ListExecutionsRequest(enforcement=id_, page_size=10), **kw
        )
        return {"e": enforcement, "executions": list(executions.executions)}

    async def enforcement(self, request: Request, user: User) -> Response:
        id_ = path_id(request)
        parts = await self.enforcement_parts(user, id_)
        attempts = await self.api.enforcements.ListAttempts(
            enforcement_pb2.ListAttemptsRequest(enforcement=id_), **self.call(user)
        )
        return self.render(
            request,
            user,
            "enforcement.html",
            live=f"/live/enforcements?id={id_}",
            body_status=STATUS_NAMES.get(parts["e"].status, ""),
            attempts=attempts,
            **parts,
        )

    async def retry(self, request: Request, user: User) -> Response:
        form = await self.form(request, user)
        self.operator(user)
        id_ = path_id(request)
        await self.api.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=id_), **self.call(user))
        log.info("console: %s retried enforcement %d", user.name, id_)
        # Back where the button was: the enforcement's own page, or Dispatch.
        back = f"/enforcements/{id_}" if form.get("from") == "enforcement" else "/dispatch"
        return RedirectResponse(f"{back}?notice=retried", status_code=303)

    # ---- rules and triggers -----------------------------------------------------------------

    async def rules(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("trigger_ref", "pack_ref", "enabled"))
        token = request.query_params.get("page_token", "")
        req = rule_pb2.ListRulesRequest(
            page_size=PAGE_SIZE,
            page_token=token,
            trigger_ref=filters.values["trigger_ref"],
            pack_ref=filters.values["pack_ref"],
        )
        if filters.values["enabled"] in ("yes", "no"):
            req.enabled = filters.values["enabled"] == "yes"
        resp = await self.api.rules.ListRules(req, **self.call(user))
        return self.render(
            request,
            user,
            "rules.html",
            rules=list(resp.rules),
            filters=filters,
            first_page=not token,
            next_token=resp.next_page_token,
        )

    async def rule(self, request: Request, user: User, test: dict[str, Any] | None = None) -> Response:
        ref = request.path_params["ref"]
        rule = await self.api.rules.GetRule(rule_pb2.GetRuleRequest(ref=ref), **self.call(user))
        return self.render(
            request, user, "rule.html", 400 if test and test.get("error") else 200, rule=rule, test=test or {}
        )

    async def set_rule_enabled(self, request: Request, user: User) -> Response:
        form = await self.form(request, user)
        self.operator(user)
        ref, enabled = request.path_params["ref"], form.get("enabled") == "true"
        await self.api.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(
                rule=rule_pb2.Rule(ref=ref, enabled=enabled), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
            ),
            **self.call(user),
        )
        log.info("console: %s %s rule %s", user.name, "enabled" if enabled else "disabled", ref)
        return RedirectResponse(f"/rules/{ref}?notice={'enabled' if enabled else 'disabled'}", status_code=303)

    async def test_rule(self, request: Request, user: User) -> Response:
        """TestRule with the stored rule, against a stored event or a typed payload."""
        form = await self.form(request, user)
        ref = request.path_params["ref"]
        test: dict[str, Any] = {"payload": form.get("payload", ""), "event_id": form.get("event_id", "").strip()}
        req = rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref=ref))
        try:
            if test["event_id"]:
                if (event_id := positive_id(test["event_id"])) is None:
                    raise Refused(400, "event id: must be a positive whole number")
                req.event_id = event_id
            else:
                try:
                    payload = json.loads(test["payload"] or "{}")
                except (ValueError, RecursionError) as exc:
                    raise Refused(400, f"payload: not JSON ({str(exc)[:120]})") from None
                if not isinstance(payload, dict):
                    raise Refused(400, "payload: must be a JSON object")
                try:
                    json_format.ParseDict(payload, req.payload)
                except (json_format.ParseError, RecursionError, ValueError) as exc:
                    raise Refused(400, f"payload: {str(exc)[:120]}") from None
            test["result"] = await self.api.rules.TestRule(req, **self.call(user))
        except Refused as exc:
            test["error"] = str(exc)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise
            test["error"] = exc.details() or "refused"
        return await self.rule(request, user, test)

    async def triggers(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("pack_ref",))
        token = request.query_params.get("page_token", "")
        resp = await self.api.rules.ListTriggers(
            rule_pb2.ListTriggersRequest(page_size=PAGE_SIZE, page_token=token, pack_ref=filters.values["pack_ref"]),
            **self.call(user),
        )
        return self.render(
            request,
            user,
            "triggers.html",
            triggers=list(resp.triggers),
            filters=filters,
            first_page=not token,
            next_token=resp.next_page_token,
        )

    async def trigger(self, request: Request, user: User) -> Response:
        ref = request.path_params["ref"]
        kw = self.call(user)
        trigger = await self.api.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=ref), **kw)
        rules = await self.api.rules.ListRules(rule_pb2.ListRulesRequest(trigger_ref=ref, page_size=PAGE_SIZE), **kw)
        base = str(request.base_url).rstrip("/")
        return self.render(
            request,
            user,
            "trigger.html",
            trigger=trigger,
            rules=list(rules.rules),
            webhook_url=f"{base}/webhooks/{trigger.webhook_key}" if trigger.webhook_key else "",
        )

    async def set_webhook(self, request: Request, user: User) -> Response:
        form = await self.form(request, user)
        self.operator(user)
        ref, enabled = request.path_params["ref"], form.get("enabled") == "true"
        if enabled and form.get("unsigned_ok") != "yes":
            trigger = await self.api.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=ref), **self.call(user))
            if not trigger.webhook_signed:
                # An unsigned endpoint is opened only once the person has read what that means.
                return self.render(request, user, "webhook_unsigned.html", trigger=trigger, warning=UNSIGNED_WARNING)
        await self.api.rules.UpdateTrigger(
            rule_pb2.UpdateTriggerRequest(
                trigger=rule_pb2.Trigger(ref=ref, webhook_enabled=enabled),
                update_mask=field_mask_pb2.FieldMask(paths=["webhook_enabled"]),
            ),
            **self.call(user),
        )
        log.info("console: %s %s the webhook of %s", user.name, "enabled" if enabled else "disabled", ref)
        return RedirectResponse(f"/triggers/{ref}?notice=webhook-{'on' if enabled else 'off'}", status_code=303)

    async def rotate(self, request: Request, user: User) -> Response:
        await self.form(request, user)
        self.operator(user)
        ref = request.path_params["ref"]
        await self.api.rules.RotateWebhookKey(rule_pb2.RotateWebhookKeyRequest(ref=ref), **self.call(user))
        log.info("console: %s rotated the webhook key of %s", user.name, ref)
        return RedirectResponse(f"/triggers/{ref}?notice=rotated", status_code=303)

    # ---- dispatch and volume ----------------------------------------------------------------

    async def dispatch_parts(self, user: User) -> dict[str, Any]:
        """What the Dispatch page shows, read fresh: also what its live stream re-renders."""
        kw = self.call(user)
        state = await self.api.enforcements.GetDispatchState(
            enforcement_pb2.GetDispatchStateRequest(exhausted_limit=100), **kw
        )
        executors = await self.api.enforcements.ListExecutors(enforcement_pb2.ListExecutorsRequest(), **kw)
        oldest = None
        if state.HasField("oldest_pending_age"):
            oldest = state.oldest_pending_age.ToTimedelta().total_seconds()
        return {"state": state, "oldest": oldest, "executors": executors}

    async def dispatch(self, request: Request, user: User) -> Response:
        parts = await self.dispatch_parts(user)
        return self.render(request, user, "dispatch.html", live="/live/dispatch", **parts)

    def _retry_request(self, filters: Filters, ids: list[int]) -> enforcement_pb2.RetryEnforcementsRequest:
        if ids:
            return enforcement_pb2.RetryEnforcementsRequest(ids=ids)
        req = enforcement_pb2.RetryEnforcementsRequest(
            all_exhausted=True, rule_ref=filters.values["rule_ref"], trigger_ref=filters.values["trigger_ref"]
        )
        if (window := filters.time_range()) is not None:
            req.created.CopyFrom(window)
        return req

    async def review_retry(self, request: Request, user: User) -> Response:
        """The confirmation of a bulk retry of every exhausted enforcement matching filters:
        how many match and which would go first (RetryEnforcements with validate_only)."""
        self.operator(user)
        filters = Filters.of(request, RETRY_FILTERS)
        return await self._confirm_retry(request, user, filters, [])

    async def _confirm_retry(self, request: Request, user: User, filters: Filters, ids: list[int]) -> Response:
        req = self._retry_request(filters, ids)
        req.validate_only = True
        answer = await self.api.enforcements.RetryEnforcements(req, **self.call(user))
        return self.render(
            request, user, "retry.html", filters=filters, selected=ids, ids=list(answer.ids), matched=answer.matched
        )

    async def bulk_retry(self, request: Request, user: User) -> Response:
        """A bulk retry: the ids ticked on Dispatch (``id``) or the filters of the review
        page. Without ``confirm`` it answers the confirmation page; with it, retries."""
        form = await self.form_lists(request, user)
        self.operator(user)
        ids: list[int] = []
        for text in form.get("id", [])[: limits.MAX_BATCH + 1]:
            if (id_ := positive_id(text)) is None:
                raise Refused(400, f"id: must be a positive whole number (got {text[:40]!r})")
            ids.append(id_)
        if len(ids) > limits.MAX_BATCH:
            raise Refused(400, f"at most {limits.MAX_BATCH:,} enforcements at once")
        filters = Filters({n: (form.get(n) or [""])[0].strip() for n in RETRY_FILTERS})
        if not (form.get("confirm") or [""])[0]:
            if not ids and not (form.get("all") or [""])[0]:
                raise Refused(400, "tick the enforcements to retry, or review all that match")
            return await self._confirm_retry(request, user, filters, ids)
        answer = await self.api.enforcements.RetryEnforcements(self._retry_request(filters, ids), **self.call(user))
        log.info("console: %s retried %d exhausted enforcements", user.name, len(answer.ids))
        if not answer.ids:
            return RedirectResponse("/dispatch?notice=none-retried", status_code=303)
        return RedirectResponse(f"/dispatch?notice=bulk-retried&n={len(answer.ids)}", status_code=303)

    # ---- executions and audit -----------------------------------------------------------------

    async def executions(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("action_ref", "status", "enforcement", "from", "to"))
        shown: dict[str, Any] = {}

        async def read(token: str) -> tuple[list[Any], str]:
            status = filters.values["status"]
            if status and status not in EXECUTION_STATUS_BY_NAME:
                raise Refused(400, f"status: must be one of {', '.join(EXECUTION_STATUS_BY_NAME)}")
            req = execution_pb2.ListExecutionsRequest(
                page_size=PAGE_SIZE,
                page_token=token,
                action_ref=filters.values["action_ref"],
                status=EXECUTION_STATUS_BY_NAME.get(status, 0),  # type: ignore[arg-type]
                created=filters.time_range(),
            )
            if (enforcement := filters.id("enforcement")) is not None:
                req.enforcement = enforcement
            resp = await self.counted(user, self.api.executions.ListExecutions, req, shown)
            return list(resp.executions), resp.next_page_token

        return await self.listed(request, user, filters, read, "executions.html", "", shown)

    async def execution(self, request: Request, user: User) -> Response:
        id_ = path_id(request)
        kw = self.call(user)
        execution = await self.api.executions.GetExecution(execution_pb2.GetExecutionRequest(id=id_), **kw)
        enforcement = None
        if execution.HasField("enforcement"):
            try:
                enforcement = await self.api.enforcements.GetEnforcement(
                    enforcement_pb2.GetEnforcementRequest(id=execution.enforcement), **kw
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise  # a dangling reference (retention) shows as such; anything else fails
        history = await self.api.history.ListHistory(
            history_pb2.ListHistoryRequest(entity_type="execution", entity_id=id_, page_size=50), **kw
        )
        return self.render(
            request,
            user,
            "execution.html",
            x=execution,
            enforcement=enforcement,
            history=list(history.records),
        )

    async def audit(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("principal", "rpc", "entity_type", "entity_ref", "entity_id", "from", "to"))
        shown: dict[str, Any] = {}

        async def read(token: str) -> tuple[list[Any], str]:
            req = audit_pb2.ListAuditRecordsRequest(
                page_size=PAGE_SIZE,
                page_token=token,
                principal=filters.values["principal"],
                rpc=_full_rpc(filters.values["rpc"]),
                entity_type=filters.values["entity_type"],
                entity_ref=filters.values["entity_ref"],
                time=filters.time_range(),
            )
            if (entity_id := filters.id("entity_id")) is not None:
                req.entity_id = entity_id
            resp = await self.counted(user, self.api.audit.ListAuditRecords, req, shown)
            return list(resp.records), resp.next_page_token

        return await self.listed(request, user, filters, read, "audit.html", "", shown)

    async def volume(self, request: Request, user: User) -> Response:
        span_name = request.query_params.get("range", "24h")
        if span_name not in VOLUME_RANGES:
            span_name = "24h"
        span = VOLUME_RANGES[span_name]
        per, bar = VOLUME_BARS[span_name]
        # Bars start on whole multiples of their width since the epoch (UTC midnights for
        # days), the last one holding the current hour.
        width_s = int(bar.total_seconds())
        end_s = (int(datetime.now(UTC).timestamp()) // 3600 + 1) * 3600
        end_s = -(-end_s // width_s) * width_s
        end = datetime.fromtimestamp(end_s, UTC)
        start = end - span
        window = common_pb2.TimeRange()
        window.start.FromDatetime(start)
        window.end.FromDatetime(end)
        kw = self.call(user)
        # The database sums the hours into bars: 30 days of hourly rows by trigger were 17,000
        # rows to send and convert, most of the page's time.
        hours = width_s // 3600
        # Independent reads: one waits for the other's aggregation only if they run in turn.
        events, enforcements = await asyncio.gather(
            self.api.analytics.QueryEventVolume(
                analytics_pb2.QueryEventVolumeRequest(range=window, bucket_hours=hours), **kw
            ),
            self.api.analytics.QueryEnforcementVolume(
                analytics_pb2.QueryEnforcementVolumeRequest(range=window, bucket_hours=hours), **kw
            ),
        )
        bars = [start + bar * i for i in range(int(span / bar))]
        place = _Placer(start, bar, len(bars))
        event_series = place.series((b.bucket.seconds, "events", b.event_count) for b in events.buckets)
        enforcement_series = place.series(
            (b.bucket.seconds, STATUS_NAMES.get(b.status, "other"), b.enforcement_count) for b in enforcements.buckets
        )
        by_trigger = _totals((b.trigger_ref, b.event_count) for b in events.buckets)
        by_rule = _totals((b.rule_ref, b.enforcement_count) for b in enforcements.buckets)
        return self.render(
            request,
            user,
            "volume.html",
            span=span_name,
            per=per,
            ranges=list(VOLUME_RANGES),
            event_chart=_chart(bars, bar, event_series, ("events",)),
            enforcement_chart=_chart(bars, bar, enforcement_series, ("processed", "disabled", "created")),
            by_trigger=by_trigger,
            by_rule=by_rule,
        )


@dataclass(frozen=True)
class _Placer:
    """Which bar an hourly bucket falls in, by its epoch seconds (a Timestamp's ToDatetime
    costs more than the rest of the page's arithmetic)."""

    start: datetime
    bar: timedelta
    n: int

    def series(self, points: Any) -> list[dict[str, int]]:
        out: list[dict[str, int]] = [{} for _ in range(self.n)]
        first = int(self.start.timestamp())
        width = int(self.bar.total_seconds())
        for seconds, series, count in points:
            i = (seconds - first) // width
            if 0 <= i < self.n:
                out[i][series] = out[i].get(series, 0) + int(count)
        return out


def _totals(pairs: Any) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for name, count in pairs:
        totals[name] = totals.get(name, 0) + int(count)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:20]


@dataclass
class Bar:
    x: float
    segments: list[tuple[str, float, float, int]]  # series, y, height, count
    label: str
    total: int


@dataclass
class Chart:
    width: int
    height: int
    bar_width: float
    bars: list[Bar]
    top: int
    series: tuple[str, ...]
    ticks: list[tuple[float, str]]
    total: int


def _chart(starts: list[datetime], bar: timedelta, data: list[dict[str, int]], series: tuple[str, ...]) -> Chart:
    """A stacked bar per ``bar`` of time, scaled to the busiest (an inline SVG in the template)."""
    width, height = 960, 180
    top = max([sum(v.values()) for v in data] + [1])
    step = width / max(len(starts), 1)
    bars: list[Bar] = []
    ticks: list[tuple[float, str]] = []
    every = max(len(starts) // 8, 1)
    daily = bar >= timedelta(days=1)
    for i, hour in enumerate(starts):
        counts = data[i]
        y = float(height)
        segments = []
        for name in series:
            n = counts.get(name, 0)
            if n:
                h = n / top * (height - 4)
                y -= h
                segments.append((name, y, h, n))
        label = hour.strftime("%Y-%m-%d UTC" if daily else "%Y-%m-%d %H:00 UTC")
        bars.append(Bar(i * step, segments, label, sum(counts.values())))
        if i % every == 0:
            tick = "%d %b" if daily else "%d %b %H:00" if len(starts) > 24 else "%H:00"
            ticks.append((i * step, hour.strftime(tick)))
    return Chart(width, height, max(step - 1, 1), bars, top, series, ticks, sum(b.total for b in bars))

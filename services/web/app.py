"""The Starlette application: the webhook and CloudEvents endpoints, the console and its live streams."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.web.cloudevents import CloudEvents
from services.web.cloudevents_out import CloudEventStream
from services.web.console import Console, Stubs
from services.web.editing import Editing
from services.web.live import Live
from services.web.render import HERE
from services.web.session import Sessions
from services.web.webhooks import Webhooks
from shared import tracing
from shared.config import WebConfig
from shared.gen.automation.v1 import auth_pb2_grpc, cloudevent_pb2_grpc, event_pb2_grpc, webhook_pb2_grpc
from shared.transport import open_channel

log = logging.getLogger("services.web")


def create_app(config: WebConfig, channel: grpc.aio.Channel | None = None) -> Starlette:
    """The web application; ``channel`` (else one opened from ``config``) reaches the api."""
    parts: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = channel is None
        # Tracing on (shared/tracing.py): a client span for every call to the api.
        ch = channel or open_channel(config.target, config.security, interceptors=tracing.client_interceptors())
        hooks = parts["webhooks"] = Webhooks(config, webhook_pb2_grpc.WebhookServiceStub(ch))
        parts["cloudevents"] = CloudEvents(
            config,
            cloudevent_pb2_grpc.CloudEventServiceStub(ch),
            webhook_pb2_grpc.WebhookServiceStub(ch),
            hooks.budget,
            event_pb2_grpc.EventServiceStub(ch),
        )
        sessions = Sessions(auth_pb2_grpc.AuthServiceStub(ch), config.rpc_timeout_s)
        console = parts["console"] = Console(config, Stubs(ch), sessions)
        parts["editing"] = Editing(console)
        live = parts["live"] = Live(console)
        parts["cloudevents_out"] = CloudEventStream(live)
        try:
            yield
        finally:
            if own:
                await ch.close()

    async def webhook(request: Request) -> Response:
        hooks: Webhooks = parts["webhooks"]
        return await hooks.deliver(request)

    async def cloudevent(request: Request) -> Response:
        endpoint: CloudEvents = parts["cloudevents"]
        if request.method == "OPTIONS":
            return await endpoint.handshake(request)
        return await endpoint.deliver(request)

    async def cloudevent_publish(request: Request) -> Response:
        endpoint: CloudEvents = parts["cloudevents"]
        return await endpoint.publish(request)

    async def cloudevent_stream(request: Request) -> Response:
        endpoint: CloudEventStream = parts["cloudevents_out"]
        return await endpoint.stream(request)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def home(request: Request) -> Response:
        return RedirectResponse("/enforcements", status_code=303)

    def public(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            handler = getattr(parts["console"], name)
            response: Response = await handler(request)
            return response

        return endpoint

    def page(owner: str, name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            console: Console = parts["console"]
            wrapped = console.page(getattr(parts[owner], name))
            return await wrapped(request)

        return endpoint

    def console_route(path: str, name: str, methods: list[str], owner: str = "console") -> Route:
        return Route(path, page(owner, name), methods=methods)

    async def hung_up(request: Request, exc: Exception) -> Response:
        # One line, not a traceback: a client leaving mid-body is ordinary on the internet.
        log.info("%s %s: the client hung up before its body arrived", request.method, request.url.path[:40])
        return Response(status_code=400)

    return Starlette(
        exception_handlers={ClientDisconnect: hung_up},
        routes=[
            Route("/webhooks/{key}", webhook, methods=["POST"]),
            # Before the key's route: "stream" is no webhook key (those are wh_ and 32 hex digits).
            Route("/cloudevents", cloudevent_publish, methods=["POST"]),
            Route("/cloudevents/stream", cloudevent_stream, methods=["GET"]),
            Route("/cloudevents/{key}", cloudevent, methods=["POST", "OPTIONS"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/", home, methods=["GET"]),
            Route("/signin", public("signin_page"), methods=["GET"]),
            Route("/signin", public("signin"), methods=["POST"]),
            Route("/signout", public("signout"), methods=["POST"]),
            console_route("/events", "events", ["GET"]),
            console_route("/events/{id}", "event", ["GET"]),
            console_route("/events/{id}/reemit", "reemit", ["POST"]),
            console_route("/enforcements", "enforcements", ["GET"]),
            console_route("/enforcements/{id}", "enforcement", ["GET"]),
            console_route("/enforcements/{id}/retry", "retry", ["POST"]),
            console_route("/rules", "rules", ["GET"]),
            # Before the ref's routes: "new" is no ref (those are pack.name).
            console_route("/rules/new", "new_rule", ["GET"], owner="editing"),
            console_route("/rules/new", "create_rule", ["POST"], owner="editing"),
            console_route("/rules/{ref}/edit", "edit_rule", ["GET"], owner="editing"),
            console_route("/rules/{ref}/edit", "update_rule", ["POST"], owner="editing"),
            console_route("/rules/{ref}/delete", "confirm_delete_rule", ["GET"], owner="editing"),
            console_route("/rules/{ref}/delete", "delete_rule", ["POST"], owner="editing"),
            console_route("/rules/{ref}", "rule", ["GET"]),
            console_route("/rules/{ref}/enabled", "set_rule_enabled", ["POST"]),
            console_route("/rules/{ref}/test", "test_rule", ["POST"]),
            console_route("/triggers", "triggers", ["GET"]),
            console_route("/triggers/new", "new_trigger", ["GET"], owner="editing"),
            console_route("/triggers/new", "create_trigger", ["POST"], owner="editing"),
            console_route("/triggers/{ref}/edit", "edit_trigger", ["GET"], owner="editing"),
            console_route("/triggers/{ref}/edit", "update_trigger", ["POST"], owner="editing"),
            console_route("/triggers/{ref}/delete", "confirm_delete_trigger", ["GET"], owner="editing"),
            console_route("/triggers/{ref}/delete", "delete_trigger", ["POST"], owner="editing"),
            console_route("/triggers/{ref}", "trigger", ["GET"]),
            console_route("/triggers/{ref}/webhook", "set_webhook", ["POST"]),
            console_route("/triggers/{ref}/rotate", "rotate", ["POST"]),
            console_route("/dispatch", "dispatch", ["GET"]),
            console_route("/dispatch/retry", "review_retry", ["GET"]),
            console_route("/dispatch/retry", "bulk_retry", ["POST"]),
            console_route("/executions", "executions", ["GET"]),
            console_route("/executions/{id}", "execution", ["GET"]),
            console_route("/audit", "audit", ["GET"]),
            console_route("/volume", "volume", ["GET"]),
            console_route("/live/events", "events", ["GET"], owner="live"),
            console_route("/live/enforcements", "enforcements", ["GET"], owner="live"),
            console_route("/live/dispatch", "dispatch", ["GET"], owner="live"),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        lifespan=lifespan,
    )

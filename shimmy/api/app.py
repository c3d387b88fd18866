"""The Starlette application: routes, middleware, error handlers and lifecycle.

Nothing lives at module level: ``create_app`` builds a fresh app whose state (settings, model
registry, start time, request counter) sits on ``app.state``, so several apps can coexist in one
process (the tests start many).

Middleware is pure ASGI rather than ``BaseHTTPMiddleware``: the latter buffers through its own
task and breaks streaming responses and disconnect detection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shimmy.api import errors, metrics, openapi
from shimmy.api.access_log import AccessLogMiddleware
from shimmy.api.admin import routes as admin
from shimmy.api.admin import system
from shimmy.api.anthropic import routes as anthropic
from shimmy.api.auth_failures import AuthFailureMiddleware
from shimmy.api.body_rate import BodyRateMiddleware
from shimmy.api.llamacpp import routes as llamacpp
from shimmy.api.locallab import routes as locallab
from shimmy.api.native import routes as native
from shimmy.api.ollama import routes as ollama
from shimmy.api.openai import routes as openai
from shimmy.api.ratelimit import RateLimitMiddleware
from shimmy.api.responses import routes as responses
from shimmy.api.responses.store import ResponseStore
from shimmy.api.rkllama import routes as rkllama
from shimmy.api.routing import RouteAccess
from shimmy.api.security import ApiKeyMiddleware, HostOriginMiddleware
from shimmy.api.ws import routes as ws
from shimmy.engine.protocol import EngineHooks
from shimmy.errors import PayloadTooLarge, ShimmyError, unexpected_error
from shimmy.registry import ModelRegistry
from shimmy.serving.lanes import Lanes
from shimmy.settings import Settings
from shimmy.web import routes as web

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The server cannot start with these settings (e.g. the default model does not exist)."""


class CatchAllMiddleware:
    """Turn any exception that escaped the handlers into a 500 ``server_error``.

    The traceback is logged here and never sent. If the response had already started there is
    nothing left to send; the server then closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            err = exc if isinstance(exc, ShimmyError) else unexpected_error(exc)
            if started:
                return
            if scope["type"] == "http":
                await errors.error_response(err, HTTPConnection(scope))(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1011})


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 ``payload_too_large``.

    A declared Content-Length over the limit is refused before reading anything; a chunked body
    is counted as it streams in and the read fails once it crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # The body is not read: the connection ends after the answer (lingering, so that
            # a client still sending it gets to read the 413).
            response = errors.error_response(
                self._too_large(), HTTPConnection(scope), {"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body may hold at most {self.max_bytes} bytes")


class RequestCounterMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["app"].state.request_count += 1
        await self.app(scope, receive, send)


def route_table(settings: Settings) -> list[BaseRoute]:
    """Every route the app serves, in matching order, each declaring its facts
    (``shimmy.api.routing``): ``/openapi.json`` and the middleware read them from here."""
    return [
        *native.routes,
        *admin.routes,
        *ws.routes,
        Mount("/v1", routes=[*openai.routes, *responses.routes, *anthropic.routes]),
        *openapi.routes,
        *system.routes,
        *metrics.routes,
        *locallab.routes,
        # Ollama's and RKLLama's paths collide with the native ones: each has its prefix
        # (and Ollama its own port too: shimmy.api.ollama.listener).
        Mount("/ollama", routes=ollama.routes),
        Mount("/rkllama", routes=rkllama.routes),
        *llamacpp.routes,
        *(web.routes if settings.web_ui else []),
    ]


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app_registry: ModelRegistry = app.state.registry
        try:
            await asyncio.to_thread(app_registry.discover)
            if settings.default_model:
                app_registry.resolve(None)  # an unusable default must stop startup, not requests
        except ShimmyError as err:
            raise StartupError(f"cannot start: {err}") from None
        app.state.started_at = time.monotonic()
        app_registry.start()
        try:
            yield
        finally:
            await app_registry.aclose()

    routes = route_table(settings)
    # Which requests need no key and which the rate limit lets through: the routes say. The
    # page's paths keep their facts when the page is off, so a browser there gets a plain 404
    # rather than a request for a key.
    access = RouteAccess.of([*routes, *([] if settings.web_ui else web.routes)])
    app = Starlette(
        routes=routes,
        middleware=[
            # Outermost, so responses made by the middleware below are logged and counted too.
            Middleware(AccessLogMiddleware),
            Middleware(metrics.MetricsMiddleware),
            Middleware(CatchAllMiddleware),
            Middleware(RequestCounterMiddleware),
            # Order matters: foreign hosts and origins are refused before anything else (and
            # preflights answered without a key); failed key checks still cost a token.
            Middleware(HostOriginMiddleware, settings=settings),
            Middleware(RateLimitMiddleware, settings=settings, access=access),
            Middleware(AuthFailureMiddleware, settings=settings, access=access),
            Middleware(ApiKeyMiddleware, settings=settings, access=access),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
            Middleware(
                BodyRateMiddleware, grace=settings.body_timeout, min_rate=settings.body_min_rate
            ),
        ],
        exception_handlers={
            ShimmyError: errors.handle_shimmy_error,
            ValidationError: errors.handle_validation_error,
            HTTPException: errors.handle_http_exception,
            # Backstop only: CatchAllMiddleware sees unexpected exceptions first.
            Exception: errors.handle_unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry if registry is not None else ModelRegistry(settings)
    # Every generation of every engine reports its tokens and latencies to this app's metrics.
    # An observer rather than a constructor hook: the metrics read the registry they observe,
    # and a registry handed in by the caller must report to this app all the same.
    app_metrics = metrics.metrics_for(app)
    app.state.registry.observe(
        EngineHooks(on_finish=app_metrics.engine_finished, on_crash=app_metrics.engine_crashed)
    )
    app.state.started_at = time.monotonic()
    app.state.request_count = 0
    app.state.responses = ResponseStore(settings.responses_store_size)
    # Cancel-and-replace lanes of code completions sent with an X-Client-Id.
    app.state.lanes = Lanes()
    return app

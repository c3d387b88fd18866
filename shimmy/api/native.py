"""The native Shimmy REST API: ``/api/generate``, ``/api/models``, ``/api/health``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shimmy import __version__
from shimmy.api.access_log import annotate
from shimmy.api.errors import native_error_body, unexpected_error
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.schemas import parse_generate_request, parse_json, to_generation
from shimmy.api.sse import DONE, EventStreamResponse, sse_event, wait_for_disconnect
from shimmy.engine.types import Event, Finished, TextDelta
from shimmy.errors import GenerationFailed, ShimmyError

if TYPE_CHECKING:
    from shimmy.engine.protocol import Stream as GenerationStream
    from shimmy.registry import ModelRegistry


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def generate(request: Request) -> Response:
    settings = request.app.state.settings
    body = parse_generate_request(parse_json(await request.body()))
    engine = await _registry(request).get_engine(
        body.model, keep_alive=body.keep_alive, wait=wants_to_wait(request)
    )
    annotate(request, model=engine.entry.id)
    generation = await to_generation(body, engine, settings)
    created = int(time.time())
    stream = engine.submit(generation)
    if body.stream:
        return await _streaming_response(stream)
    text, finished = await _collect_unless_disconnected(stream, request)
    annotate(request, usage=finished.usage)
    return JSONResponse(
        {
            "id": f"gen-{uuid.uuid4().hex}",
            "model": engine.entry.id,
            "created": created,
            "choices": [{"text": text, "index": 0, "finish_reason": finished.finish_reason}],
            "usage": finished.usage.as_dict(),
        }
    )


async def _collect_unless_disconnected(
    stream: GenerationStream, request: Request
) -> tuple[str, Finished]:
    """Collect the whole text, but stop generating as soon as the client hangs up."""
    collect = asyncio.ensure_future(stream.collect())
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            stream.cancel()  # the client is gone; what is collected so far goes nowhere
        return await collect
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        if not collect.done():
            collect.cancel()
        stream.cancel()


async def _streaming_response(stream: GenerationStream) -> Response:
    # Pull the first event before answering: failures that happen before any text (context
    # exceeded, a full queue) still get a proper status code and a JSON error body.
    try:
        first = await anext(stream)
    except BaseException:
        stream.cancel()
        raise
    return EventStreamResponse(_sse_events(stream, first))


async def _sse_events(stream: GenerationStream, first: Event) -> AsyncGenerator[bytes, None]:
    try:
        event = first
        while isinstance(event, TextDelta):
            if event.text:
                yield sse_event(
                    {"choices": [{"text": event.text, "index": 0, "finish_reason": None}]}
                )
            event = await anext(stream)
        yield sse_event(
            {
                "choices": [{"text": "", "index": 0, "finish_reason": event.finish_reason}],
                "usage": event.usage.as_dict(),
            }
        )
    except ShimmyError as err:
        yield sse_event(native_error_body(err))
    except StopAsyncIteration:
        yield sse_event(native_error_body(GenerationFailed("the generation ended unexpectedly")))
    except Exception as exc:
        yield sse_event(native_error_body(unexpected_error(exc)))
    finally:
        stream.cancel()
    yield DONE


async def list_models(request: Request) -> Response:
    registry = _registry(request)
    models = [entry.to_api(loaded=registry.is_loaded(entry.id)) for entry in registry.entries]
    return JSONResponse({"models": models, "default": registry.default_id})


def format_bytes(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}GB"
    return f"{size / (1 << 20):.1f}MB"


def slot_summary(registry: ModelRegistry) -> dict[str, int]:
    """Busy/total/queued generation slots over every loaded model."""
    summary = {"busy": 0, "total": 0, "queued": 0}
    for engine in registry.loaded_engines():
        stats: dict[str, Any] = engine.stats()
        summary["busy"] += int(stats.get("busy", 0))
        summary["total"] += int(stats.get("slots", 0))
        summary["queued"] += int(stats.get("queued", 0))
    return summary


async def health(request: Request) -> Response:
    state = request.app.state
    registry = _registry(request)
    return JSONResponse(
        {
            "status": "healthy",
            "models_loaded": registry.loaded_count(),
            "memory_usage": format_bytes(psutil.Process().memory_info().rss),
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - state.started_at, 1),
            "requests_total": state.request_count,
            "slots": slot_summary(registry),
        }
    )


routes: list[BaseRoute] = [
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/models", list_models, methods=["GET"]),
    Route("/api/health", health, methods=["GET"]),
]

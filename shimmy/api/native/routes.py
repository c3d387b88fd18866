"""The native Shimmy REST API: ``/api/generate``, ``/api/generate/batch``, ``/api/models``,
``/api/health``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy import __version__
from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import native_error_body
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.native.foreign import OLLAMA_GENERATE_FIELDS, refuse_ollama_requests
from shimmy.api.native.protocol import (
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelList,
    parse_batch_request,
    parse_generate_request,
)
from shimmy.api.protocol.common import parse_json
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import DONE, EventStreamResponse, sse_event
from shimmy.engine.types import Finished, TextDelta
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare
from shimmy.serving.run import collect, collect_one, frames, start, total_usage

if TYPE_CHECKING:
    from shimmy.registry import ModelRegistry


class NativeEvents:
    """``data: {"choices": [{"text", "index", "finish_reason"}]}`` events, then ``[DONE]``."""

    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        if not event.text:
            return ()
        return (sse_event({"choices": [{"text": event.text, "index": 0, "finish_reason": None}]}),)

    def finished(self, event: Finished) -> Iterable[bytes]:
        choice = {"text": "", "index": 0, "finish_reason": event.finish_reason}
        return (sse_event({"choices": [choice], "usage": event.usage.as_dict()}),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(native_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        return (DONE,)


async def generate(request: Request) -> Response:
    data = parse_json(await request.body())
    refuse_ollama_requests(request, data, OLLAMA_GENERATE_FIELDS)
    body = parse_generate_request(data)
    engine = await registry_of(request).get_engine(
        body.model, keep_alive=body.keep_alive, wait=wants_to_wait(request)
    )
    annotate(request, model=engine.entry.id)
    prepared = await prepare(engine, body.to_input(), Dialect.NATIVE, settings_of(request))
    created = int(time.time())
    if body.stream:
        return EventStreamResponse(frames(await start(engine, prepared), NativeEvents()))
    result = await collect_one(engine, prepared, until=client_gone(request))
    annotate(request, usage=result.finished.usage)
    choice = {"text": result.text, "index": 0, "finish_reason": result.finished.finish_reason}
    return JSONResponse(
        {
            "id": f"gen-{uuid.uuid4().hex}",
            "model": engine.entry.id,
            "created": created,
            "choices": [choice],
            "usage": result.finished.usage.as_dict(),
        }
    )


async def generate_batch(request: Request) -> Response:
    """Several prompts, one set of options, one answer. The prompts are queued atomically: all
    are accepted or none, and they start decoding in the same batch when slots are free. If
    the client hangs up, every generation of the batch is cancelled."""
    prompts, shared = parse_batch_request(parse_json(await request.body()))
    engine = await registry_of(request).get_engine(
        shared.model, keep_alive=shared.keep_alive, wait=wants_to_wait(request)
    )
    created = int(time.time())
    settings = settings_of(request)
    check_batch_capacity(engine.n_parallel + engine.settings.max_queue, len(prompts))
    prepared = [
        await prepare(engine, shared.to_input(prompt), Dialect.NATIVE, settings)
        for prompt in prompts
    ]
    results = raise_first_failure(await collect(engine, prepared, until=client_gone(request)))
    totals = total_usage(result.finished.usage for result in results)
    annotate(request, model=engine.entry.id, usage=totals)
    return JSONResponse(
        {
            "id": f"batch-{uuid.uuid4().hex}",
            "model": engine.entry.id,
            "created": created,
            "responses": [
                {
                    "index": index,
                    "text": result.text,
                    "finish_reason": result.finished.finish_reason,
                    "usage": result.finished.usage.as_dict(),
                }
                for index, result in enumerate(results)
            ],
            "usage": totals.as_dict(),
        }
    )


def check_batch_capacity(capacity: int, count: int) -> None:
    if count > capacity:
        raise InvalidRequest(
            f"this model takes at most {capacity} prompts at once; got {count}", param="prompts"
        )


def raise_first_failure(results: list[Any]) -> list[Any]:
    """The results of a batch, or the failure of its lowest-numbered prompt, naming it."""
    for index, result in enumerate(results):
        if isinstance(result, ShimmyError):
            raise result.copy_with(
                param=f"prompts.{index}",
                details=f"prompt {index}: {result.details or result.message}",
            )
    return results


async def list_models(request: Request) -> Response:
    registry = registry_of(request)
    models = [registry.describe(entry) for entry in registry.entries]
    return JSONResponse({"models": models, "default": registry.default_id})


def format_bytes(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}GB"
    return f"{size / (1 << 20):.1f}MB"


def prompt_cache_summary(registry: ModelRegistry) -> dict[str, int]:
    """The host-memory prompt caches of every loaded model, together."""
    summary = {"entries": 0, "bytes": 0, "limit_bytes": 0}
    for engine in registry.loaded_engines():
        stats: dict[str, Any] = engine.stats()
        for key in summary:
            summary[key] += int(stats.get(f"prompt_cache_{key}", 0))
    return summary


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
    registry = registry_of(request)
    return JSONResponse(
        {
            "status": "healthy",
            "models_loaded": registry.loaded_count(),
            "memory_usage": format_bytes(psutil.Process().memory_info().rss),
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - state.started_at, 1),
            "requests_total": state.request_count,
            "slots": slot_summary(registry),
            "prompt_cache": prompt_cache_summary(registry),
        }
    )


TAGS = ["native"]

routes: list[BaseRoute] = [
    api_route(
        "/api/generate",
        generate,
        methods=["POST"],
        summary="Generate text from a prompt or messages",
        description='Streamed (`"stream": true`): `data: {"choices": [{"text", "index", '
        '"finish_reason"}]}` events; the last one has the finish reason and `usage`.',
        body=GenerateRequest,
        response=GenerateResponse,
        streams=[SSE],
        response_description="The generation, or its stream of events",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/generate/batch",
        generate_batch,
        methods=["POST"],
        summary="Generate for several prompts at once",
        body=BatchRequest,
        response=BatchResponse,
        response_description="One answer per prompt, in order",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/models",
        list_models,
        methods=["GET"],
        summary="List the models found",
        response=ModelList,
        response_description="The models",
        tags=TAGS,
    ),
    api_route(
        "/api/health",
        health,
        methods=["GET"],
        summary="Health and resource usage",
        response=Health,
        response_description="The server is up",
        # Monitors poll it without secrets, and it costs nothing.
        public=True,
        rate_limited=False,
        tags=TAGS,
    ),
]

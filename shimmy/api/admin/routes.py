"""Model lifecycle endpoints: load, unload, loaded, discover, pull, delete."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from shimmy.api.admin.gate import check_model_admin
from shimmy.api.admin.protocol import (
    DeleteResult,
    LoadedModels,
    LoadRequest,
    LoadResult,
    PullEvent,
    PullRequest,
    UnloadResult,
)
from shimmy.api.keepalive import parse_keep_alive, wants_to_wait
from shimmy.api.native.foreign import OLLAMA_PULL_FIELDS, refuse_ollama_requests
from shimmy.api.native.protocol import ModelList
from shimmy.api.protocol.common import parse_json
from shimmy.api.routing import BAD_REQUEST, GENERATION_ERRORS, NDJSON, api_route
from shimmy.errors import InvalidRequest, ModelNotFound
from shimmy.models.pull import PullError, PullSuccess, parse_source, pull_model
from shimmy.models.pull import PullEvent as PullProgressEvent
from shimmy.models.remove import remove_model_files
from shimmy.models.safepath import validate_model_id
from shimmy.registry import ModelRegistry


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def _optional_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return data


def _keep_alive(body: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="keep_alive") from None


async def load_model(request: Request) -> Response:
    registry = _registry(request)
    body = await _optional_body(request)
    model_id = validate_model_id(request.path_params["id"], param="id")
    was_loaded = registry.is_loaded(registry.resolve(model_id).id)
    engine = await registry.get_engine(
        model_id, keep_alive=_keep_alive(body), wait=wants_to_wait(request)
    )
    return JSONResponse(
        {
            "id": engine.entry.id,
            "loaded": True,
            "already_loaded": was_loaded,
            "load_seconds": round(engine.load_seconds, 3),
            "memory_bytes": engine.memory_bytes,
        }
    )


async def unload_model(request: Request) -> Response:
    registry = _registry(request)
    entry = registry.resolve(validate_model_id(request.path_params["id"], param="id"))
    unloaded = await registry.unload(entry.id)
    return JSONResponse({"id": entry.id, "unloaded": unloaded})


async def loaded_models(request: Request) -> Response:
    registry = _registry(request)
    now = time.monotonic()
    models = []
    for engine in registry.loaded_engines():
        stats = engine.stats()
        idle = 0.0 if engine.in_flight else now - engine.last_used
        models.append(
            {
                "id": engine.entry.id,
                "loaded_at": int(engine.loaded_at),
                "memory_bytes": engine.memory_bytes,
                "idle_seconds": round(idle, 3),
                "keep_alive": engine.keep_alive,
                "expires_in": (
                    None if engine.keep_alive < 0 else round(max(0.0, engine.keep_alive - idle), 3)
                ),
                "busy": stats["busy"],
                "queued": stats["queued"],
                "slots": stats["slots"],
                "context_length": engine.n_ctx,
                "n_gpu_layers": engine.n_gpu_layers,
                "load_count": registry.load_counts.get(engine.entry.id, 0),
                "worker_pid": stats.get("worker_pid"),
            }
        )
    failed = [{"id": model_id, **f.to_api()} for model_id, f in registry.failures.items()]
    return JSONResponse({"models": models, "loading": registry.loading_ids(), "failed": failed})


async def rediscover(request: Request) -> Response:
    registry = _registry(request)
    entries = await asyncio.to_thread(registry.discover)
    return JSONResponse(
        {
            "models": [registry.describe(e) for e in entries],
            "default": registry.default_id,
        }
    )


async def delete_model(request: Request) -> Response:
    registry = _registry(request)
    settings = request.app.state.settings
    check_model_admin(settings)
    model_id = validate_model_id(request.path_params["id"], param="id")
    # Not resolve(): a broken file must be deletable, and "default" must never alias here.
    entry = next((e for e in registry.entries if e.id == model_id), None)
    if entry is None:
        raise ModelNotFound(f"Model '{model_id}' is not available")
    await registry.unload(entry.id)
    removed = await asyncio.to_thread(remove_model_files, entry, settings)
    await asyncio.to_thread(registry.discover)
    return JSONResponse({"id": model_id, "deleted": [str(p) for p in removed]})


async def pull(request: Request) -> Response:
    registry = _registry(request)
    settings = request.app.state.settings
    check_model_admin(settings)
    body = await _optional_body(request)
    refuse_ollama_requests(request, body, OLLAMA_PULL_FIELDS)
    source = parse_source(body.get("model"), param="model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false", param="stream")
    events = pull_model(source, settings)
    first = await anext(events)  # invalid input raises here, before any byte is sent

    if not stream:
        last = first
        try:
            async for event in events:
                last = event
        finally:
            await events.aclose()
        if isinstance(last, PullError):
            raise last.to_error()
        await asyncio.to_thread(registry.discover)
        return JSONResponse(last.as_dict())

    async def ndjson() -> AsyncGenerator[bytes, None]:
        try:
            event: PullProgressEvent = first
            yield (json.dumps(event.as_dict()) + "\n").encode()
            async for event in events:
                if isinstance(event, PullSuccess):
                    await asyncio.to_thread(registry.discover)
                yield (json.dumps(event.as_dict()) + "\n").encode()
        finally:
            # A client that hangs up stops the download; the partial file stays for a resume.
            await events.aclose()

    return StreamingResponse(ndjson(), media_type="application/x-ndjson")


TAGS = ["models"]

routes: list[BaseRoute] = [
    api_route(
        "/api/models/loaded",
        loaded_models,
        methods=["GET"],
        summary="Models in memory",
        response=LoadedModels,
        response_description="Loaded models",
        tags=TAGS,
    ),
    api_route(
        "/api/models/discover",
        rediscover,
        methods=["POST"],
        summary="Search the model folders again",
        response=ModelList,
        response_description="The models",
        tags=TAGS,
    ),
    api_route(
        "/api/models/{id:path}/load",
        load_model,
        methods=["POST"],
        summary="Load a model into memory",
        body=LoadRequest,
        body_required=False,
        response=LoadResult,
        response_description="The model is loaded",
        errors={**GENERATION_ERRORS, 507: "Not enough memory"},
        tags=TAGS,
    ),
    api_route(
        "/api/models/{id:path}/unload",
        unload_model,
        methods=["POST"],
        summary="Unload a model",
        response=UnloadResult,
        response_description="Done (unloaded is false when it was not loaded)",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/models/{id:path}",
        delete_model,
        methods=["DELETE"],
        summary="Delete a model's files from shimmy's own models folder",
        response=DeleteResult,
        response_description="The files removed",
        errors={
            **BAD_REQUEST,
            403: "Not shimmy's own file, or model admin is off (public bind without a key)",
            404: "No such model",
        },
        tags=TAGS,
    ),
    api_route(
        "/api/pull",
        pull,
        methods=["POST"],
        summary="Download a model",
        description="Streamed (the default): one JSON progress event per line, the last one "
        "`success` or `error`.",
        body=PullRequest,
        response=PullEvent,
        streams=[NDJSON],
        response_description="Progress events (NDJSON), or the last event when stream is false",
        errors={
            **BAD_REQUEST,
            403: "The source is refused, or model admin is off (code `forbidden`)",
            404: "No such file at the source (code `not_found`)",
            409: "A different file of that name exists (code `already_exists`)",
            422: "The download is not a usable model (code `model_unusable`)",
            502: "The download failed (codes `download_failed`, `download_corrupt`, `offline`)",
            507: "Not enough disk space (code `insufficient_storage`)",
        },
        tags=TAGS,
    ),
]

"""Ollama's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/copy``,
``/api/delete``, ``/api/embed``, ``/api/embeddings``, ``/api/version`` and ``/``.

Digests are the sha256 of the model file, computed in the background (``DigestCache``): until
one is known the field is empty. ``/api/show`` and ``/api/ps`` give the context the server
really serves (the configured ``ctx_size`` within the model's own), which is what clients such
as Continue size their prompts by.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from shimmy.api.access_log import annotate
from shimmy.api.context import registry_of, settings_of
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.ollama.names import (
    details,
    find_entry,
    id_for_name,
    modified_at,
    ollama_name,
    rfc3339,
)
from shimmy.api.ollama.protocol import (
    OllamaCopyRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaModelRequest,
)
from shimmy.api.protocol.common import parse_body
from shimmy.errors import Conflict, InvalidRequest
from shimmy.models.copy import copy_model_files
from shimmy.models.digests import DigestCache
from shimmy.models.remove import remove_model_files

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.models.entry import ModelEntry

# The Ollama release whose API this one follows (clients compare it to their own).
OLLAMA_VERSION = "0.12.0"
# What Ollama reports as the expiry of a model kept loaded for good.
FOREVER = 300 * 365 * 24 * 3600.0
CAPABILITIES = ["completion", "tools"]


def digests_of(request: Request) -> DigestCache:
    state = request.app.state
    cache: DigestCache | None = getattr(state, "ollama_digests", None)
    if cache is None:
        cache = DigestCache(settings_of(request).cache_dir / "digests.json")
        state.ollama_digests = cache
    return cache


def _listed(request: Request, entry: ModelEntry) -> dict[str, Any]:
    name = ollama_name(entry)
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at(entry),
        "size": entry.size_bytes,
        "digest": digests_of(request).get(entry) or "",
        "details": details(entry),
    }


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


async def tags(request: Request) -> Response:
    entries = [entry for entry in registry_of(request).entries if entry.usable]
    return JSONResponse({"models": [_listed(request, entry) for entry in entries]})


def served_context(request: Request, entry: ModelEntry) -> int:
    """The context one request gets: the loaded engine's, else what loading would give."""
    registry = registry_of(request)
    for engine in registry.loaded_engines():
        if engine.entry.id == entry.id:
            return int(engine.n_ctx)
    overrides = registry.config.options_for(entry.id).settings_overrides()
    configured = int(overrides.get("ctx_size", settings_of(request).ctx_size))
    return min(configured, entry.context_length or configured)


async def show(request: Request) -> Response:
    body = parse_body(OllamaModelRequest, await request.body())
    registry = registry_of(request)
    entry = find_entry(registry, body.model)
    context = served_context(request, entry)
    architecture = entry.architecture or "unknown"
    sampling = registry.config.options_for(entry.id).sampling.values()
    parameters = [f"num_ctx {context}"]
    parameters += [f"{name} {value}" for name, value in sorted(sampling.items())]
    template = entry.chat_template or ""
    model_info: dict[str, Any] = {
        "general.architecture": architecture,
        "general.parameter_count": entry.parameter_count or 0,
        f"{architecture}.context_length": context,
    }
    modelfile = f"# Modelfile of {entry.id}, served by shimmy\nFROM {entry.path}\n"
    modelfile += "".join(f"PARAMETER {line}\n" for line in parameters)
    return JSONResponse(
        {
            "modelfile": modelfile,
            "parameters": "\n".join(parameters),
            "template": template,
            "license": "",
            "details": details(entry),
            "model_info": model_info,
            "capabilities": CAPABILITIES,
            "modified_at": modified_at(entry),
        }
    )


def _expires_at(engine: Engine) -> str:
    if engine.keep_alive < 0:
        return rfc3339(time.time() + FOREVER)
    idle = 0.0 if engine.in_flight else time.monotonic() - engine.last_used
    return rfc3339(time.time() + max(0.0, engine.keep_alive - idle))


async def ps(request: Request) -> Response:
    models = []
    for engine in registry_of(request).loaded_engines():
        entry = engine.entry
        name = ollama_name(entry)
        on_gpu = engine.n_gpu_layers != 0
        models.append(
            {
                "name": name,
                "model": name,
                "size": engine.memory_bytes,
                "digest": digests_of(request).get(entry) or "",
                "details": details(entry),
                "expires_at": _expires_at(engine),
                "size_vram": engine.memory_bytes if on_gpu else 0,
                "context_length": engine.n_ctx,
            }
        )
    return JSONResponse({"models": models})


async def copy(request: Request) -> Response:
    body = parse_body(OllamaCopyRequest, await request.body())
    registry = registry_of(request)
    entry = find_entry(registry, body.source)
    new_id = id_for_name(body.destination)
    if any(e.id == new_id for e in registry.entries):
        raise Conflict(f"a model named '{new_id}' already exists", param="destination")
    await asyncio.to_thread(copy_model_files, entry, new_id, settings_of(request))
    await asyncio.to_thread(registry.discover)
    return Response(status_code=200)


async def delete(request: Request) -> Response:
    body = parse_body(OllamaModelRequest, await request.body())
    registry = registry_of(request)
    entry = find_entry(registry, body.model)
    await registry.unload(entry.id)
    await asyncio.to_thread(remove_model_files, entry, settings_of(request))
    await asyncio.to_thread(registry.discover)
    return Response(status_code=200)


def _truncated(vector: list[float], dimensions: int | None) -> list[float]:
    if dimensions is None or dimensions == len(vector):
        return vector
    if dimensions > len(vector):
        raise InvalidRequest(
            f"this model's embeddings have {len(vector)} dimensions", param="dimensions"
        )
    # As Ollama does: keep the first dimensions and normalize them again.
    kept = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in kept))
    return [x / norm for x in kept] if norm > 0 else kept


async def _embed(request: Request, name: str, texts: list[str], keep_alive: float | None) -> Any:
    begun = time.monotonic_ns()
    entry = find_entry(registry_of(request), name)
    engine = await registry_of(request).get_engine(
        entry.id, keep_alive=keep_alive, wait=wants_to_wait(request)
    )
    loaded = time.monotonic_ns()
    annotate(request, model=engine.entry.id)
    result = await engine.embed(texts)
    return result, loaded - begun, time.monotonic_ns() - begun


async def embed(request: Request) -> Response:
    body = parse_body(OllamaEmbedRequest, await request.body())
    result, load, total = await _embed(request, body.model, body.texts(), body.keep_alive)
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": [_truncated(v, body.dimensions) for v in result.vectors],
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings(request: Request) -> Response:
    body = parse_body(OllamaEmbeddingsRequest, await request.body())
    if not body.prompt:
        # Ollama answers an empty prompt with an empty embedding (and only loads the model).
        find_entry(registry_of(request), body.model)
        return JSONResponse({"embedding": []})
    result, _, _ = await _embed(request, body.model, [body.prompt], body.keep_alive)
    return JSONResponse({"embedding": result.vectors[0]})

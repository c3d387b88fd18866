"""``GET /api/system``: what the server runs on and what it is doing.

The static facts come from ``shimmy.diag`` (the same report as ``shimmy diag``); the live ones
(uptime, requests, loaded models, compute devices) from the running app. Gathering the static
facts reads files and asks llama.cpp, so it runs in a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.admin.protocol import SystemInfo
from shimmy.api.routing import api_route
from shimmy.diag import collect_diagnostics

if TYPE_CHECKING:
    from shimmy.registry import ModelRegistry

# ggml_backend_dev_type, in the order of ggml-backend.h.
DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel")


def backend_devices() -> list[dict[str, Any]]:
    """The compute devices llama.cpp's ggml backends registered (CPU, CUDA, Metal, ...).

    llama-cpp-python does not bind these ggml functions, so they are declared here against its
    already-loaded library; private prototypes leave the library's own function objects alone.
    Any failure (another build, another version) yields an empty list rather than an error.
    """
    try:
        import llama_cpp.llama_cpp as bindings

        lib = bindings._lib
        size_t, handle = ctypes.c_size_t, ctypes.c_void_p
        count = ctypes.CFUNCTYPE(size_t)(("ggml_backend_dev_count", lib))
        get = ctypes.CFUNCTYPE(handle, size_t)(("ggml_backend_dev_get", lib))
        name = ctypes.CFUNCTYPE(ctypes.c_char_p, handle)(("ggml_backend_dev_name", lib))
        description = ctypes.CFUNCTYPE(ctypes.c_char_p, handle)(
            ("ggml_backend_dev_description", lib)
        )
        kind = ctypes.CFUNCTYPE(ctypes.c_int, handle)(("ggml_backend_dev_type", lib))
        memory = ctypes.CFUNCTYPE(None, handle, ctypes.POINTER(size_t), ctypes.POINTER(size_t))(
            ("ggml_backend_dev_memory", lib)
        )
    except (ImportError, AttributeError, OSError):
        return []
    devices: list[dict[str, Any]] = []
    for index in range(count()):
        device = get(index)
        if not device:
            continue
        free, total = size_t(0), size_t(0)
        memory(device, ctypes.byref(free), ctypes.byref(total))
        type_index = kind(device)
        devices.append(
            {
                "name": (name(device) or b"").decode(errors="replace"),
                "description": (description(device) or b"").decode(errors="replace"),
                "type": DEVICE_TYPES[type_index]
                if 0 <= type_index < len(DEVICE_TYPES)
                else "other",
                "memory_total_bytes": total.value,
                "memory_free_bytes": free.value,
            }
        )
    return devices


def loaded_models_summary(registry: ModelRegistry) -> list[dict[str, Any]]:
    summary = []
    for engine in registry.loaded_engines():
        stats: dict[str, Any] = engine.stats()
        summary.append(
            {
                "id": engine.entry.id,
                "load_seconds": round(engine.load_seconds, 3),
                "loaded_at": engine.loaded_at,
                "memory_bytes": engine.memory_bytes,
                "n_ctx": engine.n_ctx,
                "n_gpu_layers": engine.n_gpu_layers,
                "slots": stats.get("slots", 0),
                "busy": stats.get("busy", 0),
                "queued": stats.get("queued", 0),
                "tokens_generated": stats.get("tokens_generated", 0),
            }
        )
    return summary


def _static_facts(request: Request) -> dict[str, Any]:
    # The registry already knows the models: rescanning every folder here would reread
    # every GGUF header on each call.
    facts = collect_diagnostics(request.app.state.settings, discover=False)
    facts["gpu"] = {
        "offload_supported": facts["llama_cpp"]["gpu_offload"],
        "devices": backend_devices(),
    }
    return facts


async def system_info(request: Request) -> Response:
    state = request.app.state
    registry: ModelRegistry = state.registry
    facts = await asyncio.to_thread(_static_facts, request)
    discovered = facts.pop("models")
    memory = facts["memory"]
    memory["process_rss_bytes"] = psutil.Process().memory_info().rss
    facts["gpu"]["n_gpu_layers_setting"] = state.settings.n_gpu_layers
    facts["models"] = {
        "available": len(registry.entries),
        "default": registry.default_id,
        "folders": discovered.get("folders", []),
        "loaded": loaded_models_summary(registry),
        "loading": registry.loading_ids(),
    }
    facts["uptime_seconds"] = round(time.monotonic() - state.started_at, 1)
    facts["requests_total"] = state.request_count
    return JSONResponse(facts)


routes: list[BaseRoute] = [
    api_route(
        "/api/system",
        system_info,
        methods=["GET"],
        summary="Machine, build, GPU and model facts",
        response=SystemInfo,
        response_description="System facts",
        tags=["server"],
    )
]

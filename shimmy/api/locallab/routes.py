"""LocalLab drop-in: LocalLab's REST paths, fields and response shapes on shimmy's engine.

LocalLab serves one "current" model. Here that is the model last loaded through
``POST /models/load``, else the most recently used loaded model; ``GET /models/current`` is a
404 while there is neither. Generation uses the current model, else the default model;
``model_id`` in a request picks another. Its sampling defaults (top_k 80, repetition penalty
1.15, max_length the server's ``open_max_tokens``, 2048) apply to fields a request leaves out,
unless the model's config file sets its own. ``do_sample: false`` means greedy decoding.

Streams follow what LocalLab's official Python client (``locallab-client``) parses:

- ``/generate``: SSE events ``data: <text>``, ending with ``data: [DONE]``. The client strips
  each line, so trailing whitespace of a piece is moved to the front of the next one (leading
  whitespace survives); newlines are sent as the two characters ``\\n``, as LocalLab does.
- ``/chat``: each chunk is a JSON object ``{"role": "assistant", "content": ...}`` sent twice:
  as an SSE ``data:`` line for SSE clients, and as a bare JSON line, which is what the Python
  client decodes. SSE parsers ignore the bare line (an unknown field name); the Python client
  ignores the ``data:`` line (not JSON).

Errors use shimmy's native error body (LocalLab's clients only show the text).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.admin.system import backend_devices
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import native_error_body, ws_error_frame
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.locallab.protocol import (
    UNLOADED_STATUS,
    BatchBody,
    ChatBody,
    GenerateBody,
    LoadBody,
    LocalLabBatchResponse,
    LocalLabChatResponse,
    LocalLabCurrentModel,
    LocalLabGenerateResponse,
    LocalLabHealth,
    LocalLabLoadResult,
    LocalLabModelList,
    LocalLabOptions,
    LocalLabSystemInfo,
    LocalLabUnloadResult,
)
from shimmy.api.native.routes import check_batch_capacity, raise_first_failure
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import DONE, EventStreamResponse
from shimmy.engine.types import Finished, TextDelta
from shimmy.errors import NotFound, ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import GenerationInput, prepare
from shimmy.serving.run import (
    Collected,
    Started,
    collect,
    collect_one,
    frames,
    start,
    total_usage,
)

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine


# --- the current model -----------------------------------------------------------------------
def current_model_id(request: Request) -> str | None:
    chosen: str | None = getattr(request.app.state, "locallab_model", None)
    if chosen is not None:
        return chosen
    engines = registry_of(request).loaded_engines()
    if engines:
        return max(engines, key=lambda engine: engine.last_used).entry.id
    return None


async def engine_for(request: Request, options: LocalLabOptions) -> Engine:
    model = options.model_id or current_model_id(request)  # None: the default model
    return await registry_of(request).get_engine(model, wait=wants_to_wait(request))


def stop_after(seconds: float | None, started: Started) -> asyncio.TimerHandle | None:
    """LocalLab's ``max_time``: end the generation after this long, keeping its text."""
    if seconds is None:
        return None
    return asyncio.get_running_loop().call_later(seconds, started.cancel)


# --- generation endpoints ---------------------------------------------------------------------
def carry_trailing_whitespace(held: str, piece: str) -> tuple[str, str]:
    """``(text to send now, whitespace to hold)`` for one piece of a ``/generate`` stream:
    the client strips each line, so whitespace may only travel at the front of a piece."""
    text = held + piece
    visible = text.rstrip()
    return visible, text[len(visible) :]


def _escape_line_breaks(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _LocalLabEvents:
    def __init__(self, request: Request, timer: asyncio.TimerHandle | None) -> None:
        self.request = request
        self.timer = timer

    def opening(self) -> Iterable[bytes]:
        return ()

    def _ended(self, event: Finished) -> None:
        annotate(self.request, usage=event.usage)
        if self.timer is not None:
            self.timer.cancel()


class TextEvents(_LocalLabEvents):
    """``/generate``: ``data: <text>`` events, then ``data: [DONE]``."""

    held = ""  # trailing whitespace, sent in front of the next piece

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        visible, self.held = carry_trailing_whitespace(self.held, event.text)
        return (f"data: {_escape_line_breaks(visible)}\n\n".encode(),) if visible else ()

    def finished(self, event: Finished) -> Iterable[bytes]:
        self._ended(event)
        return ()

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        # "Error: ..." is what LocalLab's client recognizes as a failure inside a text stream.
        message = ws_error_frame(err)["error"]["message"]
        return (f"data: Error: {_escape_line_breaks(message)}\n\n".encode(),)

    def closing(self) -> Iterable[bytes]:
        return (DONE,)


def _chat_chunk(payload: Any) -> bytes:
    line = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {line}\n{line}\n\n".encode()


class ChatEvents(_LocalLabEvents):
    """``/chat``: each chunk both as an SSE ``data:`` line and as a bare JSON line."""

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        if not event.text:
            return ()
        return (_chat_chunk({"role": "assistant", "content": event.text}),)

    def finished(self, event: Finished) -> Iterable[bytes]:
        self._ended(event)
        final = {
            "role": "assistant",
            "content": "",
            "finish_reason": event.finish_reason,
            "usage": event.usage.as_dict(),
        }
        return (_chat_chunk(final),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (_chat_chunk(native_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        # The Python client's end marker is a JSON line equal to "[DONE]".
        return (DONE, b'"[DONE]"\n\n')


EventsKind = type[TextEvents] | type[ChatEvents]


async def _answer(
    request: Request, options: LocalLabOptions, given: GenerationInput, kind: EventsKind
) -> tuple[str, Collected] | Response:
    """Run one generation: a stream response when asked for one, else the collected answer
    (cut at ``max_time``, stopped if the client leaves) with the model's id."""
    engine = await engine_for(request, options)
    annotate(request, model=engine.entry.id)
    prepared = await prepare(engine, given, Dialect.LOCALLAB, settings_of(request))
    if options.stream:
        started = await start(engine, prepared)
        timer = stop_after(options.max_time, started)
        return EventStreamResponse(frames(started, kind(request, timer)))
    result = await collect_one(
        engine, prepared, until=client_gone(request), max_seconds=options.max_time
    )
    annotate(request, usage=result.finished.usage)
    return engine.entry.id, result


async def generate(request: Request) -> Response:
    body = parse_body(GenerateBody, await request.body())
    answer = await _answer(request, body, body.to_input(prompt=body.prompt), TextEvents)
    if isinstance(answer, Response):
        return answer
    model_id, result = answer
    return JSONResponse(
        {
            "response": result.text,
            "text": result.text,  # the field name of LocalLab's own server; its client reads either
            "model": model_id,
            "finish_reason": result.finished.finish_reason,
            "usage": result.finished.usage.as_dict(),
        }
    )


async def chat(request: Request) -> Response:
    body = parse_body(ChatBody, await request.body())
    answer = await _answer(request, body, body.to_input(messages=body.messages), ChatEvents)
    if isinstance(answer, Response):
        return answer
    model_id, result = answer
    choice = {
        "message": {"role": "assistant", "content": result.text},
        "index": 0,
        "finish_reason": result.finished.finish_reason,
    }
    return JSONResponse(
        {"model": model_id, "choices": [choice], "usage": result.finished.usage.as_dict()}
    )


async def generate_batch(request: Request) -> Response:
    body = parse_body(BatchBody, await request.body())
    engine = await engine_for(request, body)
    check_batch_capacity(engine.n_parallel + engine.settings.max_queue, len(body.prompts))
    settings = settings_of(request)
    prepared = [
        await prepare(engine, body.to_input(prompt=p), Dialect.LOCALLAB, settings)
        for p in body.prompts
    ]
    results = raise_first_failure(
        await collect(engine, prepared, until=client_gone(request), max_seconds=body.max_time)
    )
    totals = total_usage(result.finished.usage for result in results)
    annotate(request, model=engine.entry.id, usage=totals)
    return JSONResponse(
        {
            "responses": [result.text for result in results],
            "model": engine.entry.id,
            "usage": totals.as_dict(),
        }
    )


# --- models and system ------------------------------------------------------------------------
def _model_info(request: Request, model_id: str) -> dict[str, Any]:
    registry = registry_of(request)
    entry = registry.resolve(model_id)
    return {"id": entry.id, "name": entry.name or entry.id, "description": entry.description}


async def models_available(request: Request) -> Response:
    registry = registry_of(request)
    models = [
        {
            "id": entry.id,
            "name": entry.name or entry.id,
            "can_load": entry.usable,
            "description": entry.description,
            "is_loaded": registry.is_loaded(entry.id),
        }
        for entry in registry.entries
    ]
    return JSONResponse({"models": models, "current_model": current_model_id(request)})


async def models_current(request: Request) -> Response:
    model_id = current_model_id(request)
    if model_id is None:
        raise NotFound("No model is currently loaded", message="No model is currently loaded")
    loaded = registry_of(request).is_loaded(model_id)
    return JSONResponse(
        {
            **_model_info(request, model_id),
            "is_loaded": loaded,
            "loading_progress": 1.0 if loaded else 0.0,
        }
    )


async def models_load(request: Request) -> Response:
    body = parse_body(LoadBody, await request.body())
    registry = registry_of(request)
    already = registry.is_loaded(registry.resolve(body.model_id).id)
    engine = await registry.get_engine(body.model_id, wait=wants_to_wait(request))
    request.app.state.locallab_model = engine.entry.id
    annotate(request, model=engine.entry.id)
    verb = "is already loaded" if already else "loaded successfully"
    return JSONResponse(
        {
            "status": "success",
            "message": f"Model {engine.entry.id} {verb}",
            "model_id": engine.entry.id,
            "load_seconds": round(engine.load_seconds, 3),
        }
    )


async def models_unload(request: Request) -> Response:
    model_id = current_model_id(request)
    request.app.state.locallab_model = None
    unloaded = model_id is not None and await registry_of(request).unload(model_id)
    message = f"Model {model_id} unloaded successfully" if unloaded else "No model was loaded"
    return JSONResponse(
        {"status": UNLOADED_STATUS, "message": message, "model_id": model_id, "unloaded": unloaded}
    )


async def system_info(request: Request) -> Response:
    state = request.app.state
    gpus = [d for d in await asyncio.to_thread(backend_devices) if d["type"] in ("gpu", "igpu")]
    return JSONResponse(
        {
            "cpu_usage": psutil.cpu_percent(),
            "memory_usage": psutil.virtual_memory().percent,
            "gpu_info": gpus or None,
            "active_model": current_model_id(request),
            "uptime": round(time.monotonic() - state.started_at, 1),
            "request_count": state.request_count,
        }
    )


async def health(request: Request) -> Response:
    return JSONResponse({"status": "healthy"})


TAGS = ["locallab"]

# Errors are answered in the native format.
routes: list[BaseRoute] = [
    api_route(
        "/generate",
        generate,
        methods=["POST"],
        summary="Generate text from a prompt (LocalLab)",
        description="Streamed: the text itself (`data: <text>`, line breaks written as `\\n`, "
        "a failure as `data: Error: <message>`), then `data: [DONE]`.",
        body=GenerateBody,
        response=LocalLabGenerateResponse,
        streams=[SSE],
        response_description="The text, or its stream of events",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/chat",
        chat,
        methods=["POST"],
        summary="Chat completion (LocalLab)",
        description='Streamed: `{"role": "assistant", "content": ...}` chunks, each both as a '
        '`data:` line and as a bare JSON line, ending with `data: [DONE]` and a `"[DONE]"` line.',
        body=ChatBody,
        response=LocalLabChatResponse,
        streams=[SSE],
        response_description="The answer, or its stream of chunks",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/generate/batch",
        generate_batch,
        methods=["POST"],
        summary="Generate for several prompts at once (LocalLab)",
        body=BatchBody,
        response=LocalLabBatchResponse,
        response_description="One text per prompt, in order",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/models/available",
        models_available,
        methods=["GET"],
        summary="List the models found (LocalLab)",
        response=LocalLabModelList,
        response_description="The models",
        tags=TAGS,
    ),
    api_route(
        "/models/current",
        models_current,
        methods=["GET"],
        summary="The current model (LocalLab)",
        response=LocalLabCurrentModel,
        response_description="The model",
        errors={404: "No model is current (code `not_found`)"},
        tags=TAGS,
    ),
    api_route(
        "/models/load",
        models_load,
        methods=["POST"],
        summary="Load a model and make it the current one (LocalLab)",
        body=LoadBody,
        response=LocalLabLoadResult,
        response_description="The model is loaded",
        errors={**GENERATION_ERRORS, 507: "Not enough memory"},
        tags=TAGS,
    ),
    api_route(
        "/models/unload",
        models_unload,
        methods=["POST"],
        summary="Unload the current model (LocalLab)",
        response=LocalLabUnloadResult,
        response_description="Done (unloaded is false when no model was loaded)",
        tags=TAGS,
    ),
    api_route(
        "/system/info",
        system_info,
        methods=["GET"],
        summary="Machine load and the current model (LocalLab)",
        response=LocalLabSystemInfo,
        response_description="System facts",
        tags=TAGS,
    ),
    api_route(
        "/health",
        health,
        methods=["GET"],
        summary="Health (LocalLab)",
        response=LocalLabHealth,
        response_description="The server is up",
        public=True,
        rate_limited=False,
        tags=TAGS,
    ),
]

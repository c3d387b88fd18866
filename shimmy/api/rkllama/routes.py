"""RKLLama's REST API (seed 003), mounted at ``/rkllama``: its clients take a base URL.

RKLLama serves one model at a time: ``POST /load_model`` makes a model the current one (kept
loaded until ``POST /unload_model``), ``POST /generate`` answers with it. Models are named by
their shimmy id; a file name (``tiny.gguf``) is accepted too. Bodies, messages and status
codes are the documented ones, errors ``{"error": "message"}`` (``shimmy.api.errors``):
loading while a model is loaded, or a model that does not exist, is a 400; ``GET
/current_model`` without one is a 404.

``/generate`` streams (``"stream": true``) its completion objects as plain text, one JSON
object per chunk followed by a blank line, as RKLLama does. ``/pull`` takes ``hf/OWNER/REPO/
FILE.gguf`` (and every source ``shimmy pull`` takes) and answers in plain text lines:
``Downloading FILE (SIZE MB)...``, then the percentage done, or ``Error during download: ...``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import error_message
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.protocol.common import parse_body
from shimmy.api.rkllama.protocol import (
    RKLLamaCompletion,
    RKLLamaCurrentModel,
    RKLLamaDone,
    RKLLamaGenerateRequest,
    RKLLamaLoadModelRequest,
    RKLLamaModelNames,
    RKLLamaModelRequest,
    RKLLamaWelcome,
)
from shimmy.api.routing import BAD_REQUEST, api_route
from shimmy.api.sse import EventStreamResponse
from shimmy.engine.types import Finished, TextDelta, Usage
from shimmy.errors import InvalidRequest, NotFound, ShimmyError
from shimmy.models.pull import (
    PullError,
    PullEvent,
    PullProgress,
    PullSuccess,
    parse_source,
    pull_model,
)
from shimmy.models.remove import remove_model_files
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import GenerationInput, prepare
from shimmy.serving.run import collect_one, frames, start

if TYPE_CHECKING:
    from shimmy.models.entry import ModelEntry

GITHUB = "https://github.com/notpunhnox/rkllama"
NONE_LOADED = "No model is currently loaded."
MEGABYTE = 1024 * 1024
TEXT = "text/plain"


def _current(request: Request) -> str | None:
    current: str | None = getattr(request.app.state, "rkllama_model", None)
    return current


def _set_current(request: Request, model_id: str | None) -> None:
    request.app.state.rkllama_model = model_id


def _entry(request: Request, name: str) -> ModelEntry | None:
    """The model ``name`` is the id or file name of (``.rkllm`` read as ``.gguf``)."""
    stem = name.removesuffix(".gguf").removesuffix(".rkllm")
    for entry in registry_of(request).entries:
        if name in (entry.id, entry.path.name) or stem.lower() == entry.id:
            return entry
    return None


async def welcome(request: Request) -> Response:
    return JSONResponse({"message": "Welcome to RK-LLama!", "github": GITHUB})


async def list_models(request: Request) -> Response:
    return JSONResponse({"models": [e.id for e in registry_of(request).entries if e.usable]})


async def load_model(request: Request) -> Response:
    body = parse_body(RKLLamaLoadModelRequest, await request.body())
    if _current(request) is not None:
        raise InvalidRequest(message="A model is already loaded. Please unload it first.")
    entry = _entry(request, body.model_name)
    if entry is None:
        raise InvalidRequest(
            message=f"Model {body.model_name[:200]} not found in the /models directory."
        )
    # RKLLama keeps its model until told to unload it.
    engine = await registry_of(request).get_engine(
        entry.id, keep_alive=-1, wait=wants_to_wait(request)
    )
    _set_current(request, engine.entry.id)
    annotate(request, model=engine.entry.id)
    return JSONResponse({"message": f"Model {engine.entry.id} loaded successfully."})


async def unload_model(request: Request) -> Response:
    current = _current(request)
    if current is None:
        raise InvalidRequest(message=NONE_LOADED)
    _set_current(request, None)
    await registry_of(request).unload(current)
    return JSONResponse({"message": "Model unloaded successfully."})


async def current_model(request: Request) -> Response:
    current = _current(request)
    if current is None:
        raise NotFound(message=NONE_LOADED)
    return JSONResponse({"model_name": current})


def _completion(content: str, finish: str | None, usage: Usage | None) -> dict[str, Any]:
    counts = usage.as_dict() if usage is not None else dict.fromkeys(Usage().as_dict())
    return {
        "id": "rkllm_chat",
        "object": "rkllm_chat",
        "created": int(time.time()),
        "choices": [{"role": "assistant", "content": content, "finish_reason": finish}],
        "usage": counts,
    }


def _chunk(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _finish(finished: Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


class RKLLamaEvents:
    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        return (_chunk(_completion(event.text, None, None)),) if event.text else ()

    def finished(self, event: Finished) -> Iterable[bytes]:
        return (_chunk(_completion("", _finish(event), event.usage)),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (_chunk({"error": error_message(err)}),)

    def closing(self) -> Iterable[bytes]:
        return ()


async def generate(request: Request) -> Response:
    body = parse_body(RKLLamaGenerateRequest, await request.body())
    current = _current(request)
    if current is None:
        raise InvalidRequest(message=NONE_LOADED)
    engine = await registry_of(request).get_engine(current, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    given = GenerationInput(messages=body.to_messages())
    prepared = await prepare(engine, given, Dialect.RKLLAMA, settings_of(request))
    if body.stream:
        started = await start(engine, prepared)
        return EventStreamResponse(frames(started, RKLLamaEvents()), media_type=TEXT)
    result = await collect_one(engine, prepared, until=client_gone(request))
    annotate(request, usage=result.finished.usage)
    usage = result.finished.usage
    return JSONResponse(_completion(result.text, _finish(result.finished), usage))


def _download_error(err: ShimmyError | PullError) -> str:
    message = err.message if isinstance(err, PullError) else error_message(err)
    return f"Error during download: {message}\n"


async def pull(request: Request) -> Response:
    registry = registry_of(request)
    try:
        body = parse_body(RKLLamaModelRequest, await request.body())
        # RKLLama writes Hub files as hf/OWNER/REPO/FILE.
        name = "hf://" + body.model[3:] if body.model.startswith("hf/") else body.model
        events = pull_model(parse_source(name, param="model"), settings_of(request))
        first = await anext(events)
    except ShimmyError as err:
        return PlainTextResponse(_download_error(err), status_code=400)
    if isinstance(first, PullError):
        await events.aclose()
        return PlainTextResponse(_download_error(first), status_code=400)

    async def lines() -> AsyncGenerator[bytes, None]:
        announced, shown = False, -1
        try:
            event: PullEvent = first
            while True:
                if isinstance(event, PullProgress) and event.total:
                    if not announced:
                        announced = True
                        size = event.total / MEGABYTE
                        yield f"Downloading {event.file} ({size:.2f} MB)...\n".encode()
                    percent = event.completed * 100 // event.total
                    if percent != shown:
                        shown = percent
                        yield f"{percent}%\n".encode()
                elif isinstance(event, PullSuccess):
                    await asyncio.to_thread(registry.discover)
                    if shown != 100:
                        yield b"100%\n"
                elif isinstance(event, PullError):
                    yield _download_error(event).encode()
                event = await anext(events)
        except StopAsyncIteration:
            return
        finally:
            await events.aclose()

    return EventStreamResponse(lines(), media_type=TEXT)


async def remove(request: Request) -> Response:
    body = parse_body(RKLLamaModelRequest, await request.body())
    entry = _entry(request, body.model)
    if entry is None:
        raise NotFound(message=f"The model: {body.model[:200]} cannot be found.")
    registry = registry_of(request)
    if _current(request) == entry.id:
        _set_current(request, None)
    await registry.unload(entry.id)
    await asyncio.to_thread(remove_model_files, entry, settings_of(request))
    await asyncio.to_thread(registry.discover)
    return JSONResponse({"message": "The model has been successfully deleted."})


TAGS = ["rkllama"]

routes: list[BaseRoute] = [
    api_route(
        "/",
        welcome,
        methods=["GET"],
        summary="Welcome (RKLLama)",
        response=RKLLamaWelcome,
        tags=TAGS,
    ),
    api_route(
        "/models",
        list_models,
        methods=["GET"],
        summary="List the models (RKLLama)",
        response=RKLLamaModelNames,
        tags=TAGS,
    ),
    api_route(
        "/load_model",
        load_model,
        methods=["POST"],
        body=RKLLamaLoadModelRequest,
        summary="Make a model the current one (RKLLama)",
        response=RKLLamaDone,
        errors={
            400: "A model is already loaded, or there is no such model",
            503: "Busy or loading",
            507: "Not enough memory",
        },
        tags=TAGS,
    ),
    api_route(
        "/unload_model",
        unload_model,
        methods=["POST"],
        response=RKLLamaDone,
        summary="Unload the current model (RKLLama)",
        errors={400: "No model is loaded"},
        tags=TAGS,
    ),
    api_route(
        "/current_model",
        current_model,
        methods=["GET"],
        response=RKLLamaCurrentModel,
        summary="The current model (RKLLama)",
        errors={404: "No model is loaded"},
        tags=TAGS,
    ),
    api_route(
        "/generate",
        generate,
        methods=["POST"],
        body=RKLLamaGenerateRequest,
        summary="Generate with the current model (RKLLama)",
        response=RKLLamaCompletion,
        texts=[TEXT],
        response_description="The completion, or its chunks (plain text)",
        errors={**BAD_REQUEST, 503: "Busy or loading"},
        tags=TAGS,
    ),
    api_route(
        "/pull",
        pull,
        methods=["POST"],
        body=RKLLamaModelRequest,
        summary="Download a model (RKLLama)",
        texts=[TEXT],
        response_description="Progress lines",
        errors={400: "The download failed"},
        tags=TAGS,
    ),
    api_route(
        "/rm",
        remove,
        methods=["DELETE", "POST"],
        body=RKLLamaModelRequest,
        summary="Delete a model from shimmy's own models folder (RKLLama)",
        response=RKLLamaDone,
        errors={**BAD_REQUEST, 403: "Not shimmy's own file", 404: "No such model"},
        tags=TAGS,
    ),
]

"""LocalLab drop-in: LocalLab's REST paths, fields and response shapes on shimmy's engine.

LocalLab serves one "current" model. Here that is the model last loaded through
``POST /models/load``, else the most recently used loaded model; ``GET /models/current`` is a
404 while there is neither. Generation uses the current model, else the default model;
``model_id`` in a request picks another. Its sampling defaults (top_k 80, repetition penalty
1.15, max_length up to the server's cap) apply to fields a request leaves out, unless the
model's config file sets its own. ``do_sample: false`` means greedy decoding.

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
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import psutil
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictStr
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shimmy.api.access_log import annotate
from shimmy.api.batch import MAX_BATCH_PROMPTS, run_batch, run_together, total_usage
from shimmy.api.errors import native_error_body, unexpected_error, validation_error, ws_error_frame
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.schemas import (
    NonEmptyStr,
    StrictFloat,
    StrictInteger,
    parse_generate_request,
    parse_json,
    to_generation,
)
from shimmy.api.sse import DONE, EventStreamResponse
from shimmy.api.system import backend_devices
from shimmy.engine.types import Event, Finished, GenerationRequest, TextDelta
from shimmy.errors import GenerationFailed, InvalidRequest, NotFound, ShimmyError

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine as ModelEngine
    from shimmy.engine.protocol import Stream as GenerationStream
    from shimmy.registry import ModelRegistry

LOCALLAB_SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 80,
    "repetition_penalty": 1.15,
}
SAMPLING_FIELDS = tuple(LOCALLAB_SAMPLING_DEFAULTS)

BodyT = TypeVar("BodyT", bound=BaseModel)

# The official client's unload_model() is true only when "status" is exactly this.
UNLOADED_STATUS = "Model unloaded successfully"


# --- requests ---------------------------------------------------------------------------------
class LocalLabOptions(BaseModel):
    """Fields every LocalLab generation endpoint takes; ``null`` means "use the default"."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model_id: StrictStr | None = Field(None, validation_alias=AliasChoices("model_id", "model"))
    max_length: Annotated[StrictInteger, Field(ge=1)] | None = Field(
        None, validation_alias=AliasChoices("max_length", "max_tokens", "max_new_tokens")
    )
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    top_k: Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0)] | None = None
    do_sample: StrictBool | None = None
    max_time: Annotated[StrictFloat, Field(gt=0)] | None = None
    system_prompt: StrictStr | None = None
    stream: StrictBool | None = None


class GenerateBody(LocalLabOptions):
    prompt: StrictStr


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: NonEmptyStr
    content: StrictStr


class ChatBody(LocalLabOptions):
    messages: Annotated[list[ChatMessageBody], Field(min_length=1)]


class BatchBody(LocalLabOptions):
    prompts: Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)]


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_id: NonEmptyStr


def parse_body(model: type[BodyT], raw: bytes) -> BodyT:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise validation_error(exc) from None


# --- the current model -----------------------------------------------------------------------
def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def current_model_id(request: Request) -> str | None:
    chosen: str | None = getattr(request.app.state, "locallab_model", None)
    if chosen is not None:
        return chosen
    engines = _registry(request).loaded_engines()
    if engines:
        return max(engines, key=lambda engine: engine.last_used).entry.id
    return None


async def engine_for(request: Request, options: LocalLabOptions) -> ModelEngine:
    model = options.model_id or current_model_id(request)  # None: the default model
    return await _registry(request).get_engine(model, wait=wants_to_wait(request))


async def generation_for(
    request: Request,
    engine: ModelEngine,
    options: LocalLabOptions,
    *,
    prompt: str | None = None,
    messages: list[ChatMessageBody] | None = None,
) -> GenerationRequest:
    """Translate LocalLab options into the native request, then into what the engine runs."""
    settings = request.app.state.settings
    model_defaults = engine.options.sampling.values()
    values: dict[str, Any] = {**LOCALLAB_SAMPLING_DEFAULTS}
    values.update({k: v for k, v in model_defaults.items() if k in SAMPLING_FIELDS})
    sent = {name: getattr(options, name) for name in SAMPLING_FIELDS}
    values.update({name: value for name, value in sent.items() if value is not None})
    if options.do_sample is False:
        values["temperature"] = 0.0
    max_tokens = options.max_length or model_defaults.get("max_tokens") or settings.max_tokens_cap
    native: dict[str, Any] = {"model": engine.entry.id, "max_tokens": max_tokens, **values}
    if options.system_prompt is not None:
        native["system"] = options.system_prompt
    if messages is not None:
        native["messages"] = [{"role": m.role, "content": m.content} for m in messages]
    else:
        native["prompt"] = prompt
    return await to_generation(parse_generate_request(native), engine, settings)


def submit(
    request: Request, engine: ModelEngine, generation: GenerationRequest
) -> GenerationStream:
    return engine.submit(generation)


def stop_after(seconds: float | None, stream: GenerationStream) -> asyncio.TimerHandle | None:
    """LocalLab's ``max_time``: end the generation after this long, keeping its text."""
    if seconds is None:
        return None
    return asyncio.get_running_loop().call_later(seconds, stream.cancel)


async def first_event(stream: GenerationStream) -> Event:
    """Pull the first event before answering, so early failures still get a proper status."""
    try:
        return await anext(stream)
    except BaseException:
        stream.cancel()
        raise


# --- generation endpoints ---------------------------------------------------------------------
def carry_trailing_whitespace(held: str, piece: str) -> tuple[str, str]:
    """``(text to send now, whitespace to hold)`` for one piece of a ``/generate`` stream:
    the client strips each line, so whitespace may only travel at the front of a piece."""
    text = held + piece
    visible = text.rstrip()
    return visible, text[len(visible) :]


def _escape_line_breaks(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


async def _text_events(
    request: Request, stream: GenerationStream, first: Event, timer: asyncio.TimerHandle | None
) -> AsyncGenerator[bytes, None]:
    held = ""  # trailing whitespace, sent in front of the next piece
    try:
        event = first
        while isinstance(event, TextDelta):
            visible, held = carry_trailing_whitespace(held, event.text)
            if visible:
                yield f"data: {_escape_line_breaks(visible)}\n\n".encode()
            event = await anext(stream)
        annotate(request, usage=event.usage)
    except ShimmyError as err:
        yield _text_error(err)
    except StopAsyncIteration:
        yield _text_error(GenerationFailed("the generation ended unexpectedly"))
    except Exception as exc:
        yield _text_error(unexpected_error(exc))
    finally:
        if timer is not None:
            timer.cancel()
        stream.cancel()
    yield DONE


def _text_error(err: ShimmyError) -> bytes:
    # "Error: ..." is what LocalLab's client recognizes as a failure inside a text stream.
    message = ws_error_frame(err)["error"]["message"]
    return f"data: Error: {_escape_line_breaks(message)}\n\n".encode()


def _chat_chunk(payload: Any) -> bytes:
    line = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {line}\n{line}\n\n".encode()


async def _chat_events(
    request: Request, stream: GenerationStream, first: Event, timer: asyncio.TimerHandle | None
) -> AsyncGenerator[bytes, None]:
    try:
        event = first
        while isinstance(event, TextDelta):
            if event.text:
                yield _chat_chunk({"role": "assistant", "content": event.text})
            event = await anext(stream)
        annotate(request, usage=event.usage)
        yield _chat_chunk(
            {
                "role": "assistant",
                "content": "",
                "finish_reason": event.finish_reason,
                "usage": event.usage.as_dict(),
            }
        )
    except ShimmyError as err:
        yield _chat_chunk(native_error_body(err))
    except StopAsyncIteration:
        yield _chat_chunk(native_error_body(GenerationFailed("the generation ended unexpectedly")))
    except Exception as exc:
        yield _chat_chunk(native_error_body(unexpected_error(exc)))
    finally:
        if timer is not None:
            timer.cancel()
        stream.cancel()
    yield DONE
    yield b'"[DONE]"\n\n'  # the Python client's end marker: a JSON line equal to "[DONE]"


async def _complete(
    request: Request, engine: ModelEngine, generation: GenerationRequest, options: LocalLabOptions
) -> tuple[str, Finished]:
    """Run one generation to its end, or to ``max_time``, or until the client leaves."""
    [result] = await run_together(request, engine, [generation], max_seconds=options.max_time)
    if isinstance(result, BaseException):
        raise result
    return result


EventSource = Callable[
    [Request, "GenerationStream", Event, asyncio.TimerHandle | None], AsyncGenerator[bytes, None]
]


async def _stream_response(
    request: Request,
    engine: ModelEngine,
    generation: GenerationRequest,
    options: LocalLabOptions,
    events: EventSource,
) -> Response:
    """Start the generation and stream it as ``events`` frames it; errors before the first
    event still become an ordinary error response."""
    stream = submit(request, engine, generation)
    timer = stop_after(options.max_time, stream)
    first = await first_event(stream)
    return EventStreamResponse(events(request, stream, first, timer))


async def generate(request: Request) -> Response:
    body = parse_body(GenerateBody, await request.body())
    engine = await engine_for(request, body)
    generation = await generation_for(request, engine, body, prompt=body.prompt)
    annotate(request, model=engine.entry.id)
    if body.stream:
        return await _stream_response(request, engine, generation, body, _text_events)
    text, finished = await _complete(request, engine, generation, body)
    annotate(request, usage=finished.usage)
    return JSONResponse(
        {
            "response": text,
            "text": text,  # the field name of LocalLab's own server; its client reads either
            "model": engine.entry.id,
            "finish_reason": finished.finish_reason,
            "usage": finished.usage.as_dict(),
        }
    )


async def chat(request: Request) -> Response:
    body = parse_body(ChatBody, await request.body())
    engine = await engine_for(request, body)
    generation = await generation_for(request, engine, body, messages=body.messages)
    annotate(request, model=engine.entry.id)
    if body.stream:
        return await _stream_response(request, engine, generation, body, _chat_events)
    text, finished = await _complete(request, engine, generation, body)
    annotate(request, usage=finished.usage)
    return JSONResponse(
        {
            "model": engine.entry.id,
            "choices": [
                {
                    "message": {"role": "assistant", "content": text},
                    "index": 0,
                    "finish_reason": finished.finish_reason,
                }
            ],
            "usage": finished.usage.as_dict(),
        }
    )


async def generate_batch(request: Request) -> Response:
    body = parse_body(BatchBody, await request.body())
    engine = await engine_for(request, body)
    generations = [
        await generation_for(request, engine, body, prompt=prompt) for prompt in body.prompts
    ]
    results = await run_batch(request, engine, generations, max_seconds=body.max_time)
    totals = total_usage([finished.usage for _, finished in results])
    annotate(request, model=engine.entry.id, usage=totals)
    return JSONResponse(
        {
            "responses": [text for text, _ in results],
            "model": engine.entry.id,
            "usage": totals.as_dict(),
        }
    )


# --- models and system ------------------------------------------------------------------------
def _model_info(request: Request, model_id: str) -> dict[str, Any]:
    registry = _registry(request)
    entry = registry.resolve(model_id)
    return {"id": entry.id, "name": entry.name or entry.id, "description": entry.description}


async def models_available(request: Request) -> Response:
    registry = _registry(request)
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
    loaded = _registry(request).is_loaded(model_id)
    return JSONResponse(
        {
            **_model_info(request, model_id),
            "is_loaded": loaded,
            "loading_progress": 1.0 if loaded else 0.0,
        }
    )


async def models_load(request: Request) -> Response:
    body = parse_body(LoadBody, await request.body())
    registry = _registry(request)
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
    unloaded = model_id is not None and await _registry(request).unload(model_id)
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


routes: list[BaseRoute] = [
    Route("/generate", generate, methods=["POST"]),
    Route("/chat", chat, methods=["POST"]),
    Route("/generate/batch", generate_batch, methods=["POST"]),
    Route("/models/available", models_available, methods=["GET"]),
    Route("/models/current", models_current, methods=["GET"]),
    Route("/models/load", models_load, methods=["POST"]),
    Route("/models/unload", models_unload, methods=["POST"]),
    Route("/system/info", system_info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]

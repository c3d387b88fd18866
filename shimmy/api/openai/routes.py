"""The OpenAI-compatible API, mounted at ``/v1``: chat and text completions, embeddings, models.

Requests, responses, stream chunks and errors have OpenAI's shapes, so the official clients and
the editors built on them work unchanged. Errors are raised as ``ShimmyError``s; the app's
handlers render them in OpenAI's format for every path under ``/v1``.

Structured output (``response_format``) and forced tool calls constrain decoding with a grammar
(prepared in ``shimmy.serving``); with ``tool_choice`` "auto" the reply is parsed for calls.
"""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy import __version__
from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import openai_error_body
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    OpenAIModel,
    OpenAIModelList,
    TextCompletion,
)
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import DONE, EventStreamResponse, sse_event
from shimmy.engine.types import Finished, TextDelta, TokenLogprob, Usage
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.chat import ToolPlan
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare
from shimmy.serving.run import collect, collect_one, frames, start, total_usage
from shimmy.serving.structured import ParsedToolCall, ToolCallStreamFilter, extract_tool_calls

if TYPE_CHECKING:
    from shimmy.models.entry import ModelEntry

SYSTEM_FINGERPRINT = f"shimmy-{__version__}"


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


def _usage(usage: Usage) -> dict[str, Any]:
    return {**usage.as_dict(), "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _finish_reason(finished: Finished) -> str:
    # "cancelled" only happens once the client is gone; nobody reads it, but keep the enum.
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason


class _OpenAIEvents:
    """What chat and text completion streams share: the envelope, usage and the error event."""

    def __init__(self, meta: ResponseMeta, object_name: str, include_usage: bool) -> None:
        self.envelope = meta.envelope(object_name)
        self.include_usage = include_usage
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        self.usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(self, choice: dict[str, Any]) -> bytes:
        return sse_event({**self.envelope, "choices": [choice], **self.usage_field})

    def usage_chunk(self, usage: Usage) -> Iterable[bytes]:
        if not self.include_usage:
            return ()
        return (sse_event({**self.envelope, "choices": [], "usage": _usage(usage)}),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(openai_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        return (DONE,)


# --- chat completions -------------------------------------------------------------------------


def _tool_call_dicts(calls: list[ParsedToolCall], with_index: bool) -> list[dict[str, Any]]:
    return [
        {
            **({"index": i} if with_index else {}),
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def _chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {
                **entry(t.token, t.logprob),
                "top_logprobs": [entry(text, lp) for text, lp in t.top.items()],
            }
            for t in tokens
        ],
        "refusal": None,
    }


class ChatEvents(_OpenAIEvents):
    def __init__(
        self, meta: ResponseMeta, tools: ToolPlan, logprobs: bool, include_usage: bool
    ) -> None:
        super().__init__(meta, "chat.completion.chunk", include_usage)
        self.logprobs = logprobs
        # Text that may be a tool call is held back and parsed at the end: calls arrive whole,
        # in one delta, which OpenAI's clients accept.
        self.held = ToolCallStreamFilter(tools.names) if tools.offered else None

    def _delta(self, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
        return self.chunk({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})

    def opening(self) -> Iterable[bytes]:
        return (self._delta({"role": "assistant", "content": ""}),)

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        text = self.held.feed(event.text) if self.held is not None else event.text
        logprobs = _chat_logprobs(event.logprobs) if self.logprobs and event.logprobs else None
        if text or logprobs:
            return (self._delta({"content": text}, lp=logprobs),)
        return ()

    def finished(self, event: Finished) -> Iterable[bytes]:
        finish = _finish_reason(event)
        out: list[bytes] = []
        if self.held is not None:
            rest, calls = self.held.finish()
            if rest:
                out.append(self._delta({"content": rest}))
            if calls:
                out.append(self._delta({"tool_calls": _tool_call_dicts(calls, with_index=True)}))
                finish = "tool_calls"
        out.append(self._delta({}, finish))
        out.extend(self.usage_chunk(event.usage))
        return out


async def chat_completions(request: Request) -> Response:
    body = parse_body(ChatCompletionRequest, await request.body())
    body.check_single_choice()
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    prepared = await prepare(engine, body.to_input(), Dialect.OPENAI_CHAT, settings_of(request))
    meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", engine.entry.id)
    if body.stream:
        events = ChatEvents(meta, prepared.tools, bool(body.logprobs), body.include_usage())
        return EventStreamResponse(frames(await start(engine, prepared), events))
    result = await collect_one(engine, prepared, until=client_gone(request))
    finish = _finish_reason(result.finished)
    content: str | None = result.text
    message: dict[str, Any] = {"role": "assistant"}
    if prepared.tools.offered:
        content, calls = extract_tool_calls(result.text, prepared.tools.names)
        if calls:
            message["tool_calls"] = _tool_call_dicts(calls, with_index=False)
            finish = "tool_calls"
    message["content"] = content
    message["refusal"] = None
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _chat_logprobs(result.logprobs) if body.logprobs else None,
        "finish_reason": finish,
    }
    return JSONResponse(
        {
            **meta.envelope("chat.completion"),
            "choices": [choice],
            "usage": _usage(result.finished.usage),
        }
    )


# --- text completions -------------------------------------------------------------------------


def _completion_logprobs(tokens: Sequence[TokenLogprob], offsets: Sequence[int]) -> dict[str, Any]:
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": list(offsets),
    }


class CompletionEvents(_OpenAIEvents):
    def __init__(self, meta: ResponseMeta, logprobs: bool, include_usage: bool) -> None:
        super().__init__(meta, "text_completion", include_usage)
        self.logprobs = logprobs
        self.offset = 0

    def _choice(self, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        return self.chunk({"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish})

    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        tokens = event.logprobs or []
        logprobs = (
            _completion_logprobs(tokens, [self.offset] * len(tokens))
            if self.logprobs and tokens
            else None
        )
        self.offset += len(event.text)
        if event.text or logprobs:
            return (self._choice(event.text, logprobs=logprobs),)
        return ()

    def finished(self, event: Finished) -> Iterable[bytes]:
        return (self._choice("", _finish_reason(event)), *self.usage_chunk(event.usage))


async def completions(request: Request) -> Response:
    body = parse_body(CompletionRequest, await request.body())
    body.check_supported()
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming supports a single prompt", param="prompt")
    settings = settings_of(request)
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    prepared = [
        await prepare(engine, body.to_input(p), Dialect.OPENAI_COMPLETIONS, settings)
        for p in prompts
    ]
    meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", engine.entry.id)
    want_logprobs = body.logprobs is not None
    if body.stream:
        events = CompletionEvents(meta, want_logprobs, body.include_usage())
        return EventStreamResponse(frames(await start(engine, prepared[0]), events))
    results = await collect(engine, prepared, until=client_gone(request))
    for result in results:
        if isinstance(result, ShimmyError):
            raise result
    done = [r for r in results if not isinstance(r, ShimmyError)]
    choices = [
        {
            "text": result.text,
            "index": index,
            "logprobs": (
                _completion_logprobs(result.logprobs, result.text_offsets)
                if want_logprobs
                else None
            ),
            "finish_reason": _finish_reason(result.finished),
        }
        for index, result in enumerate(done)
    ]
    usage = total_usage(r.finished.usage for r in done)
    return JSONResponse(
        {**meta.envelope("text_completion"), "choices": choices, "usage": _usage(usage)}
    )


# --- embeddings -------------------------------------------------------------------------------


def _encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # OpenAI's base64 format: the little-endian float32 bytes of the vector.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embeddings(request: Request) -> Response:
    body = parse_body(EmbeddingRequest, await request.body())
    texts = body.texts()
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    result = await engine.embed(texts)
    if body.dimensions is not None and any(len(v) != body.dimensions for v in result.vectors):
        size = len(result.vectors[0]) if result.vectors else 0
        raise InvalidRequest(
            f"this model's embeddings have {size} dimensions; other sizes are not supported",
            param="dimensions",
        )
    encoding = body.encoding_format or "float"
    data = [
        {"object": "embedding", "index": index, "embedding": _encode_vector(vector, encoding)}
        for index, vector in enumerate(result.vectors)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": engine.entry.id,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


# --- models -----------------------------------------------------------------------------------


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    created = 0
    with contextlib.suppress(OSError):
        created = int(entry.path.stat().st_mtime)
    return {"id": entry.id, "object": "model", "created": created, "owned_by": "shimmy"}


async def list_models(request: Request) -> Response:
    entries = [entry for entry in registry_of(request).entries if entry.usable]
    return JSONResponse({"object": "list", "data": [_model_object(e) for e in entries]})


async def retrieve_model(request: Request) -> Response:
    entry = registry_of(request).resolve(request.path_params["model_id"])
    return JSONResponse(_model_object(entry))


TAGS = ["openai"]

# Mounted at /v1: errors are OpenAI's error body there (shimmy.api.errors).
routes: list[BaseRoute] = [
    api_route(
        "/chat/completions",
        chat_completions,
        methods=["POST"],
        summary="Chat completion (OpenAI)",
        description="Streamed: `chat.completion.chunk` events, as OpenAI sends them.",
        body=ChatCompletionRequest,
        response=ChatCompletion,
        streams=[SSE],
        response_description="The completion, or its chunks",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/completions",
        completions,
        methods=["POST"],
        summary="Text completion (OpenAI, legacy)",
        body=CompletionRequest,
        response=TextCompletion,
        streams=[SSE],
        response_description="The completion, or its chunks",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/embeddings",
        embeddings,
        methods=["POST"],
        summary="Embeddings (OpenAI)",
        body=EmbeddingRequest,
        response=EmbeddingList,
        response_description="One vector per input",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/models",
        list_models,
        methods=["GET"],
        summary="List usable models (OpenAI)",
        response=OpenAIModelList,
        response_description="The models",
        tags=TAGS,
    ),
    api_route(
        "/models/{model_id:path}",
        retrieve_model,
        methods=["GET"],
        summary="One model (OpenAI)",
        response=OpenAIModel,
        response_description="The model",
        errors={404: "No such model", 422: "The model file cannot be loaded"},
        tags=TAGS,
    ),
]

"""The OpenAI-compatible API, mounted at ``/v1``: chat completions, embeddings, models (text
completions are in ``completions``, the Responses API in ``shimmy.api.responses``).

Requests, responses, stream chunks and errors have OpenAI's shapes, so the official clients and
the editors built on them work unchanged. Errors are raised as ``ShimmyError``s; the app's
handlers render them in OpenAI's format for every path under ``/v1``.

Structured output (``response_format``) and forced tool calls constrain decoding with a grammar
(prepared in ``shimmy.serving``); with ``tool_choice`` "auto" the reply is parsed for calls.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.context import (
    CLIENT_ID_DESCRIPTION,
    CLIENT_ID_HEADER,
    client_gone,
    registry_of,
    settings_of,
)
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.openai.completions import completions
from shimmy.api.openai.events import OpenAIEvents, ResponseMeta, usage_object
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
from shimmy.api.openai.token_ids import embedding_inputs
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import EventStreamResponse
from shimmy.engine.types import Finished, TextDelta, TokenLogprob, Usage
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.chat import ToolPlan
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare, variants
from shimmy.serving.replies import ReplyStream, read_reply
from shimmy.serving.run import Collected, collect, frames, start
from shimmy.serving.structured import ParsedToolCall

if TYPE_CHECKING:
    from shimmy.models.entry import ModelEntry

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


class ChatEvents(OpenAIEvents):
    def __init__(
        self, meta: ResponseMeta, tools: ToolPlan, logprobs: bool, include_usage: bool
    ) -> None:
        super().__init__(meta, "chat.completion.chunk", include_usage)
        self.logprobs = logprobs
        # Text that may be a tool call is held back and parsed at the end: calls arrive whole,
        # in one delta, which OpenAI's clients accept.
        self.reply = ReplyStream(tools)

    def _delta(self, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
        return self.chunk({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})

    def opening(self) -> Iterable[bytes]:
        return (self._delta({"role": "assistant", "content": ""}),)

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        text = self.reply.feed(event.text)
        logprobs = _chat_logprobs(event.logprobs) if self.logprobs and event.logprobs else None
        if text or logprobs:
            return (self._delta({"content": text}, lp=logprobs),)
        return ()

    def finished(self, event: Finished) -> Iterable[bytes]:
        reply = self.reply.finish(event)
        out: list[bytes] = []
        if reply.text:
            out.append(self._delta({"content": reply.text}))
        if reply.calls:
            out.append(self._delta({"tool_calls": _tool_call_dicts(reply.calls, with_index=True)}))
        out.append(self._delta({}, reply.ending))
        out.extend(self.usage_chunk(event.usage))
        return out


def _chat_choice(result: Collected, index: int, tools: ToolPlan, logprobs: bool) -> dict[str, Any]:
    reply = read_reply(result.text, result.finished, tools)
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.calls:
        message["tool_calls"] = _tool_call_dicts(reply.calls, with_index=False)
    return {
        "index": index,
        "message": message,
        "logprobs": _chat_logprobs(result.logprobs) if logprobs else None,
        "finish_reason": reply.ending,
    }


async def chat_completions(request: Request) -> Response:
    body = parse_body(ChatCompletionRequest, await request.body())
    n = body.choices()
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    prepared = await prepare(engine, body.to_input(), Dialect.OPENAI_CHAT, settings_of(request))
    meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", engine.entry.id)
    if body.stream:
        events = ChatEvents(meta, prepared.tools, bool(body.logprobs), body.include_usage())
        return EventStreamResponse(frames(await start(engine, prepared), events))
    # n choices are n sequences of their own, generated in the same batches.
    results = await collect(engine, variants(prepared, n), until=client_gone(request))
    done: list[Collected] = []
    for result in results:
        if isinstance(result, ShimmyError):
            raise result
        done.append(result)
    choices = [
        _chat_choice(result, index, prepared.tools, bool(body.logprobs))
        for index, result in enumerate(done)
    ]
    first = done[0].finished.usage
    # The prompt is counted once, as OpenAI counts it; every choice's tokens were generated.
    usage = Usage(
        first.prompt_tokens,
        sum(r.finished.usage.completion_tokens for r in done),
        first.cached_tokens,
    )
    return JSONResponse(
        {**meta.envelope("chat.completion"), "choices": choices, "usage": usage_object(usage)}
    )


# --- embeddings -------------------------------------------------------------------------------


def _encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # OpenAI's base64 format: the little-endian float32 bytes of the vector.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embeddings(request: Request) -> Response:
    body = parse_body(EmbeddingRequest, await request.body())
    inputs = body.inputs()
    settings = settings_of(request)
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    result = await engine.embed(await embedding_inputs(inputs, settings.embedding_token_ids))
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
        description="With `suffix`: fill in the middle, from the model's FIM tokens.",
        body=CompletionRequest,
        response=TextCompletion,
        streams=[SSE],
        response_description="The completion, or its chunks",
        errors=GENERATION_ERRORS,
        headers={CLIENT_ID_HEADER: CLIENT_ID_DESCRIPTION},
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

"""llama.cpp's server routes: ``POST /infill`` (code completion for llama.vscode, llama.vim), the
table of every llama.cpp route (``/completion`` is in ``completion``, the others in ``server``),
and OpenAI's routes without the ``/v1`` prefix, as llama.cpp serves them too.

Answers have llama.cpp's shapes: one JSON object, or with ``stream`` server-sent events of
``{"content", "stop": false, ...}`` ending with the final object (``"stop": true``) and no
``[DONE]``; errors are llama.cpp's ``{"error": {"code", "message", "type"}}``.

A request with an ``X-Client-Id`` replaces the one still running with the same id (see
``shimmy.serving.lanes``); the replaced one ends with what it had, ``stop_type`` "none".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.context import (
    CLIENT_ID_DESCRIPTION,
    CLIENT_ID_HEADER,
    client_gone,
    lanes_of,
    registry_of,
    replace_key,
    settings_of,
)
from shimmy.api.errors import llamacpp_error_body
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.llamacpp import server
from shimmy.api.llamacpp.completion import completion
from shimmy.api.llamacpp.protocol import (
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    InfillAnswer,
    InfillRequest,
    LlamaCompletionAnswer,
    LlamaCompletionRequest,
    Props,
    SlotList,
    TokenizeRequest,
    TokenizeResponse,
)
from shimmy.api.llamacpp.results import Clock, generation_settings, select_fields, stop_type
from shimmy.api.openai import routes as openai
from shimmy.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    OpenAIModelList,
)
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, MODEL_ERRORS, SSE, api_route
from shimmy.api.sse import EventStreamResponse, sse_event
from shimmy.engine.types import Finished, TextDelta
from shimmy.errors import ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import Prepared, prepare
from shimmy.serving.run import collect_one, frames, start


@dataclass
class Final:
    """What the final answer is made of."""

    body: InfillRequest
    prepared: Prepared
    model: str
    clock: Clock

    def result(self, text: str, finished: Finished, has_new_line: bool) -> dict[str, Any]:
        usage = finished.usage
        result: dict[str, Any] = {
            "index": 0,
            "content": text,
            "tokens": [],
            "id_slot": -1,
            "stop": True,
            "model": self.model,
            "tokens_predicted": usage.completion_tokens,
            "tokens_evaluated": usage.prompt_tokens,
            "generation_settings": generation_settings(
                self.prepared,
                self.model,
                self.body.n_predict,
                self.body.stream,
                n_indent=self.body.n_indent,
                t_max_predict_ms=self.body.t_max_predict_ms,
                ignore_eos=self.body.ignore_eos,
            ),
            "has_new_line": has_new_line,
            "truncated": self.prepared.truncated,
            "stop_type": stop_type(finished),
            "stopping_word": finished.stop_sequence or "",
            "tokens_cached": usage.prompt_tokens + usage.completion_tokens,
            "timings": self.clock.timings(finished, time.monotonic()),
        }
        return select_fields(result, self.body.response_fields)


class InfillEvents:
    """``{"content", "stop": false}`` events, then the final object; no ``[DONE]``."""

    def __init__(self, final: Final) -> None:
        self.final = final
        self.has_new_line = False

    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        self.final.clock.first = self.final.clock.first or time.monotonic()
        if not event.text:
            return ()
        self.has_new_line = self.has_new_line or "\n" in event.text
        partial = {"index": 0, "content": event.text, "tokens": [], "stop": False, "id_slot": -1}
        return (sse_event(partial),)

    def finished(self, event: Finished) -> Iterable[bytes]:
        return (sse_event(self.final.result("", event, self.has_new_line)),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(llamacpp_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        return ()


async def infill(request: Request) -> Response:
    body = parse_body(InfillRequest, await request.body())
    key = replace_key(request)
    lanes = lanes_of(request)
    clock = Clock()
    # Claimed first: the completion this one replaces is cancelled while this one loads.
    lane = await lanes.claim(key)
    try:
        engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
        annotate(request, model=engine.entry.id)
        prepared = await prepare(
            engine,
            body.to_input(),
            Dialect.LLAMACPP,
            settings_of(request),
            prompt_param="input_prefix",
        )
        final = Final(body, prepared, engine.entry.id, clock)
        if body.stream:
            started = await start(engine, prepared)
            lane.attach(started.stream)
            events = frames(started, InfillEvents(final))
            return EventStreamResponse(lanes.releasing(key, lane, events))
        until = lane.watching(client_gone(request))
        result = await collect_one(engine, prepared, until=until)
    except BaseException:
        lanes.release(key, lane)
        raise
    lanes.release(key, lane)
    annotate(request, usage=result.finished.usage)
    clock.first = result.first_event_at
    return JSONResponse(final.result(result.text, result.finished, "\n" in result.text))


TAGS = ["llama.cpp"]
COMPLETION_DESCRIPTION = (
    "`prompt`: text, token ids, both mixed, `{prompt_string}`, or a list of those (answered "
    "with a list). Streamed: `{content, tokens, stop: false}` events, then the final object "
    "with `timings`; no `[DONE]`."
)


def _completion_route(path: str) -> BaseRoute:
    return api_route(
        path,
        completion,
        methods=["POST"],
        summary=f"Text completion (llama.cpp's {path})",
        description=COMPLETION_DESCRIPTION,
        body=LlamaCompletionRequest,
        response=LlamaCompletionAnswer,
        streams=[SSE],
        response_description="The completion (a list for a list of prompts)",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    )


def _model_route(path: str, endpoint: Any, summary: str, response: Any, **facts: Any) -> BaseRoute:
    return api_route(
        path,
        endpoint,
        methods=["GET"],
        summary=summary,
        response=response,
        errors=MODEL_ERRORS,
        tags=TAGS,
        **facts,
    )


# OpenAI's routes as llama.cpp also serves them, without /v1: the same handlers, with
# llama.cpp's error body (shimmy.api.errors). /completions is llama.cpp's own, as there.
UNPREFIXED_OPENAI: list[BaseRoute] = [
    api_route(
        "/chat/completions",
        openai.chat_completions,
        methods=["POST"],
        summary="Chat completion (OpenAI, without /v1, as llama.cpp serves it)",
        body=ChatCompletionRequest,
        response=ChatCompletion,
        streams=[SSE],
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/embeddings",
        openai.embeddings,
        methods=["POST"],
        summary="Embeddings (OpenAI, without /v1, as llama.cpp serves it)",
        body=EmbeddingRequest,
        response=EmbeddingList,
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/models",
        openai.list_models,
        methods=["GET"],
        summary="List usable models (OpenAI, without /v1, as llama.cpp serves it)",
        response=OpenAIModelList,
        tags=TAGS,
    ),
]

routes: list[BaseRoute] = [
    api_route(
        "/infill",
        infill,
        methods=["POST"],
        summary="Fill in the middle (llama.cpp's /infill)",
        description="Code completion between `input_prefix` and `input_suffix`, with "
        "`input_extra` files as context, built from the model's own FIM tokens; a model "
        "without them is refused (400). Streamed: `{content, stop: false}` events, then the "
        "final object.",
        body=InfillRequest,
        response=InfillAnswer,
        streams=[SSE],
        response_description="The completion (with `response_fields`: only those fields)",
        errors=GENERATION_ERRORS,
        headers={CLIENT_ID_HEADER: CLIENT_ID_DESCRIPTION},
        tags=TAGS,
    ),
    _completion_route("/completion"),
    _completion_route("/completions"),
    api_route(
        "/tokenize",
        server.tokenize,
        methods=["POST"],
        summary="Text to the model's token ids (llama.cpp)",
        description="`with_pieces`: each id with its text (its bytes when not valid UTF-8).",
        body=TokenizeRequest,
        response=TokenizeResponse,
        errors=MODEL_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/detokenize",
        server.detokenize,
        methods=["POST"],
        summary="Token ids to text (llama.cpp)",
        body=DetokenizeRequest,
        response=DetokenizeResponse,
        errors=MODEL_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/apply-template",
        server.apply_template,
        methods=["POST"],
        summary="The prompt a chat would be decoded from (llama.cpp)",
        body=ApplyTemplateRequest,
        response=ApplyTemplateResponse,
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    _model_route("/props", server.props, "The model and its defaults (llama.cpp)", Props),
    _model_route(
        "/slots",
        server.slots,
        "Whether each slot is busy (llama.cpp; read-only, prompts never shown)",
        SlotList,
    ),
    *UNPREFIXED_OPENAI,
]

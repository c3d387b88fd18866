"""llama.cpp's server routes: ``POST /infill`` (code completion for llama.vscode, llama.vim).

Answers have llama.cpp's shapes: one JSON object, or with ``stream`` server-sent events of
``{"content", "stop": false, ...}`` ending with the final object (``"stop": true``) and no
``[DONE]``; errors are llama.cpp's ``{"error": {"code", "message", "type"}}``. Timings are
measured here, around the engine: ``prompt_ms`` runs from the request's start to its first
token (a wait for a slot included), ``predicted_ms`` from then to the end.

A request with an ``X-Client-Id`` replaces the one still running with the same id (see
``shimmy.serving.lanes``); the replaced one ends with what it had, ``stop_type`` "none".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
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
from shimmy.api.llamacpp.protocol import InfillAnswer, InfillRequest, StopType
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import EventStreamResponse, sse_event
from shimmy.engine.types import Finished, TextDelta
from shimmy.errors import ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import Prepared, prepare
from shimmy.serving.run import collect_one, frames, start


def stop_type(finished: Finished) -> StopType:
    if finished.finish_reason == "cancelled":
        return "none"
    if finished.cause == "eog":
        return "eos"
    if finished.cause == "stop_string":
        return "word"
    return "limit"  # the length limit, and the line rules (llama.cpp's n_indent is a limit)


@dataclass
class Clock:
    """When the request started and its first event came (``time.monotonic()``)."""

    started: float = field(default_factory=time.monotonic)
    first: float | None = None

    def timings(self, finished: Finished, ended: float) -> dict[str, Any]:
        usage = finished.usage
        first = self.first if self.first is not None else ended
        prompt_n = usage.prompt_tokens - usage.cached_tokens
        prompt_ms = (first - self.started) * 1000
        predicted_ms = (ended - first) * 1000
        return {
            "cache_n": usage.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": usage.completion_tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": (
                predicted_ms / usage.completion_tokens if usage.completion_tokens else 0.0
            ),
            "predicted_per_second": (
                usage.completion_tokens / predicted_ms * 1000 if predicted_ms > 0 else 0.0
            ),
        }


def generation_settings(body: InfillRequest, prepared: Prepared, model: str) -> dict[str, Any]:
    sampling = prepared.request.sampling
    return {
        "model": model,
        "n_predict": body.n_predict,
        "seed": sampling.seed if sampling.seed is not None else 2**32 - 1,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_last_n": sampling.penalty_last_n,
        "repeat_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "samplers": list(sampling.chain) if sampling.chain is not None else None,
        "stop": list(prepared.request.stop),
        "n_indent": body.n_indent,
        "t_max_predict_ms": body.t_max_predict_ms,
        "stream": body.stream,
    }


def select_fields(result: dict[str, Any], paths: list[str] | None) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: only the fields named, by slash-separated paths, each
    keyed by its path; a path that leads nowhere is left out."""
    if paths is None:
        return result
    chosen: dict[str, Any] = {}
    for path in paths:
        node: Any = result
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            chosen[path] = node
    return chosen


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
            "generation_settings": generation_settings(self.body, self.prepared, self.model),
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
        tags=["llama.cpp"],
    )
]

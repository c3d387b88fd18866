"""``POST /completion`` (and ``/completions``): llama.cpp's own text completion.

A prompt of text and token ids mixed is tokenized here, piece by piece, into one sequence of
ids (text pieces without BOS, special-token spellings parsed, as llama.cpp does); a list of
prompts runs them together in one batch and answers a list. Streamed: ``data: {...}`` events
with ``content`` and the ids of its ``tokens``, ending with the final object (``stop`` true,
with ``timings``); there is no ``[DONE]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import llamacpp_error_body
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.llamacpp.protocol import LlamaCompletionRequest
from shimmy.api.llamacpp.results import Clock, generation_settings, select_fields, stop_type
from shimmy.api.protocol.common import parse_body
from shimmy.api.sse import EventStreamResponse, sse_event
from shimmy.engine.protocol import Engine
from shimmy.engine.types import Finished, TextDelta, TokenLogprob
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import Prepared, prepare
from shimmy.serving.run import Collected, collect, frames, start


async def engine_prompt(engine: Engine, pieces: list[str | int]) -> str | list[int]:
    """One prompt for the engine: a lone text stays text (the engine adds the BOS)."""
    if len(pieces) == 1 and isinstance(pieces[0], str):
        return pieces[0]
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, str):
            ids += await engine.tokenize(piece, add_special=False)
        else:
            ids.append(piece)
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids


def _token_prob(token: str, token_id: int, logprob: float, as_prob: bool) -> dict[str, Any]:
    value = {"prob": math.exp(logprob)} if as_prob else {"logprob": logprob}
    return {"id": token_id, "token": token, "bytes": list(token.encode()), **value}


def probabilities(tokens: Sequence[TokenLogprob], as_prob: bool) -> list[dict[str, Any]]:
    """llama.cpp's ``completion_probabilities``: each generated token and its likeliest
    alternatives, as log-probabilities (or probabilities with ``post_sampling_probs``)."""
    key = "top_probs" if as_prob else "top_logprobs"
    return [
        {
            **_token_prob(t.token, t.id, t.logprob, as_prob),
            key: [
                _token_prob(text, t.top_ids.get(text, -1), logprob, as_prob)
                for text, logprob in t.top.items()
            ],
        }
        for t in tokens
    ]


@dataclass
class Answer:
    """What one prompt's final object is made of."""

    body: LlamaCompletionRequest
    prepared: Prepared
    model: str
    prompt_text: str
    clock: Clock
    index: int = 0

    def result(self, text: str, finished: Finished, tokens: list[int]) -> dict[str, Any]:
        usage = finished.usage
        n_predict = self.body.n_predict
        if n_predict >= 0 and self.prepared.request.max_tokens is not None:
            n_predict = min(n_predict, self.prepared.request.max_tokens)
        return {
            "index": self.index,
            "content": text,
            "tokens": tokens if self.body.return_tokens else [],
            "id_slot": -1,
            "stop": True,
            "model": self.model,
            "prompt": self.prompt_text,
            "tokens_predicted": usage.completion_tokens,
            "tokens_evaluated": usage.prompt_tokens,
            "generation_settings": generation_settings(
                self.prepared,
                self.model,
                n_predict,
                self.body.stream,
                n_probs=self.body.n_probs,
                post_sampling_probs=self.body.post_sampling_probs,
                ignore_eos=self.body.ignore_eos,
            ),
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": stop_type(finished),
            "stopping_word": finished.stop_sequence or "",
            "tokens_cached": usage.prompt_tokens + usage.completion_tokens,
            "timings": self.clock.timings(finished, time.monotonic()),
        }

    def collected(self, result: Collected) -> dict[str, Any]:
        out = self.result(result.text, result.finished, result.tokens)
        if self.body.n_probs:
            out["completion_probabilities"] = probabilities(
                result.logprobs, self.body.post_sampling_probs
            )
        return select_fields(out, self.body.response_fields)


class CompletionEvents:
    """``{"content", "tokens", "stop": false}`` events, then the final object; no ``[DONE]``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.text: list[str] = []

    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        self.answer.clock.first = self.answer.clock.first or time.monotonic()
        self.text.append(event.text)
        partial: dict[str, Any] = {
            "index": 0,
            "content": event.text,
            "tokens": event.tokens or [],
            "stop": False,
            "id_slot": -1,
        }
        if self.answer.body.n_probs:
            partial["completion_probabilities"] = probabilities(
                event.logprobs or [], self.answer.body.post_sampling_probs
            )
        return (sse_event(partial),)

    def finished(self, event: Finished) -> Iterable[bytes]:
        # The text was sent in pieces; the final object carries none, as llama.cpp's.
        final = self.answer.result("", event, [])
        final["has_new_line"] = "\n" in "".join(self.text)
        return (sse_event(select_fields(final, self.answer.body.response_fields)),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(llamacpp_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        return ()


async def completion(request: Request) -> Response:
    body = parse_body(LlamaCompletionRequest, await request.body())
    pieces = body.prompts()
    if body.stream and len(pieces) > 1:
        raise InvalidRequest("streaming takes a single prompt", param="prompt")
    clock = Clock()
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    settings = settings_of(request)
    answers: list[Answer] = []
    for index, prompt_pieces in enumerate(pieces):
        prompt = await engine_prompt(engine, prompt_pieces)
        prepared = await prepare(engine, body.to_input(prompt), Dialect.LLAMACPP, settings)
        text = prompt if isinstance(prompt, str) else await engine.detokenize(prompt)
        answers.append(Answer(body, prepared, engine.entry.id, text, clock, index))
    if body.stream:
        started = await start(engine, answers[0].prepared)
        return EventStreamResponse(frames(started, CompletionEvents(answers[0])))
    results = await collect(engine, [a.prepared for a in answers], until=client_gone(request))
    objects: list[dict[str, Any]] = []
    for answer, result in zip(answers, results, strict=True):
        if isinstance(result, ShimmyError):
            raise result
        annotate(request, usage=result.finished.usage)
        clock.first = clock.first or result.first_event_at
        objects.append(answer.collected(result))
    return JSONResponse(objects[0] if len(objects) == 1 else objects)

"""``POST /v1/completions``: OpenAI's legacy text completions.

Beyond one text prompt: several prompts, prompts as token ids (the model's own), ``n`` choices
per prompt, ``best_of`` (that many candidates, the ``n`` likeliest per token returned), and
``echo``, which repeats the prompt before the completion and, with ``logprobs``, scores every
prompt token: what lm-evaluation-harness's loglikelihood tasks read (with ``max_tokens`` 0 or
1). Several choices are separate sequences in the engine, generated together in one batch.
With ``suffix`` it fills in the middle (``shimmy.serving.fim``); an ``X-Client-Id`` makes a
completion replace the one still running with the same id (``shimmy.serving.lanes``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, lanes_of, registry_of, replace_key, settings_of
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.openai.events import OpenAIEvents, ResponseMeta, finish_reason, usage_object
from shimmy.api.openai.protocol import CompletionRequest
from shimmy.api.protocol.common import parse_body
from shimmy.api.sse import EventStreamResponse
from shimmy.engine.protocol import Engine
from shimmy.engine.types import Finished, PromptToken, TextDelta, TokenLogprob, Usage
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare, variants
from shimmy.serving.run import Collected, collect, frames, start


def _completion_logprobs(
    tokens: Sequence[TokenLogprob], offsets: Sequence[int], shift: int = 0
) -> dict[str, Any]:
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": [offset + shift for offset in offsets],
    }


def _prompt_logprobs(tokens: Sequence[PromptToken]) -> dict[str, Any]:
    offsets: list[int] = []
    length = 0
    for token in tokens:
        offsets.append(length)
        length += len(token.token)
    return {
        "tokens": [t.token for t in tokens],
        # The first token has no logprob: nothing came before it to predict it.
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top or {}) if t.logprob is not None else None for t in tokens],
        "text_offset": offsets,
    }


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


class CompletionEvents(OpenAIEvents):
    def __init__(
        self, meta: ResponseMeta, logprobs: bool, include_usage: bool, echo: str | None
    ) -> None:
        super().__init__(meta, "text_completion", include_usage)
        self.logprobs = logprobs
        self.echo = echo
        self.offset = len(echo or "")

    def _choice(self, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        return self.chunk({"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish})

    def opening(self) -> Iterable[bytes]:
        return (self._choice(self.echo),) if self.echo else ()

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
        return (self._choice("", finish_reason(event)), *self.usage_chunk(event.usage))


def _likeliest(candidates: list[Collected], n: int) -> list[Collected]:
    """The ``n`` candidates with the highest mean log-probability per token (``best_of``)."""

    def score(result: Collected) -> float:
        if not result.logprobs:
            return 0.0
        return sum(t.logprob for t in result.logprobs) / len(result.logprobs)

    return sorted(candidates, key=score, reverse=True)[:n]


async def _echo_text(engine: Engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else await engine.detokenize(prompt)


def _choice(
    body: CompletionRequest, result: Collected, index: int, echo: str | None
) -> dict[str, Any]:
    logprobs: dict[str, Any] | None = None
    if body.logprobs is not None:
        shift = len(echo or "")
        logprobs = _completion_logprobs(result.logprobs, result.text_offsets, shift)
        if echo is not None and result.finished.prompt_tokens is not None:
            logprobs = _joined(_prompt_logprobs(result.finished.prompt_tokens), logprobs)
    return {
        "text": (echo or "") + result.text,
        "index": index,
        "logprobs": logprobs,
        "finish_reason": finish_reason(result.finished),
    }


async def completions(request: Request) -> Response:
    body = parse_body(CompletionRequest, await request.body())
    candidates = body.candidates()
    n = body.choices()
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming supports a single prompt", param="prompt")
    key, lanes = replace_key(request), lanes_of(request)
    # Claimed first: a completion this one replaces (X-Client-Id) stops while this one loads.
    lane = await lanes.claim(key)
    try:
        settings = settings_of(request)
        engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
        annotate(request, model=engine.entry.id)
        prepared = [
            await prepare(engine, body.to_input(p), Dialect.OPENAI_COMPLETIONS, settings)
            for p in prompts
        ]
        echoes = [await _echo_text(engine, p) if body.echo else None for p in prompts]
        meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", engine.entry.id)
        if body.stream:
            logprobs = body.logprobs is not None
            events = CompletionEvents(meta, logprobs, body.include_usage(), echoes[0])
            started = await start(engine, prepared[0])
            lane.attach(started.stream)
            return EventStreamResponse(lanes.releasing(key, lane, frames(started, events)))
        runs = [run for plan in prepared for run in variants(plan, candidates)]
        results = await collect(engine, runs, until=lane.watching(client_gone(request)))
    except BaseException:
        lanes.release(key, lane)
        raise
    lanes.release(key, lane)
    done: list[Collected] = []
    for result in results:
        if isinstance(result, ShimmyError):
            raise result
        done.append(result)
    choices: list[dict[str, Any]] = []
    usage = Usage()
    for number, echo in enumerate(echoes):
        group = done[number * candidates : (number + 1) * candidates]
        kept = _likeliest(group, n) if candidates > n else group
        choices += [_choice(body, result, len(choices) + i, echo) for i, result in enumerate(kept)]
        # The prompt is counted once per prompt; every candidate's tokens were generated.
        first = group[0].finished.usage
        usage = Usage(
            usage.prompt_tokens + first.prompt_tokens,
            usage.completion_tokens + sum(r.finished.usage.completion_tokens for r in group),
            usage.cached_tokens + first.cached_tokens,
        )
    return JSONResponse(
        {**meta.envelope("text_completion"), "choices": choices, "usage": usage_object(usage)}
    )

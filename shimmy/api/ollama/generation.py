"""Ollama's ``/api/generate`` and ``/api/chat``: streamed as NDJSON unless ``stream: false``.

Each line is a JSON object with ``done: false`` and a piece of text (``response`` or
``message.content``); the last one has ``done: true``, ``done_reason``, the token counts and
the durations in nanoseconds (``/api/generate`` adds ``context``, the tokens of the whole
exchange, which a client may send back to continue it). Without ``stream`` the same pieces come
merged into one object. A failure once streaming has begun is a last line ``{"error": ...}``,
which Ollama's clients raise.

A request without a prompt (``/api/generate``) or without messages (``/api/chat``) only loads
the model (``done_reason: "load"``), or unloads it when ``keep_alive`` is 0 (``"unload"``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import error_message
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.ollama import gotemplate
from shimmy.api.ollama.names import find_entry, rfc3339
from shimmy.api.ollama.protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import NDJSON
from shimmy.api.sse import EventStreamResponse
from shimmy.engine.types import Finished, TextDelta, TokenLogprob
from shimmy.errors import ContextLengthExceeded, InvalidRequest, ShimmyError
from shimmy.serving.chat import Message, ToolPlan
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import GenerationInput, Prepared, prepare
from shimmy.serving.run import Started, frames, start
from shimmy.serving.structured import ToolCallStreamFilter

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.models.entry import ModelEntry

Kind = Literal["generate", "chat"]


def ndjson_line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def check_abilities(name: str, think: object, images: bool) -> None:
    """What shimmy's models cannot do, refused as Ollama refuses it for models without it."""
    if think not in (None, False):
        raise InvalidRequest(f'"{name}" does not support thinking', param="think")
    if images:
        raise InvalidRequest(f'"{name}" does not support images', param="images")


class Clock:
    """Ollama's durations, in nanoseconds: loading, reading the prompt, writing the reply."""

    def __init__(self) -> None:
        self.begun = time.monotonic_ns()
        self.loaded = self.submitted = self.first = self.begun

    def mark_loaded(self) -> None:
        self.loaded = time.monotonic_ns()

    def mark_submitted(self) -> None:
        self.submitted = time.monotonic_ns()

    def mark_first(self) -> None:
        self.first = time.monotonic_ns()

    def report(self, finished: Finished) -> dict[str, Any]:
        now = time.monotonic_ns()
        return {
            "done_reason": "length" if finished.finish_reason == "length" else "stop",
            "total_duration": now - self.begun,
            "load_duration": self.loaded - self.begun,
            "prompt_eval_count": finished.usage.prompt_tokens,
            "prompt_eval_duration": self.first - self.submitted,
            "eval_count": finished.usage.completion_tokens,
            "eval_duration": now - self.first,
        }


def _logprobs(tokens: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": token.token,
            "logprob": token.logprob,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in token.top.items()],
        }
        for token in tokens
    ]


class OllamaEvents:
    """Engine events as Ollama's chunks (dicts; the caller writes them as lines or merges them).
    Text that may be a tool call is held back and parsed when the reply ends."""

    def __init__(self, kind: Kind, name: str, tools: ToolPlan, clock: Clock, logprobs: bool):
        self.kind = kind
        self.name = name
        self.clock = clock
        self.logprobs = logprobs
        self.held = ToolCallStreamFilter(tools.names) if tools.offered else None
        self.text: list[str] = []  # everything generated, for the context
        self.failure: ShimmyError | None = None
        self.finished_event: Finished | None = None

    def _chunk(self, text: str, **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.name, "created_at": rfc3339(time.time())}
        if self.kind == "chat":
            chunk["message"] = {"role": "assistant", "content": text, **extra}
        else:
            chunk["response"] = text
        chunk["done"] = False
        return chunk

    def opening(self) -> Iterable[dict[str, Any]]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[dict[str, Any]]:
        self.text.append(event.text)
        text = self.held.feed(event.text) if self.held is not None else event.text
        if not text and not (self.logprobs and event.logprobs):
            return ()
        chunk = self._chunk(text)
        if self.logprobs and event.logprobs:
            chunk["logprobs"] = _logprobs(event.logprobs)
        return (chunk,)

    def finished(self, event: Finished) -> Iterable[dict[str, Any]]:
        self.finished_event = event
        out: list[dict[str, Any]] = []
        if self.held is not None:
            rest, calls = self.held.finish()
            if rest:
                out.append(self._chunk(rest))
            if calls:
                tool_calls = [
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "function": {
                            "index": index,
                            "name": call.name,
                            "arguments": json.loads(call.arguments),
                        },
                    }
                    for index, call in enumerate(calls)
                ]
                out.append(self._chunk("", tool_calls=tool_calls))
        final = self._chunk("")
        final["done"] = True
        final.update(self.clock.report(event))
        out.append(final)
        return out

    def error(self, err: ShimmyError) -> Iterable[dict[str, Any]]:
        self.failure = err
        return ({"error": error_message(err)},)

    def closing(self) -> Iterable[dict[str, Any]]:
        return ()


def merge(chunks: list[dict[str, Any]], kind: Kind) -> dict[str, Any]:
    """The chunks of one reply as the single object Ollama answers without streaming."""
    final = dict(chunks[-1])
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        for chunk in chunks:
            message["content"] += chunk["message"]["content"]
            if "tool_calls" in chunk["message"]:
                message["tool_calls"] = chunk["message"]["tool_calls"]
        final["message"] = message
    else:
        final["response"] = "".join(chunk["response"] for chunk in chunks)
    logprobs = [lp for chunk in chunks for lp in chunk.get("logprobs", ())]
    if logprobs:
        final["logprobs"] = logprobs
    return final


# --- the prompt -------------------------------------------------------------------------------


async def fit(
    engine: Engine, prepared: Prepared, *, context: list[int] | None, num_ctx: int | None
) -> Prepared:
    """``prepared`` continuing ``context`` (token ids sent back from an earlier answer) and
    kept within ``num_ctx`` tokens, when the client asks for less than the model's context."""
    limit = num_ctx if num_ctx is not None and num_ctx < engine.n_ctx else None
    if not context and limit is None:
        return prepared
    text = prepared.request.prompt
    assert isinstance(text, str)
    ids = [*(context or []), *await engine.tokenize(text, add_special=not context)]
    max_tokens = prepared.request.max_tokens
    if limit is not None:
        if len(ids) >= limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens but options.num_ctx is {limit}",
                param="options.num_ctx",
            )
        max_tokens = limit - len(ids) if max_tokens is None else min(max_tokens, limit - len(ids))
    prompt: str | list[int] = ids if context else text
    request = dataclasses.replace(prepared.request, prompt=prompt, max_tokens=max_tokens)
    return dataclasses.replace(prepared, request=request)


def _generate_input(
    body: OllamaGenerateRequest, options: OllamaOptions, engine: Engine
) -> GenerationInput:
    prompt = body.prompt or ""
    common: dict[str, Any] = {
        "sampling": options.sampling(engine.n_ctx),
        "stop": options.stop_list(),
        "max_tokens": options.max_tokens(),
        "logprobs": body.logprobs_top_n(),
        "response_format": body.response_format(),
    }
    if body.raw:
        return GenerationInput(prompt=prompt, **common)
    if body.template:
        text = gotemplate.render(body.template, system=body.system or "", prompt=prompt)
        # The model still ends its turns with its own markers.
        common["stop"] = [*common["stop"], *engine.template.stop_strings]
        return GenerationInput(prompt=text, **common)
    return GenerationInput(messages=[Message("user", prompt)], system=body.system, **common)


def _chat_input(body: OllamaChatRequest, options: OllamaOptions, engine: Engine) -> GenerationInput:
    return GenerationInput(
        messages=[message.to_message() for message in body.messages],
        sampling=options.sampling(engine.n_ctx),
        stop=options.stop_list(),
        max_tokens=options.max_tokens(),
        logprobs=body.logprobs_top_n(),
        tools=body.tool_specs(),
        wire_tools=body.wire_tools() or None,
        response_format=body.response_format(),
    )


# --- answering --------------------------------------------------------------------------------


async def _load_only(
    request: Request, entry: ModelEntry, name: str, keep_alive: float | None, kind: Kind
) -> Response:
    registry = registry_of(request)
    if keep_alive == 0:
        await registry.unload(entry.id)
        reason = "unload"
    else:
        await registry.get_engine(entry.id, keep_alive=keep_alive, wait=wants_to_wait(request))
        reason = "load"
    answer: dict[str, Any] = {"model": name, "created_at": rfc3339(time.time())}
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return JSONResponse({**answer, "done": True, "done_reason": reason})


async def _gathered(
    request: Request, started: Started, chunks: AsyncGenerator[dict[str, Any], None]
) -> list[dict[str, Any]]:
    """Every chunk; the generation stops if the client hangs up meanwhile."""
    watch = asyncio.ensure_future(client_gone(request)())
    watch.add_done_callback(lambda _: started.cancel())
    try:
        return [chunk async for chunk in chunks]
    finally:
        watch.cancel()
        await chunks.aclose()


class _Answer:
    """One generation to answer, streamed or whole. ``context``: the tokens the prompt
    continued and the prompt's text, when the answer ends with the exchange's tokens."""

    def __init__(
        self,
        request: Request,
        engine: Engine,
        started: Started,
        events: OllamaEvents,
        context: tuple[list[int], str] | None,
    ):
        self.request = request
        self.engine = engine
        self.started = started
        self.events = events
        self.context = context

    async def _context(self, prefix: list[int], prompt: str) -> list[int]:
        # As Ollama does: the prompt and the reply tokenized again, after what they continued.
        text = prompt + "".join(self.events.text)
        return [*prefix, *await self.engine.tokenize(text, add_special=not prefix)]

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        async for chunk in frames(self.started, self.events):
            if chunk.get("done"):
                if self.context is not None:
                    chunk["context"] = await self._context(*self.context)
                if self.events.finished_event is not None:
                    annotate(self.request, usage=self.events.finished_event.usage)
            yield chunk

    async def respond(self, stream: bool) -> Response:
        if stream:
            lines = (ndjson_line(chunk) async for chunk in self.chunks())
            return EventStreamResponse(lines, media_type=NDJSON)
        chunks = await _gathered(self.request, self.started, self.chunks())
        if self.events.failure is not None:
            raise self.events.failure
        return JSONResponse(merge(chunks, self.events.kind))


async def _run(
    request: Request,
    engine: Engine,
    given: GenerationInput,
    reply: tuple[Kind, str, Clock],
    *,
    context: list[int] | None = None,
    num_ctx: int | None = None,
    returns_context: bool = False,
) -> _Answer:
    kind, name, clock = reply
    try:
        prepared = await prepare(engine, given, Dialect.OLLAMA, settings_of(request))
    except InvalidRequest as err:
        raise _in_ollama_terms(err) from None
    if prepared.grammar_param == _FORMAT_PARAM:
        prepared = dataclasses.replace(prepared, grammar_param="format")
    rendered = prepared.request.prompt
    assert isinstance(rendered, str)  # token ids come only from ``fit``
    prepared = await fit(engine, prepared, context=context, num_ctx=num_ctx)
    events = OllamaEvents(kind, name, prepared.tools, clock, given.logprobs is not None)
    clock.mark_submitted()
    started = await start(engine, prepared)
    clock.mark_first()
    returned = (list(context or []), rendered) if returns_context else None
    return _Answer(request, engine, started, events, returned)


# What the serving layer calls Ollama's ``format`` (OpenAI's name for it).
_FORMAT_PARAM = "response_format"


def _in_ollama_terms(err: InvalidRequest) -> InvalidRequest:
    if err.param != _FORMAT_PARAM:
        return err
    return err.copy_with(param="format", details=f"format: {err.details or err.message}")


async def _engine(
    request: Request, entry: ModelEntry, keep_alive: float | None, clock: Clock
) -> Engine:
    engine = await registry_of(request).get_engine(
        entry.id, keep_alive=keep_alive, wait=wants_to_wait(request)
    )
    clock.mark_loaded()
    annotate(request, model=engine.entry.id)
    return engine


async def generate(request: Request) -> Response:
    clock = Clock()
    body = parse_body(OllamaGenerateRequest, await request.body())
    body.check_raw()
    entry = find_entry(registry_of(request), body.model)
    check_abilities(body.model, body.think, bool(body.images))
    if body.suffix:
        raise InvalidRequest("this model cannot fill in the middle", param="suffix")
    if not body.prompt:
        return await _load_only(request, entry, body.model, body.keep_alive, "generate")
    engine = await _engine(request, entry, body.keep_alive, clock)
    options = body.options_or_default()
    answer = await _run(
        request,
        engine,
        _generate_input(body, options, engine),
        ("generate", body.model, clock),
        context=body.context,
        num_ctx=options.num_ctx,
        # As in Ollama: a raw prompt has no context to continue.
        returns_context=not body.raw,
    )
    return await answer.respond(body.streams)


async def chat(request: Request) -> Response:
    clock = Clock()
    body = parse_body(OllamaChatRequest, await request.body())
    entry = find_entry(registry_of(request), body.model)
    check_abilities(body.model, body.think, body.has_images())
    if not body.messages:
        return await _load_only(request, entry, body.model, body.keep_alive, "chat")
    engine = await _engine(request, entry, body.keep_alive, clock)
    options = body.options_or_default()
    given = _chat_input(body, options, engine)
    answer = await _run(
        request, engine, given, ("chat", body.model, clock), num_ctx=options.num_ctx
    )
    return await answer.respond(body.streams)

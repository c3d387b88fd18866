"""The OpenAI-compatible API, mounted at ``/v1``: chat and text completions, embeddings, models.

Requests, responses, stream chunks and errors have OpenAI's shapes, so the official clients and
the editors built on them work unchanged. Errors are raised as ``ShimmyError``s; the app's
handlers render them in OpenAI's format for every path under ``/v1``.

Structured output (``response_format``) and forced tool calls constrain decoding with a grammar
(see ``shimmy.api.structured``); with ``tool_choice`` "auto" the reply is parsed for calls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shimmy import __version__
from shimmy.api.access_log import annotate
from shimmy.api.errors import openai_error_body, unexpected_error
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    NamedToolChoice,
    parse_body,
)
from shimmy.api.schemas import parse_json
from shimmy.api.sse import DONE, EventStreamResponse, sse_event, wait_for_disconnect
from shimmy.api.structured import (
    ParsedToolCall,
    ToolCallStreamFilter,
    ToolSpec,
    extract_tool_calls,
    json_instruction,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
    tools_instruction,
)
from shimmy.engine.types import Finished, GenerationRequest, TextDelta, TokenLogprob, Usage
from shimmy.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ShimmyError,
)
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine as ModelEngine
    from shimmy.engine.protocol import Stream as GenerationStream
    from shimmy.models.entry import ModelEntry
    from shimmy.registry import ModelRegistry

SYSTEM_FINGERPRINT = f"shimmy-{__version__}"
# OpenAI's default for the legacy completions endpoint; chat has no default (up to the cap).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# --- shared pieces ----------------------------------------------------------------------------


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


@dataclass
class Collected:
    """Everything one generation produced, for non-streamed responses."""

    text: str
    logprobs: list[TokenLogprob]
    text_offsets: list[int]  # where each token's text starts in ``text``
    finished: Finished


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        **usage.as_dict(),
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _finish_reason(finished: Finished) -> str:
    # "cancelled" only happens once the client is gone; nobody reads it, but keep the enum.
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason


def _max_tokens(requested: int | None, default: int, settings: Settings) -> int:
    return min(requested if requested is not None else default, settings.max_tokens_cap)


async def _drain(stream: GenerationStream) -> Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    offsets: list[int] = []
    length = 0
    async for event in stream:
        if isinstance(event, TextDelta):
            for token in event.logprobs or ():
                logprobs.append(token)
                offsets.append(length)
            parts.append(event.text)
            length += len(event.text)
        else:
            return Collected("".join(parts), logprobs, offsets, event)
    raise GenerationFailed("the generation ended unexpectedly")


async def _collect_all(streams: Sequence[GenerationStream], request: Request) -> list[Collected]:
    """Run generations to the end together. When one fails, or the client hangs up, the
    others are cancelled rather than left generating for nobody."""

    def cancel_all() -> None:
        for stream in streams:
            stream.cancel()

    async def drain_one(stream: GenerationStream) -> Collected:
        try:
            return await _drain(stream)
        except BaseException:
            cancel_all()
            raise

    gathered = asyncio.gather(*(drain_one(s) for s in streams), return_exceptions=True)
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        racing: set[asyncio.Future[Any]] = {gathered, watch}
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            cancel_all()  # the client is gone; what is collected so far goes nowhere
        results = await gathered
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        cancel_all()
    collected: list[Collected] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        collected.append(result)
    return collected


async def _first_event(
    stream: GenerationStream, adjust: Callable[[ShimmyError], ShimmyError]
) -> TextDelta | Finished:
    # Pull the first event before answering a stream: failures before any text (context
    # exceeded, a grammar llama.cpp rejects) still get a proper status code and error body.
    try:
        return await anext(stream)
    except ShimmyError as err:
        stream.cancel()
        raise adjust(err) from None
    except BaseException:
        stream.cancel()
        raise


def _submit_all(
    engine: ModelEngine, generations: Sequence[GenerationRequest]
) -> list[GenerationStream]:
    return engine.submit_many(list(generations))


def _error_event(exc: BaseException, adjust: Callable[[ShimmyError], ShimmyError]) -> bytes:
    if isinstance(exc, ShimmyError):
        return sse_event(openai_error_body(adjust(exc)))
    if isinstance(exc, StopAsyncIteration):
        return sse_event(openai_error_body(GenerationFailed("the generation ended unexpectedly")))
    return sse_event(openai_error_body(unexpected_error(exc)))


def _no_adjust(err: ShimmyError) -> ShimmyError:
    return err


# --- chat completions -------------------------------------------------------------------------


@dataclass
class ToolPlan:
    offered: list[ToolSpec]  # tools the model may call; empty when tools are off
    forced: list[ToolSpec] | None  # the tools one of which must be called, or None
    forced_name: str | None = None

    @property
    def names(self) -> list[str]:
        return [tool.name for tool in self.offered]


def _tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    tools = [
        ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
        for t in body.tools or []
    ]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return ToolPlan(offered=[], forced=None)
    if not tools:
        if choice == "auto":
            return ToolPlan(offered=[], forced=None)
        raise InvalidRequest("tool_choice needs a non-empty 'tools' list", param="tool_choice")
    if choice == "auto":
        return ToolPlan(offered=tools, forced=None)
    if choice == "required":
        return ToolPlan(offered=tools, forced=tools)
    assert isinstance(choice, NamedToolChoice)
    named = [tool for tool in tools if tool.name == choice.function.name]
    if not named:
        raise InvalidRequest(
            f"tool_choice names {choice.function.name!r}, which is not in 'tools'",
            param="tool_choice",
        )
    return ToolPlan(offered=tools, forced=named, forced_name=named[0].name)


def _template_knows_tools(engine: ModelEngine) -> bool:
    # A GGUF's own template that mentions tools renders them in the format the model was
    # trained on; anything else gets the tools described in a system note.
    source = engine.template.source
    text = engine.options.chat_template if source == "override" else engine.entry.chat_template
    return source in ("gguf", "override") and "tools" in (text or "")


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _template_messages(messages: list[ChatMessage], native_tools: bool) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts chat templates read.

    Templates that know tools get OpenAI/Hugging Face style ``tool_calls`` and ``tool``
    messages. Others get calls as the JSON text the model is told to write, and tool results
    as user turns (many templates accept only system, user and assistant).
    """
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        text = message.text()
        if role == "assistant" and message.tool_calls:
            calls = [
                {
                    "name": call.function.name,
                    "arguments": _arguments_object(call.function.arguments),
                }
                for call in message.tool_calls
            ]
            for call in message.tool_calls:
                if call.id:
                    call_names[call.id] = call.function.name
            if native_tools:
                tool_calls = [
                    {"id": call.id, "type": "function", "function": spec}
                    for call, spec in zip(message.tool_calls, calls, strict=True)
                ]
                out.append({"role": "assistant", "content": text, "tool_calls": tool_calls})
            else:
                written = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in calls)
                out.append({"role": "assistant", "content": f"{text}\n{written}".strip()})
        elif role == "tool":
            name = message.name or call_names.get(message.tool_call_id or "")
            if native_tools:
                result: dict[str, Any] = {"role": "tool", "content": text}
                if message.tool_call_id:
                    result["tool_call_id"] = message.tool_call_id
                if name:
                    result["name"] = name
                out.append(result)
            else:
                label = f"Result of the tool {name!r}" if name else "Tool result"
                _append_user_text(out, f"{label}:\n{text}")
        else:
            out.append({"role": role, "content": text})
    return out


def _append_user_text(messages: list[dict[str, Any]], text: str) -> None:
    # Consecutive user turns are merged: several templates insist that roles alternate.
    if messages and messages[-1]["role"] == "user":
        messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{text}"}
    else:
        messages.append({"role": "user", "content": text})


def _add_system_note(messages: list[dict[str, Any]], note: str) -> None:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        messages[0] = {**first, "content": f"{first['content']}\n\n{note}".strip()}
    else:
        messages.insert(0, {"role": "system", "content": note})


@dataclass
class ChatPlan:
    generation: GenerationRequest
    tools: ToolPlan
    logprobs: bool
    grammar_param: str | None = None  # which request field a grammar error is about

    def adjust_error(self, err: ShimmyError) -> ShimmyError:
        """Name the request field an engine error is about, in chat terms."""
        if isinstance(err, ContextLengthExceeded):
            err.param = "messages"
        elif err.param == "grammar" and self.grammar_param is not None:
            err.param = self.grammar_param
        return err


def _response_grammar(body: ChatCompletionRequest) -> tuple[str | None, Any]:
    """The grammar for ``response_format`` and the schema the model is told about."""
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None, None
    if response_format.type == "json_object":
        return json_object_grammar(), None
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise InvalidRequest(
            "response_format of type json_schema needs json_schema.schema",
            param="response_format",
        )
    return json_schema_grammar(spec.json_schema), spec.json_schema


async def _plan_chat(
    body: ChatCompletionRequest, engine: ModelEngine, settings: Settings
) -> ChatPlan:
    tools = _tool_plan(body)
    native_tools = _template_knows_tools(engine)
    messages = _template_messages(body.messages, native_tools)
    grammar: str | None = None
    grammar_param: str | None = None
    if tools.forced:
        grammar = await asyncio.to_thread(tool_call_grammar, tools.forced)
        grammar_param = "tools"
    # The format is validated even when a forced tool call takes precedence over it.
    response_grammar, schema = await asyncio.to_thread(_response_grammar, body)
    if response_grammar is not None and grammar is None:
        grammar, grammar_param = response_grammar, "response_format"
        # OpenAI asks clients to say "JSON" themselves; saying it again costs nothing and
        # keeps small models from fighting the grammar.
        _add_system_note(messages, json_instruction(schema))
    if tools.offered and not native_tools:
        _add_system_note(
            messages,
            tools_instruction(tools.offered, tools.forced_name, required=tools.forced is not None),
        )
    tool_dicts = (
        [t.model_dump(exclude_none=True) for t in body.tools or []] if tools.offered else None
    )
    # Rendering is bounded, but it is CPU work: keep it off the event loop.
    prompt = await asyncio.to_thread(engine.template.render, messages, tools=tool_dicts)
    stop = body.stop_list()
    stop += [marker for marker in engine.template.stop_strings if marker not in stop]
    generation = GenerationRequest(
        prompt=prompt,
        max_tokens=_max_tokens(body.requested_max_tokens(), settings.max_tokens_cap, settings),
        sampling=body.sampling(grammar),
        stop=stop,
        logprobs=body.logprobs_top_n(),
    )
    return ChatPlan(generation, tools, logprobs=bool(body.logprobs), grammar_param=grammar_param)


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


async def chat_completions(request: Request) -> Response:
    body = parse_body(ChatCompletionRequest, parse_json(await request.body()))
    body.check_single_choice()
    engine = await _registry(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    plan = await _plan_chat(body, engine, _settings(request))
    [stream] = _submit_all(engine, [plan.generation])
    meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", engine.entry.id)
    if body.stream:
        first = await _first_event(stream, plan.adjust_error)
        events = _chat_events(stream, first, meta, plan, body.include_usage())
        return EventStreamResponse(events)
    try:
        [result] = await _collect_all([stream], request)
    except ShimmyError as err:
        raise plan.adjust_error(err) from None
    finish = _finish_reason(result.finished)
    content: str | None = result.text
    message: dict[str, Any] = {"role": "assistant"}
    if plan.tools.offered:
        content, calls = extract_tool_calls(result.text, plan.tools.names)
        if calls:
            message["tool_calls"] = _tool_call_dicts(calls, with_index=False)
            finish = "tool_calls"
    message["content"] = content
    message["refusal"] = None
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _chat_logprobs(result.logprobs) if plan.logprobs else None,
        "finish_reason": finish,
    }
    return JSONResponse(
        {
            **meta.envelope("chat.completion"),
            "choices": [choice],
            "usage": _usage(result.finished.usage),
        }
    )


async def _chat_events(
    stream: GenerationStream,
    first: TextDelta | Finished,
    meta: ResponseMeta,
    plan: ChatPlan,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    envelope = meta.envelope("chat.completion.chunk")
    # With include_usage, OpenAI sends "usage": null on every chunk but the last.
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_event({**envelope, "choices": [choice], **usage_field})

    # Text that may be a tool call is held back and parsed at the end: calls arrive whole, in
    # one delta, which OpenAI's clients accept.
    held = ToolCallStreamFilter(plan.tools.names) if plan.tools.offered else None
    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while isinstance(event, TextDelta):
            text = held.feed(event.text) if held is not None else event.text
            logprobs = _chat_logprobs(event.logprobs) if plan.logprobs and event.logprobs else None
            if text or logprobs:
                yield chunk({"content": text}, logprobs=logprobs)
            event = await anext(stream)
        finish = _finish_reason(event)
        if held is not None:
            rest, calls = held.finish()
            if rest:
                yield chunk({"content": rest})
            if calls:
                yield chunk({"tool_calls": _tool_call_dicts(calls, with_index=True)})
                finish = "tool_calls"
        yield chunk({}, finish)
        if include_usage:
            yield sse_event({**envelope, "choices": [], "usage": _usage(event.usage)})
    except Exception as exc:
        yield _error_event(exc, plan.adjust_error)
    finally:
        stream.cancel()
    yield DONE


# --- text completions -------------------------------------------------------------------------


def _completion_logprobs(tokens: Sequence[TokenLogprob], offsets: Sequence[int]) -> dict[str, Any]:
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": list(offsets),
    }


async def completions(request: Request) -> Response:
    body = parse_body(CompletionRequest, parse_json(await request.body()))
    body.check_supported()
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming supports a single prompt", param="prompt")
    settings = _settings(request)
    engine = await _registry(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    generations = [
        GenerationRequest(
            prompt=prompt,
            max_tokens=_max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, settings),
            sampling=body.sampling(),
            stop=body.stop_list(),
            logprobs=body.logprobs,
        )
        for prompt in prompts
    ]
    streams = _submit_all(engine, generations)
    meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", engine.entry.id)
    want_logprobs = body.logprobs is not None
    if body.stream:
        [stream] = streams
        first = await _first_event(stream, _no_adjust)
        return EventStreamResponse(
            _completion_events(stream, first, meta, want_logprobs, body.include_usage())
        )
    results = await _collect_all(streams, request)
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
        for index, result in enumerate(results)
    ]
    usage = Usage(
        prompt_tokens=sum(r.finished.usage.prompt_tokens for r in results),
        completion_tokens=sum(r.finished.usage.completion_tokens for r in results),
        cached_tokens=sum(r.finished.usage.cached_tokens for r in results),
    )
    return JSONResponse(
        {**meta.envelope("text_completion"), "choices": choices, "usage": _usage(usage)}
    )


async def _completion_events(
    stream: GenerationStream,
    first: TextDelta | Finished,
    meta: ResponseMeta,
    want_logprobs: bool,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    envelope = meta.envelope("text_completion")
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return sse_event({**envelope, "choices": [choice], **usage_field})

    offset = 0
    try:
        event = first
        while isinstance(event, TextDelta):
            tokens = event.logprobs or []
            logprobs = (
                _completion_logprobs(tokens, [offset] * len(tokens))
                if want_logprobs and tokens
                else None
            )
            if event.text or logprobs:
                yield chunk(event.text, logprobs=logprobs)
            offset += len(event.text)
            event = await anext(stream)
        yield chunk("", _finish_reason(event))
        if include_usage:
            yield sse_event({**envelope, "choices": [], "usage": _usage(event.usage)})
    except Exception as exc:
        yield _error_event(exc, _no_adjust)
    finally:
        stream.cancel()
    yield DONE


# --- embeddings -------------------------------------------------------------------------------


def _encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # OpenAI's base64 format: the little-endian float32 bytes of the vector.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embeddings(request: Request) -> Response:
    body = parse_body(EmbeddingRequest, parse_json(await request.body()))
    texts = body.texts()
    engine = await _registry(request).get_engine(body.model, wait=wants_to_wait(request))
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
    entries = [entry for entry in _registry(request).entries if entry.usable]
    return JSONResponse({"object": "list", "data": [_model_object(e) for e in entries]})


async def retrieve_model(request: Request) -> Response:
    entry = _registry(request).resolve(request.path_params["model_id"])
    return JSONResponse(_model_object(entry))


routes: list[BaseRoute] = [
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/completions", completions, methods=["POST"]),
    Route("/embeddings", embeddings, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/models/{model_id:path}", retrieve_model, methods=["GET"]),
]

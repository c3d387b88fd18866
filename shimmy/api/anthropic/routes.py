"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Bodies, stream events and errors have Anthropic's shapes, so the official ``anthropic`` SDK and
the tools built on it work when pointed at shimmy. The key may come as ``x-api-key`` (the
SDK's way) or as a Bearer token; ``anthropic-version`` and ``anthropic-beta`` are accepted and
do not change anything. Errors are Anthropic's ``{"type": "error", "error": {...}}`` for every
path under ``/v1/messages`` (``shimmy.api.errors``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.anthropic.protocol import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    TokenCount,
)
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.errors import anthropic_error_body
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import EventStreamResponse, sse_event
from shimmy.engine.protocol import Engine
from shimmy.engine.types import Finished, TextDelta, Usage
from shimmy.errors import ShimmyError
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import Prepared, prepare
from shimmy.serving.replies import Reply, ReplyStream, read_reply
from shimmy.serving.run import collect_one, frames, start
from shimmy.serving.structured import ParsedToolCall

HEADERS = {
    "anthropic-version": "Accepted for compatibility; every version gets the same answers",
    "x-api-key": "The API key, when the server has keys (a Bearer token works too)",
}


def _usage(usage: Usage, *, output: int | None = None) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens if output is None else output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def _stop_reason(reply: Reply) -> str:
    if reply.ending == "tool_calls":
        return "tool_use"
    if reply.ending == "length":
        return "max_tokens"
    return "stop_sequence" if reply.stop_sequence is not None else "end_turn"


def _tool_use(call: ParsedToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex[:24]}",
        "name": call.name,
        "input": json.loads(call.arguments),
    }


async def _prompt_tokens(engine: Engine, prepared: Prepared) -> int:
    prompt = prepared.request.prompt
    if not isinstance(prompt, str):
        return len(prompt)
    return len(await engine.tokenize(prompt, add_special=prepared.request.add_bos))


class MessageEvents:
    """Anthropic's stream: message_start, ping, then per content block content_block_start,
    deltas and content_block_stop, then message_delta (stop reason, usage) and message_stop.

    Text goes out as it is generated in a text block opened at its first character. Text that
    may be a tool call is held back and read at the end; each call becomes a tool_use block
    whose input arrives in one input_json_delta.
    """

    def __init__(self, message: dict[str, Any], prepared: Prepared, stops: list[str]) -> None:
        self.message = message
        self.reply = ReplyStream(prepared.tools, stops)
        self.index = 0  # the next content block's index
        self.text_open = False

    @staticmethod
    def _event(name: str, **data: Any) -> bytes:
        return sse_event({"type": name, **data}, event=name)

    def opening(self) -> Iterable[bytes]:
        return (
            self._event("message_start", message=self.message),
            self._event("ping"),
        )

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        out = []
        if not self.text_open:
            self.text_open = True
            block = {"type": "text", "text": ""}
            out.append(self._event("content_block_start", index=self.index, content_block=block))
        delta = {"type": "text_delta", "text": text}
        out.append(self._event("content_block_delta", index=self.index, delta=delta))
        return out

    def _close_text(self) -> list[bytes]:
        if not self.text_open:
            return []
        self.text_open = False
        self.index += 1
        return [self._event("content_block_stop", index=self.index - 1)]

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        return self._text(self.reply.feed(event.text))

    def finished(self, event: Finished) -> Iterable[bytes]:
        reply = self.reply.finish(event)
        out = self._text(reply.text or "")
        out += self._close_text()
        for call in reply.calls:
            block = _tool_use(call)
            arguments = json.dumps(block["input"], ensure_ascii=False)
            block["input"] = {}
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(self._event("content_block_start", index=self.index, content_block=block))
            out.append(self._event("content_block_delta", index=self.index, delta=delta))
            out.append(self._event("content_block_stop", index=self.index))
            self.index += 1
        stop = {"stop_reason": _stop_reason(reply), "stop_sequence": reply.stop_sequence}
        out.append(self._event("message_delta", delta=stop, usage=_usage(event.usage)))
        out.append(self._event("message_stop"))
        return out

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(anthropic_error_body(err), event="error"),)

    def closing(self) -> Iterable[bytes]:
        return ()


async def create_message(request: Request) -> Response:
    body = parse_body(MessagesRequest, await request.body())
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    prepared = await prepare(engine, body.to_input(), Dialect.ANTHROPIC, settings_of(request))
    message: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": engine.entry.id,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    stops = body.stop_list()
    if body.stream:
        prompt_tokens = await _prompt_tokens(engine, prepared)
        started = await start(engine, prepared)
        message["usage"] = _usage(Usage(prompt_tokens), output=0)
        return EventStreamResponse(frames(started, MessageEvents(message, prepared, stops)))
    result = await collect_one(engine, prepared, until=client_gone(request))
    reply = read_reply(result.text, result.finished, prepared.tools, stops)
    content: list[dict[str, Any]] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    content += [_tool_use(call) for call in reply.calls]
    message.update(
        content=content,
        stop_reason=_stop_reason(reply),
        stop_sequence=reply.stop_sequence,
        usage=_usage(result.finished.usage),
    )
    return JSONResponse(message)


async def count_tokens(request: Request) -> Response:
    body = parse_body(CountTokensRequest, await request.body())
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    # Prepared exactly as a message would be, so the count includes the template, the system
    # prompt and the tool descriptions the model would read.
    prepared = await prepare(engine, body.to_input(), Dialect.ANTHROPIC, settings_of(request))
    return JSONResponse({"input_tokens": await _prompt_tokens(engine, prepared)})


TAGS = ["anthropic"]

# Mounted at /v1: errors are Anthropic's error body under /v1/messages (shimmy.api.errors).
routes: list[BaseRoute] = [
    api_route(
        "/messages",
        create_message,
        methods=["POST"],
        summary="Create a message (Anthropic Messages API)",
        description="Streamed: Anthropic's named events, `message_start` to `message_stop`.",
        body=MessagesRequest,
        response=MessageResponse,
        streams=[SSE],
        response_description="The message, or its events",
        errors=GENERATION_ERRORS,
        headers=HEADERS,
        tags=TAGS,
    ),
    api_route(
        "/messages/count_tokens",
        count_tokens,
        methods=["POST"],
        summary="Count a message's input tokens (Anthropic Messages API)",
        body=CountTokensRequest,
        response=TokenCount,
        response_description="How many tokens the model would read",
        errors=GENERATION_ERRORS,
        headers=HEADERS,
        tags=TAGS,
    ),
]

"""Writing Responses API answers: the response object, its output items, and its stream.

A response's output is a message item holding the text (when there is any) followed by one
``function_call`` item per tool call. A reply cut off by ``max_output_tokens`` is "incomplete"
(``incomplete_details.reason`` "max_output_tokens"), as OpenAI reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shimmy.api.errors import openai_error_type
from shimmy.api.responses.protocol import new_id
from shimmy.api.sse import sse_event
from shimmy.engine.types import Finished, TextDelta, Usage
from shimmy.errors import ShimmyError
from shimmy.serving.chat import Message, ToolCallInput
from shimmy.serving.prepare import Prepared
from shimmy.serving.replies import Reply, ReplyStream


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


@dataclass
class ResponseDraft:
    """One response being answered: its fixed fields, and what it adds to the conversation."""

    model: str
    echo: dict[str, Any]  # the request's settings, repeated in the response
    conversation: list[Message]  # what the model read, without the instructions
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    message_id: str = field(default_factory=lambda: new_id("msg"))

    def skeleton(self, status: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [],
            "usage": None,
            "incomplete_details": None,
            "error": None,
            **self.echo,
        }

    def call_items(self, reply: Reply) -> list[dict[str, Any]]:
        return [
            {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": new_id("call"),
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
            for call in reply.calls
        ]

    def final(
        self, reply: Reply, text: str, usage: Usage, calls: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The finished response; ``text`` is everything said as content."""
        incomplete = reply.ending == "length"
        output = [message_item(self.message_id, text, "incomplete" if incomplete else "completed")]
        body = self.skeleton("incomplete" if incomplete else "completed")
        body["output"] = (output if text else []) + calls
        body["usage"] = usage_object(usage)
        if incomplete:
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def history(self, text: str, calls: list[dict[str, Any]]) -> tuple[Message, ...]:
        """The conversation a continuation (``previous_response_id``) starts from."""
        made = tuple(ToolCallInput(c["name"], c["arguments"], c["call_id"]) for c in calls)
        return (*self.conversation, Message("assistant", text, made))


# Called with the finished response object and the conversation it ends.
OnDone = Callable[[dict[str, Any], tuple[Message, ...]], None]


class ResponseEvents:
    """The Responses API's stream: response.created and response.in_progress; for text an
    output item and content part, ``response.output_text.delta``s and their ``.done``s; one
    function_call item per call; then response.completed (or .incomplete). Every event carries
    a ``sequence_number``."""

    def __init__(self, draft: ResponseDraft, prepared: Prepared, on_done: OnDone) -> None:
        self.draft = draft
        self.reply = ReplyStream(prepared.tools)
        self.on_done = on_done
        self.sequence = 0
        self.text: list[str] = []
        self.message_open = False

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return sse_event(payload, event=kind)

    def opening(self) -> Iterable[bytes]:
        return (
            self._event("response.created", response=self.draft.skeleton("in_progress")),
            self._event("response.in_progress", response=self.draft.skeleton("in_progress")),
        )

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.draft.message_id, "output_index": 0, "content_index": 0}

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        out = []
        if not self.message_open:
            self.message_open = True
            item = message_item(self.draft.message_id, "", "in_progress")
            item["content"] = []
            out.append(self._event("response.output_item.added", output_index=0, item=item))
            part = {"type": "output_text", "text": "", "annotations": []}
            out.append(self._event("response.content_part.added", **self._where(), part=part))
        self.text.append(text)
        out.append(
            self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])
        )
        return out

    def delta(self, event: TextDelta) -> Iterable[bytes]:
        return self._text(self.reply.feed(event.text))

    def finished(self, event: Finished) -> Iterable[bytes]:
        reply = self.reply.finish(event)
        out = self._text(reply.text or "")
        text = "".join(self.text)
        calls = self.draft.call_items(reply)
        body = self.draft.final(reply, text, event.usage, calls)
        if self.message_open:
            item = body["output"][0]
            part = item["content"][0]
            done = self._where()
            out.append(self._event("response.output_text.done", **done, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", **done, part=part))
            out.append(self._event("response.output_item.done", output_index=0, item=item))
        first = 1 if self.message_open else 0
        for index, call in enumerate(calls, start=first):
            added = {**call, "arguments": "", "status": "in_progress"}
            where = {"item_id": call["id"], "output_index": index}
            out.append(self._event("response.output_item.added", output_index=index, item=added))
            args = call["arguments"]
            out.append(self._event("response.function_call_arguments.delta", **where, delta=args))
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    arguments=args,
                    name=call["name"],
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=call))
        self.on_done(body, self.draft.history(text, calls))
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=body))
        return out

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        message = f"{err.message}: {err.details}" if err.details else err.message
        failed = self.draft.skeleton("failed")
        failed["error"] = {"code": err.code, "message": message}
        return (
            self._event(
                "error",
                code=err.code,
                message=message,
                param=err.param,
                error_type=openai_error_type(err.status),
            ),
            self._event("response.failed", response=failed),
        )

    def closing(self) -> Iterable[bytes]:
        return ()

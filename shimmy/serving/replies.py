"""What a generation said, read the same way by every dialect that offers tools: its text, the
tool calls found in it, and why it ended.

A forced tool call (``tool_choice`` required or named) is decoded under a grammar, so its text
is nothing but the call. When ``max_tokens`` cuts it off, the half-written JSON is neither a
call nor an answer: the reply then ends with "length", no call and no content, instead of
handing the client raw JSON as if the model had said it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from shimmy.engine.types import Finished
from shimmy.serving.chat import ToolPlan
from shimmy.serving.structured import ParsedToolCall, ToolCallStreamFilter, extract_tool_calls

Ending = Literal["stop", "length", "tool_calls"]


@dataclass
class Reply:
    text: str | None  # None: nothing but calls (or whitespace) was said
    calls: list[ParsedToolCall] = field(default_factory=list)
    ending: Ending = "stop"
    # The client's stop string that ended the reply; None for an end of turn (an end-of-turn
    # marker of the chat template is a stop string too, but not one the client asked for).
    stop_sequence: str | None = None


def _ending(finished: Finished, calls: list[ParsedToolCall]) -> Ending:
    if calls:
        return "tool_calls"
    # "cancelled" only happens once the client is gone; nobody reads it.
    return "length" if finished.finish_reason == "length" else "stop"


def _stop_sequence(finished: Finished, client_stops: Iterable[str]) -> str | None:
    matched = finished.stop_sequence
    return matched if matched is not None and matched in set(client_stops) else None


def read_reply(
    text: str, finished: Finished, tools: ToolPlan, client_stops: Iterable[str] = ()
) -> Reply:
    """The reply of a generation that ran to ``finished``."""
    content: str | None = text
    calls: list[ParsedToolCall] = []
    if tools.offered:
        content, calls = extract_tool_calls(text, tools.names)
        if tools.forced is not None and not calls:
            content = None
    return Reply(content, calls, _ending(finished, calls), _stop_sequence(finished, client_stops))


class ReplyStream:
    """The streamed counterpart of ``read_reply``: text is passed on as it comes, except what
    may be a tool call, which is held back and read at the end."""

    def __init__(self, tools: ToolPlan, client_stops: Iterable[str] = ()) -> None:
        self._held = ToolCallStreamFilter(tools.names) if tools.offered else None
        self._forced = tools.forced is not None
        self._stops = list(client_stops)

    def feed(self, text: str) -> str:
        """Generated text in; the part that can be sent as content now out."""
        return self._held.feed(text) if self._held is not None else text

    def finish(self, finished: Finished) -> Reply:
        """The end: content still to send (may be ""), the calls, and the ending."""
        rest, calls = self._held.finish() if self._held is not None else ("", [])
        if self._forced and not calls:
            rest = ""
        return Reply(rest, calls, _ending(finished, calls), _stop_sequence(finished, self._stops))

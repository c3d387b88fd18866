"""Dialect-neutral chat input: messages, tools and the response format, and how they become
the plain dicts a chat template reads.

Every dialect that speaks in messages (OpenAI, LocalLab, native, the CLI, and the ones to come)
converts its wire messages into ``Message`` and its tool options into ``ToolChoice``; from here
on they are all treated the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shimmy.errors import InvalidRequest
from shimmy.serving.structured import ToolSpec

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine


@dataclass(frozen=True)
class ToolCallInput:
    """A call an assistant made earlier in the conversation."""

    name: str
    arguments: str | dict[str, Any]
    id: str | None = None

    def arguments_object(self) -> Any:
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant or tool (dialect synonyms are mapped by the adapter)
    content: str
    tool_calls: tuple[ToolCallInput, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None  # the tool, with mode "named"


@dataclass(frozen=True)
class ResponseFormat:
    kind: Literal["text", "json_object", "json_schema"]
    schema: Any = None


@dataclass
class ToolPlan:
    offered: list[ToolSpec] = field(default_factory=list)  # empty when tools are off
    forced: list[ToolSpec] | None = None  # one of these must be called, or None
    forced_name: str | None = None
    wire_tools: list[dict[str, Any]] | None = None  # the tools as the template reads them

    @property
    def names(self) -> list[str]:
        return [tool.name for tool in self.offered]


def plan_tools(
    tools: list[ToolSpec],
    choice: ToolChoice | None,
    wire_tools: list[dict[str, Any]] | None = None,
    *,
    param: str = "tool_choice",
) -> ToolPlan:
    """Which tools the model may call and whether it must; ``choice`` None means "auto" when
    tools are given and "none" otherwise, as OpenAI defines it."""
    if choice is None:
        choice = ToolChoice("auto" if tools else "none")
    if choice.mode == "none" or (not tools and choice.mode == "auto"):
        return ToolPlan()
    if not tools:
        raise InvalidRequest("tool_choice needs a non-empty 'tools' list", param=param)
    if choice.mode == "auto":
        return ToolPlan(offered=tools, wire_tools=wire_tools)
    if choice.mode == "required":
        return ToolPlan(offered=tools, forced=tools, wire_tools=wire_tools)
    named = [tool for tool in tools if tool.name == choice.name]
    if not named:
        raise InvalidRequest(
            f"tool_choice names {choice.name!r}, which is not in 'tools'", param=param
        )
    return ToolPlan(offered=tools, forced=named, forced_name=named[0].name, wire_tools=wire_tools)


def template_knows_tools(engine: Engine) -> bool:
    # A GGUF's own template that mentions tools renders them in the format the model was
    # trained on; anything else gets the tools described in a system note.
    source = engine.template.source
    text = engine.options.chat_template if source == "override" else engine.entry.chat_template
    return source in ("gguf", "override") and "tools" in (text or "")


def template_messages(messages: list[Message], native_tools: bool) -> list[dict[str, Any]]:
    """Messages as the plain dicts chat templates read.

    Templates that know tools get OpenAI/Hugging Face style ``tool_calls`` and ``tool``
    messages. Others get calls as the JSON text the model is told to write, and tool results
    as user turns (many templates accept only system, user and assistant).
    """
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            out.append(_assistant_calls(message, native_tools, call_names))
        elif message.role == "tool":
            name = message.name or call_names.get(message.tool_call_id or "")
            if native_tools:
                result: dict[str, Any] = {"role": "tool", "content": message.content}
                if message.tool_call_id:
                    result["tool_call_id"] = message.tool_call_id
                if name:
                    result["name"] = name
                out.append(result)
            else:
                label = f"Result of the tool {name!r}" if name else "Tool result"
                _append_user_text(out, f"{label}:\n{message.content}")
        else:
            out.append({"role": message.role, "content": message.content})
    return out


def _assistant_calls(
    message: Message, native_tools: bool, call_names: dict[str, str]
) -> dict[str, Any]:
    calls = [{"name": c.name, "arguments": c.arguments_object()} for c in message.tool_calls]
    for call in message.tool_calls:
        if call.id:
            call_names[call.id] = call.name
    if native_tools:
        tool_calls = [
            {"id": call.id, "type": "function", "function": spec}
            for call, spec in zip(message.tool_calls, calls, strict=True)
        ]
        return {"role": "assistant", "content": message.content, "tool_calls": tool_calls}
    written = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in calls)
    return {"role": "assistant", "content": f"{message.content}\n{written}".strip()}


def _append_user_text(messages: list[dict[str, Any]], text: str) -> None:
    # Consecutive user turns are merged: several templates insist that roles alternate.
    if messages and messages[-1]["role"] == "user":
        messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{text}"}
    else:
        messages.append({"role": "user", "content": text})


def add_system_note(messages: list[dict[str, Any]], note: str) -> None:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        messages[0] = {**first, "content": f"{first['content']}\n\n{note}".strip()}
    else:
        messages.insert(0, {"role": "system", "content": note})

"""Requests and responses of Anthropic's Messages API (``/v1/messages``).

Fields follow Anthropic's API reference; sampling fields its newest SDK no longer offers (such as
``temperature``) are still read, as older clients send them. As there, ``max_tokens`` is
required, the system prompt is a top-level field, and content is a string or a list of blocks.
Only the blocks a text model can read are understood (text, tool_use, tool_result; thinking
blocks of earlier turns are dropped); an image or a document is refused rather than silently
ignored. Fields a local model has no use for (``metadata``, ``service_tier``,
``cache_control``...) are ignored. ``output_config.format`` (a JSON schema) is enforced with a
grammar.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictStr, field_validator

from shimmy.api.protocol.common import PositiveInt, StrictFloat, TopK, WireModel
from shimmy.api.protocol.responses import ResponseModel
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message, ResponseFormat, ToolCallInput, ToolChoice
from shimmy.serving.prepare import GenerationInput
from shimmy.serving.structured import ToolSpec

MAX_STOP_SEQUENCES = 16
MAX_TOOLS = 128

UnitInterval = Annotated[StrictFloat, Field(ge=0, le=1)]
_READABLE_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class TextBlock(WireModel):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[TextBlock] | None = None
    is_error: StrictBool | None = None

    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(block.text for block in self.content)
        # The model is told a failure failed: the flag is not shown to it any other way.
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(WireModel):
    """Reasoning of an earlier turn; a local model's next turn does not read it."""

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


def _known_blocks(value: Any) -> Any:
    # Checked before the union so that an image is one clear complaint, not one per member.
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in _READABLE_BLOCKS:
                raise ValueError(
                    f"content blocks of type {str(kind)[:40]!r} are not supported; "
                    "only text, tool_use and tool_result blocks are"
                )
    return value


class AnthropicMessage(WireModel):
    role: Literal["user", "assistant"]
    content: StrictStr | list[ContentBlock]

    _check_blocks = field_validator("content", mode="before")(_known_blocks)

    def to_messages(self) -> list[Message]:
        if isinstance(self.content, str):
            return [Message(self.role, self.content)]
        texts = [block.text for block in self.content if isinstance(block, TextBlock)]
        text = "\n".join(texts)
        if self.role == "assistant":
            calls = tuple(
                ToolCallInput(block.name, block.input, block.id)
                for block in self.content
                if isinstance(block, ToolUseBlock)
            )
            return [Message("assistant", text, calls)]
        # Tool results answer the assistant turn before this one, so they come first.
        out = [
            Message("tool", block.text(), tool_call_id=block.tool_use_id)
            for block in self.content
            if isinstance(block, ToolResultBlock)
        ]
        if texts or not out:
            out.append(Message("user", text))
        return out


class AnthropicTool(WireModel):
    # Anthropic's server tools (web search, code execution...) have a ``type`` and run on
    # Anthropic's side; only client tools, which the caller runs, exist here.
    type: Literal["custom"] | None = None
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    description: StrictStr | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None

    def to_choice(self) -> ToolChoice:
        if self.type == "tool":
            if self.name is None:
                raise InvalidRequest("tool_choice of type 'tool' needs a name", param="tool_choice")
            return ToolChoice("named", self.name)
        modes: dict[str, Literal["auto", "required", "none"]] = {
            "auto": "auto",
            "any": "required",
            "none": "none",
        }
        return ToolChoice(modes[self.type])


def _tool_type(value: Any) -> Any:
    if isinstance(value, list):
        for tool in value:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in (None, "custom"):
                raise ValueError(
                    f"tools of type {str(kind)[:40]!r} run on Anthropic's servers and are not "
                    "available here; give client tools (name, description, input_schema)"
                )
    return value


class _Conversation(WireModel):
    """What a message request and a token count share."""

    model: Annotated[StrictStr, Field(min_length=1)]
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None

    _check_tools = field_validator("tools", mode="before")(_tool_type)

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n".join(block.text for block in self.system) or None

    def neutral_messages(self) -> list[Message]:
        if self.messages[-1].role != "user":
            raise InvalidRequest(
                "the last message must be the user's: continuing a prefilled assistant turn "
                "is not supported",
                param="messages",
            )
        return [m for message in self.messages for m in message.to_messages()]

    def base_input(self) -> GenerationInput:
        tools = [ToolSpec(t.name, t.description, t.input_schema) for t in self.tools or []]
        # Templates that render tools natively read them in the OpenAI/Hugging Face shape.
        wire_tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in self.tools or []
        ]
        return GenerationInput(
            messages=self.neutral_messages(),
            system=self.system_text(),
            tools=tools,
            tool_choice=self.tool_choice.to_choice() if self.tool_choice else None,
            wire_tools=wire_tools,
        )


class JsonOutputFormat(WireModel):
    type: Literal["json_schema"]
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    """Structured output: the reply is decoded under the schema's grammar. (``effort`` is for
    Anthropic's reasoning models and is ignored.)"""

    format: JsonOutputFormat | None = None


class MessagesRequest(_Conversation):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: UnitInterval | None = None
    top_p: UnitInterval | None = None
    top_k: TopK | None = None
    stream: StrictBool | None = None
    output_config: OutputConfig | None = None

    def stop_list(self) -> list[str]:
        # An empty stop sequence would end every reply at once.
        return [s for s in self.stop_sequences or [] if s]

    def to_input(self) -> GenerationInput:
        given = self.base_input()
        given.max_tokens = self.max_tokens
        given.stop = self.stop_list()
        sent = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        given.sampling = {name: value for name, value in sent.items() if value is not None}
        fmt = self.output_config.format if self.output_config is not None else None
        if fmt is not None:
            given.response_format = ResponseFormat("json_schema", fmt.json_schema)
        return given


class CountTokensRequest(_Conversation):
    def to_input(self) -> GenerationInput:
        return self.base_input()


# --- responses ----------------------------------------------------------------------------------


class AnthropicUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int = Field(description="Prompt tokens whose KV was reused")


class TextContent(ResponseModel):
    type: Literal["text"]
    text: str


class ToolUseContent(ResponseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageResponse(ResponseModel):
    """``POST /v1/messages`` without ``stream``."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage


class TokenCount(ResponseModel):
    """``POST /v1/messages/count_tokens``."""

    input_tokens: int

"""Requests and responses of OpenAI's Responses API (``/v1/responses``).

``input`` is a string or a list of items: messages (roles user, system, developer, assistant,
with text parts), the assistant's earlier ``function_call``s and the caller's
``function_call_output``s. Reasoning items of earlier turns are dropped (a local model's next
turn does not read them); images, files and hosted tools (web search, file search...) are
refused rather than silently ignored. Unknown fields are ignored, as in the rest of ``/v1``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, StrictStr, Tag, field_validator

from shimmy.api.protocol.common import ModelField, PositiveInt, Temperature, TopP, WireModel
from shimmy.api.protocol.responses import ResponseModel
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message, ResponseFormat, ToolCallInput, ToolChoice
from shimmy.serving.prepare import GenerationInput
from shimmy.serving.structured import ToolSpec

MAX_TOOLS = 128
MAX_INPUT_ITEMS = 2048

_TEXT_PARTS = ("input_text", "output_text", "text")
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class TextPart(WireModel):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


def _text_parts(value: Any) -> Any:
    # Checked before validation so that an image is one clear complaint.
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _TEXT_PARTS:
                raise ValueError(
                    f"content parts of type {str(kind)[:40]!r} are not supported; only text is"
                )
    return value


def _joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[TextPart]

    _check_parts = field_validator("content", mode="before")(_text_parts)


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[TextPart]

    _check_parts = field_validator("output", mode="before")(_text_parts)


class ReasoningItem(WireModel):
    """An earlier turn's reasoning; not read by a local model."""

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    # A message may leave out its type: {"role": "user", "content": "..."}.
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


def _known_items(value: Any) -> Any:
    if isinstance(value, list):
        for item in value:
            kind = _item_type(item)
            if kind not in _ITEM_TYPES:
                raise ValueError(
                    f"input items of type {kind[:40]!r} are not supported; messages, "
                    "function_call and function_call_output items are"
                )
    return value


def items_to_messages(items: str | list[Any]) -> list[Message]:
    """The neutral conversation an ``input`` holds."""
    if isinstance(items, str):
        return [Message("user", items)]
    out: list[Message] = []
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append(Message(role, _joined(item.content)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCallInput(item.name, item.arguments, item.call_id)
            last = out[-1] if out else None
            # Calls made in one turn (with or without text) are one assistant message.
            if last is not None and last.role == "assistant":
                out[-1] = Message("assistant", last.content, (*last.tool_calls, call))
            else:
                out.append(Message("assistant", "", (call,)))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(Message("tool", _joined(item.output), tool_call_id=item.call_id))
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(role: str, text: str) -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [{"type": part, "text": text}],
    }


class FunctionTool(WireModel):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


def _function_tools(value: Any) -> Any:
    if isinstance(value, list):
        for tool in value:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(
                    f"tools of type {str(kind)[:40]!r} are hosted by OpenAI and not available "
                    "here; give function tools"
                )
    return value


class ResponsesNamedFunction(WireModel):
    type: Literal["function"]
    name: StrictStr


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    description: StrictStr | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class TextOptions(WireModel):
    format: TextFormat | None = None


class ResponsesRequest(WireModel):
    model: ModelField = "default"
    input: StrictStr | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextOptions | None = None
    stream: StrictBool | None = None
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None

    _check_items = field_validator("input", mode="before")(_known_items)
    _check_tools = field_validator("tools", mode="before")(_function_tools)

    def new_messages(self) -> list[Message]:
        return items_to_messages(self.input)

    def input_items(self) -> list[dict[str, Any]]:
        """This request's input as the items ``GET /v1/responses/{id}/input_items`` lists,
        each with an id (the client's, or a new one); reasoning items are not kept."""
        if isinstance(self.input, str):
            return [_message_item("user", self.input)]
        items: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                items.append(_message_item(item.role, _joined(item.content)))
            elif isinstance(item, FunctionCallItem):
                items.append(
                    {
                        "id": item.id or new_id("fc"),
                        "type": "function_call",
                        "status": "completed",
                        "call_id": item.call_id,
                        "name": item.name,
                        "arguments": item.arguments,
                    }
                )
            elif isinstance(item, FunctionCallOutputItem):
                items.append(
                    {
                        "id": new_id("fco"),
                        "type": "function_call_output",
                        "status": "completed",
                        "call_id": item.call_id,
                        "output": _joined(item.output),
                    }
                )
        return items

    def tool_choice_input(self) -> ToolChoice | None:
        choice = self.tool_choice
        if choice is None:
            return None
        return (
            ToolChoice("named", choice.name)
            if isinstance(choice, ResponsesNamedFunction)
            else (ToolChoice(choice))
        )

    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None:
            return None
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise InvalidRequest("text.format of type json_schema needs a schema", param="text")
        return ResponseFormat(fmt.type, fmt.json_schema)

    def to_input(self, history: list[Message]) -> GenerationInput:
        """The generation for this request after ``history`` (a previous response's)."""
        tools = [ToolSpec(t.name, t.description, t.parameters or {}) for t in self.tools or []]
        # Templates that render tools natively read them in the chat completions shape.
        wire_tools = [
            {
                "type": "function",
                "function": t.model_dump(include={"name", "description", "parameters"}),
            }
            for t in self.tools or []
        ]
        sent = {"temperature": self.temperature, "top_p": self.top_p}
        return GenerationInput(
            messages=[*history, *self.new_messages()],
            system=self.instructions,
            sampling={name: value for name, value in sent.items() if value is not None},
            max_tokens=self.max_output_tokens,
            tools=tools,
            tool_choice=self.tool_choice_input(),
            wire_tools=wire_tools,
            response_format=self.response_format(),
        )

    def echo(self) -> dict[str, Any]:
        """The request's settings, as the response object repeats them."""
        fmt = self.text.format if self.text is not None and self.text.format else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "previous_response_id": self.previous_response_id,
            "temperature": self.temperature if self.temperature is not None else 1.0,
            "top_p": self.top_p if self.top_p is not None else 1.0,
            "tool_choice": (
                self.tool_choice.model_dump()
                if isinstance(self.tool_choice, ResponsesNamedFunction)
                else self.tool_choice or "auto"
            ),
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "parallel_tool_calls": (
                self.parallel_tool_calls if self.parallel_tool_calls is not None else True
            ),
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "truncation": "disabled",
            "metadata": self.metadata or {},
            "store": self.store is not False,
        }


# --- responses ----------------------------------------------------------------------------------


class OutputText(ResponseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(ResponseModel):
    type: Literal["message"]
    id: str
    status: Literal["completed", "incomplete", "in_progress"]
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallOutput(ResponseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str = Field(description="JSON text")
    status: Literal["completed"]


class InputTokensDetails(ResponseModel):
    cached_tokens: int


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int


class ResponsesUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(ResponseModel):
    """A response: ``POST /v1/responses`` without ``stream``, and ``GET /v1/responses/{id}``."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str
    output: list[OutputMessage | FunctionCallOutput]
    usage: ResponsesUsage | None
    incomplete_details: IncompleteDetails | None
    error: dict[str, Any] | None
    previous_response_id: str | None


class DeletedResponse(ResponseModel):
    """``DELETE /v1/responses/{id}``."""

    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputItemsQuery(WireModel):
    """``GET /v1/responses/{id}/input_items``'s query (strings, hence not strict)."""

    limit: Annotated[int, Field(ge=1, le=100)] = 20
    order: Literal["asc", "desc"] = "desc"
    after: Annotated[str, Field(max_length=200)] | None = None
    before: Annotated[str, Field(max_length=200)] | None = None


class InputItemList(ResponseModel):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="Input items: messages, function calls...")
    first_id: str | None
    last_id: str | None
    has_more: bool

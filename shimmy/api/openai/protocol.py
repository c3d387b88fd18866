"""Requests of the OpenAI-compatible API (``/v1``).

Fields follow OpenAI's API reference. Clients send many fields we do not use (``user``,
``metadata``, ``store``, ``parallel_tool_calls``...), and often send ``null`` for "not set":
unknown fields are ignored and every optional field accepts ``null``. Types are strict, as in
the native API (a string where a number belongs is a client bug), and ranges are OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictStr
from pydantic.json_schema import SkipJsonSchema

from shimmy.api.protocol.common import (
    ChatMessage,
    OptionalMessageContent,
    PositiveInt,
    StrictFloat,
    StrictInteger,
    Temperature,
    TopP,
    WireModel,
)
from shimmy.api.protocol.responses import ResponseModel
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message, ToolCallInput
from shimmy.serving.chat import ResponseFormat as ResponseFormatInput
from shimmy.serving.chat import ToolChoice as ToolChoiceInput
from shimmy.serving.prepare import GenerationInput
from shimmy.serving.structured import ToolSpec

MAX_STOP_STRINGS = 16
MAX_EMBEDDING_INPUTS = 2048
MAX_COMPLETION_PROMPTS = 64
MAX_TOOLS = 128

StrictInt = StrictInteger
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
# OpenAI ignores empty stop strings (an empty one would end every reply at once), so this is
# not the native StopList, which refuses them.
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)]


_Lenient = WireModel


class FunctionCall(_Lenient):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIChatMessage(ChatMessage):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: OptionalMessageContent = ""
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def to_message(self) -> Message:
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        calls = tuple(
            ToolCallInput(c.function.name, c.function.arguments, c.id)
            for c in self.tool_calls or ()
        )
        return Message(role, self.content, calls, self.tool_call_id, self.name)


class FunctionDefinition(_Lenient):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: StrictStr


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Lenient):
    name: StrictStr = "response"
    description: StrictStr | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class _SamplingFields(_Lenient):
    """What chat and text completions share. Defaults are OpenAI's, not the native API's:
    clients tune against OpenAI and expect its behaviour when they leave a field out."""

    model: Annotated[StrictStr, Field(min_length=1)] = "default"
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: PositiveInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    def sampling_sent(self) -> dict[str, Any]:
        """The sampling fields the client set; the rest take the model's and OpenAI's defaults."""
        sent: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.seed is not None:
            # llama.cpp seeds are 32-bit; OpenAI's are any int64. Fold, keeping determinism.
            sent["seed"] = self.seed & 0xFFFFFFFF
        return {name: value for name, value in sent.items() if value is not None}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        # An empty stop string would end every reply at once; OpenAI ignores them too.
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_single_choice(self) -> None:
        if self.n is not None and self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[OpenAIChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None

    def requested_max_tokens(self) -> int | None:
        # ``max_completion_tokens`` replaced ``max_tokens``; when both are sent the newer wins.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_input(self) -> GenerationInput:
        tools = [
            ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
            for t in self.tools or []
        ]
        return GenerationInput(
            messages=[message.to_message() for message in self.messages],
            sampling=self.sampling_sent(),
            stop=self.stop_list(),
            max_tokens=self.requested_max_tokens(),
            logprobs=self.logprobs_top_n(),
            tools=tools,
            tool_choice=self.tool_choice_input(),
            wire_tools=[t.model_dump(exclude_none=True) for t in self.tools or []],
            response_format=self.response_format_input(),
        )

    def tool_choice_input(self) -> ToolChoiceInput | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return None if choice is None else ToolChoiceInput(choice)
        return ToolChoiceInput("named", choice.function.name)

    def response_format_input(self) -> ResponseFormatInput | None:
        fmt = self.response_format
        if fmt is None:
            return None
        schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
        return ResponseFormatInput(fmt.type, schema)

    def logprobs_top_n(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest(
                    "top_logprobs requires logprobs to be true", param="top_logprobs"
                )
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[Any]
    max_tokens: PositiveInt | None = None
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: PositiveInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not all(isinstance(p, str) for p in prompt):
            raise InvalidRequest(
                "prompts given as token ids are not supported; send text", param="prompt"
            )
        if not prompt:
            raise InvalidRequest("the prompt list is empty", param="prompt")
        if len(prompt) > MAX_COMPLETION_PROMPTS:
            raise InvalidRequest(
                f"at most {MAX_COMPLETION_PROMPTS} prompts per request", param="prompt"
            )
        return list(prompt)

    def to_input(self, prompt: str) -> GenerationInput:
        return GenerationInput(
            prompt=prompt,
            sampling=self.sampling_sent(),
            stop=self.stop_list(),
            max_tokens=self.max_tokens,
            logprobs=self.logprobs,
        )

    def check_supported(self) -> None:
        self.check_single_choice()
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if self.best_of is not None and self.best_of != 1:
            raise InvalidRequest("only best_of=1 is supported", param="best_of")


class EmbeddingRequest(_Lenient):
    model: Annotated[StrictStr, Field(min_length=1)] = "default"
    input: StrictStr | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise InvalidRequest("input must not be empty", param="input")
        if not all(isinstance(item, str) for item in self.input):
            raise InvalidRequest(
                "inputs given as token ids are not supported; send text", param="input"
            )
        if len(self.input) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input"
            )
        return list(self.input)


# --- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV was reused")


class CompletionUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _Envelope(ResponseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str


class AssistantFunctionCall(ResponseModel):
    name: str
    arguments: str = Field(description="JSON text")


class AssistantToolCall(ResponseModel):
    id: str
    type: Literal["function"]
    function: AssistantFunctionCall


class AssistantMessage(ResponseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[AssistantToolCall] | SkipJsonSchema[None] = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob]
    refusal: str | None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(_Envelope):
    """``POST /v1/chat/completions`` without ``stream``."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: CompletionUsage


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(_Envelope):
    """``POST /v1/completions`` without ``stream``."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: CompletionUsage


class Embedding(ResponseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector, or its float32 bytes in base64")


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(ResponseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OpenAIModel(ResponseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(ResponseModel):
    object: Literal["list"]
    data: list[OpenAIModel]

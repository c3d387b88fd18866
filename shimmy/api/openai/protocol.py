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
    LogitBias,
    ModelField,
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
from shimmy.serving.fim import FimInput
from shimmy.serving.prepare import GenerationInput
from shimmy.serving.structured import ToolSpec

MAX_STOP_STRINGS = 16
MAX_EMBEDDING_INPUTS = 2048
MAX_COMPLETION_PROMPTS = 64
MAX_TOOLS = 128
# Choices of one request (``n``, ``best_of``): each is a sequence of its own in the engine.
MAX_CHOICES = 16

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

    model: ModelField = "default"
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: LogitBias = Field(default_factory=list)
    # shimmy's extension: speculative decoding from the text's own n-grams, on or off.
    speculative: StrictBool | None = None
    # llama.cpp's (and vLLM's) extension: never end at an end-of-generation token.
    ignore_eos: StrictBool = False

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

    def choices(self) -> int:
        """How many choices were asked for (``n``); streaming several is not supported."""
        n = self.n or 1
        if n > 1 and self.stream:
            raise InvalidRequest("n > 1 cannot be streamed; leave out stream", param="n")
        return n


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
            speculative=self.speculative,
            logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos,
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


def _token_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt_list(prompt: list[Any], param: str, limit: int) -> list[str | list[int]]:
    """A list is one prompt of token ids, or several prompts (texts or token-id lists)."""
    if not prompt:
        raise InvalidRequest(f"the {param} list is empty", param=param)
    if _token_ids(prompt):
        return [list(prompt)]
    items: list[str | list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, list) and _token_ids(item):
            items.append(list(item))
        else:
            raise InvalidRequest(
                f"each {param} is a string or a non-empty list of token ids", param=param
            )
    if len(items) > limit:
        raise InvalidRequest(f"at most {limit} {param}s per request", param=param)
    return items


class CompletionRequest(_SamplingFields):
    """Prompts are text or token ids of the model's own vocabulary (as ``/tokenize`` gives)."""

    prompt: StrictStr | list[Any]
    # 0 is allowed, with ``echo``: the prompt is then only scored (lm-evaluation-harness).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    suffix: StrictStr | None = Field(
        None,
        description="Text after the gap: the prompt is the text before it (fill in the middle, "
        "with the model's FIM tokens; a model without them is refused). Empty: no suffix",
    )

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        return _prompt_list(self.prompt, "prompt", MAX_COMPLETION_PROMPTS)

    def fim_input(self, prompt: str | list[int]) -> FimInput | None:
        """Fill in the middle around a non-empty suffix; an empty one says nothing follows the
        cursor: a plain continuation."""
        if not self.suffix:
            return None
        if not isinstance(prompt, str):
            raise InvalidRequest("a suffix goes with a text prompt, not token ids", param="suffix")
        if self.echo:
            raise InvalidRequest("echo cannot be used with a suffix", param="echo")
        return FimInput(prefix=prompt, suffix=self.suffix)

    def to_input(self, prompt: str | list[int]) -> GenerationInput:
        fim = self.fim_input(prompt)
        return GenerationInput(
            prompt=None if fim else prompt,
            fim=fim,
            sampling=self.sampling_sent(),
            stop=self.stop_list(),
            max_tokens=self.max_tokens,
            logprobs=self.generation_logprobs(),
            prompt_logprobs=self.logprobs if self.echo else None,
            speculative=self.speculative,
            logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos,
        )

    def generation_logprobs(self) -> int | None:
        # Choosing the best of several needs every candidate's token logprobs.
        if self.best_of is not None and self.best_of > self.choices():
            return self.logprobs or 0
        return self.logprobs

    def candidates(self) -> int:
        """How many sequences to generate per prompt: ``best_of``, or ``n``."""
        n = self.choices()
        best_of = self.best_of or n
        if best_of < n:
            raise InvalidRequest("best_of must be at least n", param="best_of")
        if best_of > 1 and self.stream:
            raise InvalidRequest(
                "best_of > 1 cannot be streamed; leave out stream", param="best_of"
            )
        if self.echo and self.stream and self.logprobs is not None:
            # The prompt's scores are known only once the prompt is decoded whole.
            raise InvalidRequest("echo with logprobs cannot be streamed", param="echo")
        return best_of


class EmbeddingRequest(_Lenient):
    model: ModelField = "default"
    input: StrictStr | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None

    def inputs(self) -> list[str | list[int]]:
        """The texts, or token-id lists, to embed (see ``shimmy.api.openai.token_ids``)."""
        if isinstance(self.input, str):
            return [self.input]
        return _prompt_list(self.input, "input", MAX_EMBEDDING_INPUTS)


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
    token_logprobs: list[float | None] = Field(description="null for an echoed first token")
    top_logprobs: list[dict[str, float] | None]
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

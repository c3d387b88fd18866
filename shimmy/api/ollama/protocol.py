"""Requests of Ollama's API, as its documentation (docs/api.md) and its clients send them.

Ollama's clients send ``null`` or leave out what they do not set and older ones say ``name``
where newer ones say ``model``; both are accepted. Types are strict, as everywhere in shimmy.
``options`` holds the sampling settings (``num_predict``, ``temperature``...); the load-time
ones (``num_gpu``, ``num_thread``, ``use_mmap``...) belong to the server's configuration here
and are ignored, as Ollama ignores options a model does not use.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, StrictBool, StrictStr

from shimmy.api.keepalive import parse_keep_alive
from shimmy.api.protocol.common import (
    NonEmptyStr,
    OptionalMessageContent,
    RepetitionPenalty,
    StrictFloat,
    StrictInteger,
    TopK,
    TopP,
    WireModel,
)
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message, ResponseFormat, ToolCallInput
from shimmy.serving.structured import ToolSpec

MAX_STOP_STRINGS = 16
MAX_TOOLS = 128
MAX_EMBED_INPUTS = 2048

KeepAlive = Annotated[float | None, BeforeValidator(parse_keep_alive)]
ModelName = Annotated[NonEmptyStr, Field(validation_alias=AliasChoices("model", "name"))]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
TokenId = Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)]
# "" (no format), "json", or a JSON schema.
Format = Literal["", "json"] | dict[str, Any]
Think = StrictBool | Literal["low", "medium", "high", "max"]


class OllamaOptions(WireModel):
    """The ``options`` that change what is generated; the rest are accepted and ignored."""

    num_predict: StrictInteger | None = Field(None, description="-1 (or any value < 1): no limit")
    num_ctx: Annotated[StrictInteger, Field(ge=1)] | None = Field(
        None, description="At most the context the model was loaded with"
    )
    temperature: Annotated[StrictFloat, Field(ge=0)] | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    min_p: TopP | None = None
    repeat_penalty: RepetitionPenalty | None = None
    repeat_last_n: Annotated[StrictInteger, Field(ge=-1)] | None = Field(
        None, description="-1: the whole context, 0: off"
    )
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: StrictInteger | None = Field(None, description="-1: a random seed")
    stop: Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None

    def sampling(self, n_ctx: int) -> dict[str, Any]:
        """The ``SamplingParams`` fields these options set."""
        sent: dict[str, Any] = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.repeat_last_n is not None:
            sent["penalty_last_n"] = n_ctx if self.repeat_last_n < 0 else self.repeat_last_n
        if self.seed is not None and self.seed >= 0:
            # llama.cpp seeds are 32-bit: fold, keeping "same seed, same text".
            sent["seed"] = self.seed & 0xFFFFFFFF
        return {name: value for name, value in sent.items() if value is not None}

    def max_tokens(self) -> int | None:
        if self.num_predict is None or self.num_predict < 1:
            return None
        return self.num_predict

    def stop_list(self) -> list[str]:
        # An empty stop string would end every reply at once.
        return [stop for stop in self.stop or [] if stop]


class _Generation(WireModel):
    """What /api/generate and /api/chat share."""

    model: ModelName
    stream: StrictBool | None = Field(None, description="Default true: NDJSON chunks")
    format: Format | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: Think | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInteger, Field(ge=0, le=20)] | None = None

    @property
    def streams(self) -> bool:
        return self.stream is not False

    def response_format(self) -> ResponseFormat | None:
        if self.format is None or self.format == "":
            return None
        if self.format == "json":
            return ResponseFormat("json_object")
        return ResponseFormat("json_schema", self.format)

    def options_or_default(self) -> OllamaOptions:
        return self.options if self.options is not None else OllamaOptions()

    def logprobs_top_n(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class OllamaGenerateRequest(_Generation):
    """``POST /api/generate``."""

    prompt: StrictStr | None = None
    suffix: StrictStr | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    context: list[TokenId] | None = Field(None, description="The context a previous answer gave")
    raw: StrictBool | None = None
    images: list[StrictStr] | None = None

    def check_raw(self) -> None:
        if self.raw and (self.template or self.system or self.context):
            # Ollama's own answer: raw prompts are sent exactly as given.
            raise InvalidRequest(
                "raw mode does not support template, system, or context", param="raw"
            )


class OllamaToolCallFunction(WireModel):
    name: StrictStr
    arguments: dict[str, Any] | StrictStr = Field(default_factory=dict)


class OllamaToolCall(WireModel):
    id: StrictStr | None = None
    function: OllamaToolCallFunction


class OllamaChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: OptionalMessageContent = ""
    images: list[StrictStr] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    thinking: StrictStr | None = None

    def to_message(self) -> Message:
        calls = tuple(
            ToolCallInput(call.function.name, call.function.arguments, call.id)
            for call in self.tool_calls or ()
        )
        return Message(self.role, self.content, calls, self.tool_call_id, self.tool_name)


class OllamaFunctionDefinition(WireModel):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(WireModel):
    type: Literal["function"] = "function"
    function: OllamaFunctionDefinition


class OllamaChatRequest(_Generation):
    """``POST /api/chat``. Without messages, it only loads (or, with keep_alive 0, unloads)."""

    messages: list[OllamaChatMessage] = Field(default_factory=list)
    tools: Annotated[list[OllamaTool], Field(max_length=MAX_TOOLS)] | None = None

    def tool_specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
            for t in self.tools or []
        ]

    def wire_tools(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []]

    def has_images(self) -> bool:
        return any(message.images for message in self.messages)


class OllamaEmbedRequest(WireModel):
    """``POST /api/embed``."""

    model: ModelName
    input: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_EMBED_INPUTS)]
    truncate: StrictBool | None = None
    dimensions: Annotated[StrictInteger, Field(ge=1)] | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaEmbeddingsRequest(WireModel):
    """``POST /api/embeddings``, the older single-text form."""

    model: ModelName
    prompt: StrictStr = ""
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None


class OllamaModelRequest(WireModel):
    """``POST /api/show`` and ``DELETE /api/delete``."""

    model: ModelName
    verbose: StrictBool | None = None


class OllamaPullRequest(WireModel):
    """``POST /api/pull``: an Ollama-style ``hf.co/OWNER/REPO[:QUANT]`` or any source
    ``shimmy pull`` takes."""

    model: ModelName
    insecure: StrictBool | None = None
    stream: StrictBool | None = Field(None, description="Default true: NDJSON progress")


class OllamaCopyRequest(WireModel):
    """``POST /api/copy``."""

    source: NonEmptyStr
    destination: NonEmptyStr

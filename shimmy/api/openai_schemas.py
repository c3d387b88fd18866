"""Request schemas of the OpenAI-compatible API (``/v1``).

Fields follow OpenAI's API reference. Clients send many fields we do not use (``user``,
``metadata``, ``store``, ``parallel_tool_calls``...), and often send ``null`` for "not set":
unknown fields are ignored and every optional field accepts ``null``. Types are strict, as in
the native API (a string where a number belongs is a client bug), and ranges are OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
)

from shimmy.api.errors import validation_error
from shimmy.engine.types import SamplingParams
from shimmy.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_EMBEDDING_INPUTS = 2048
MAX_COMPLETION_PROMPTS = 64
MAX_TOOLS = 128

StrictFloat = Annotated[float, Field(strict=True)]
StrictInt = Annotated[int, Field(strict=True)]
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopP = Annotated[StrictFloat, Field(ge=0, le=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


class ContentPart(_Lenient):
    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(_Lenient):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        """The message's text; content parts are joined by newlines. Only text parts are
        understood: these models read text, and silently dropping an image would mislead."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts: list[str] = []
        for part in self.content:
            if part.type not in ("text", "input_text") or part.text is None:
                raise InvalidRequest(
                    f"content parts of type {part.type!r} are not supported; only text parts are",
                    param="messages",
                )
            texts.append(part.text)
        return "\n".join(texts)


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

    def sampling(self, grammar: str | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            # llama.cpp seeds are 32-bit; OpenAI's are any int64. Fold, keeping determinism.
            seed=None if self.seed is None else self.seed & 0xFFFFFFFF,
            grammar=grammar,
        )

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
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
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


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_body(model: type[ModelT], data: Any) -> ModelT:
    """Validate parsed JSON as ``model``; a violation is an ``InvalidRequest`` naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None

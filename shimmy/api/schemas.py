"""Request schema of the native API (``POST /api/generate`` and ``/ws/generate`` frames).

Validation is strict on purpose: ``"max_tokens": "50"`` or ``"temperature": NaN`` is a client bug
that should be reported, not silently coerced. Ints are still accepted where floats are expected
(``"temperature": 1`` is a perfectly good JSON number). Unknown fields are ignored so clients of
other dialects (Ollama-style ``options``, ``keep_alive``...) are not rejected outright.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic_core
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shimmy.api.errors import validation_error
from shimmy.api.keepalive import parse_keep_alive
from shimmy.engine.types import GenerationRequest, SamplingParams
from shimmy.errors import InvalidRequest

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine as ModelEngine
    from shimmy.settings import Settings

MAX_STOP_STRINGS = 16

StrictFloat = Annotated[float, Field(strict=True)]
StrictInteger = Annotated[int, Field(strict=True)]
NonEmptyStr = Annotated[str, Field(strict=True, min_length=1)]


def _one_or_many(value: Any) -> Any:
    """Accept a single string where a list of strings is expected.

    Normalizing before validation (instead of a ``str | list[str]`` union) keeps error messages
    about one thing: pydantic reports a failed union once per member.
    """
    if value is None:  # clients that send every field send ``"stop": null`` for "none"
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("string_or_list", "Input should be a string or a list of strings")
    return value


def _text_or_parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "content_type", "Input should be a string or a list of text parts"
        )
    return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: NonEmptyStr
    content: Annotated[list[TextPart], BeforeValidator(_text_or_parts)]

    def text(self) -> str:
        return "\n".join(part.text for part in self.content)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    model: NonEmptyStr = "default"
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    system: StrictStr | None = None
    max_tokens: Annotated[StrictInteger, Field(ge=1)] = 100
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.9
    # The upper bound keeps the value inside llama.cpp's C int.
    top_k: Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)] = 40
    repetition_penalty: Annotated[
        StrictFloat,
        Field(gt=0, validation_alias=AliasChoices("repetition_penalty", "repeat_penalty")),
    ] = 1.1
    seed: Annotated[StrictInteger, Field(ge=0, le=2**64 - 1)] | None = None
    stop: Annotated[
        list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS), BeforeValidator(_one_or_many)
    ] = Field(default_factory=list)
    stream: StrictBool = False
    keep_alive: Annotated[float | None, BeforeValidator(parse_keep_alive)] = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if self.prompt is None and self.messages is None:
            raise ValueError("Either 'prompt' or 'messages' is required")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("Give either 'prompt' or 'messages', not both")
        return self

    def sampling(self, model_defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Sampling for this request; a field the client left out takes the model's configured
        default (``[models.X.sampling]`` in the config file) before the contract's default."""
        values: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }
        for name, value in (model_defaults or {}).items():
            if name in values and name not in self.model_fields_set:
                values[name] = value
        return SamplingParams(**values, seed=self.seed)


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON text; a malformed (or absurdly nested) document is an ``InvalidRequest``.

    pydantic-core's parser is used rather than ``json`` because it bounds nesting depth instead
    of hitting Python's recursion limit. NaN and Infinity are parsed here and rejected by the
    schema, so the error names the field that holds them.
    """
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON ({exc})") from None


def parse_generate_request(data: Any) -> GenerateRequest:
    """Validate already-parsed JSON as a ``GenerateRequest``."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def chat_messages(request: GenerateRequest) -> list[dict[str, Any]]:
    """The request's messages as plain dicts for the chat template, system message first."""
    assert request.messages is not None
    messages = [{"role": message.role, "content": message.text()} for message in request.messages]
    if request.system is not None:
        messages.insert(0, {"role": "system", "content": request.system})
    return messages


async def to_generation(
    request: GenerateRequest, engine: ModelEngine, settings: Settings
) -> GenerationRequest:
    """Turn a validated request into what the engine runs.

    With ``prompt``, the text is used as is (a ``system`` text is put in front of it, separated
    by a blank line). With ``messages``, the model's chat template renders the conversation and
    its end-of-turn markers become stop strings.
    """
    stop = list(request.stop)
    if request.messages is not None:
        # Rendering is bounded, but it is CPU work: keep it off the event loop.
        prompt = await asyncio.to_thread(engine.template.render, chat_messages(request))
        stop += [marker for marker in engine.template.stop_strings if marker not in stop]
    else:
        assert request.prompt is not None
        prompt = request.prompt
        if request.system is not None:
            prompt = f"{request.system}\n\n{prompt}"
    defaults = engine.options.sampling.values()
    max_tokens = request.max_tokens
    if "max_tokens" not in request.model_fields_set and "max_tokens" in defaults:
        max_tokens = defaults["max_tokens"]
    return GenerationRequest(
        prompt=prompt,
        max_tokens=min(max_tokens, settings.max_tokens_cap),
        sampling=request.sampling(defaults),
        stop=stop,
    )

"""The native dialect's requests: ``POST /api/generate``, ``/api/generate/batch`` and the
``/ws/generate`` frames (the same fields)."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    StrictBool,
    StrictStr,
    create_model,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from shimmy.api.keepalive import parse_keep_alive
from shimmy.api.protocol.common import (
    ChatMessage,
    NonEmptyStr,
    PositiveInt,
    RepetitionPenalty,
    StopList,
    StrictInteger,
    Temperature,
    TopK,
    TopP,
    WireModel,
    validate_body,
)
from shimmy.api.protocol.responses import ResponseModel, Usage
from shimmy.engine.types import FinishReason
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.serving.prepare import GenerationInput

MAX_BATCH_PROMPTS = 64
_DEFAULTS = DEFAULTS[Dialect.NATIVE]
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


class GenerateRequest(WireModel):
    model: NonEmptyStr = "default"
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    system: StrictStr | None = None
    max_tokens: PositiveInt = _DEFAULTS.max_tokens or 1
    temperature: Temperature = _DEFAULTS.temperature
    top_p: TopP = _DEFAULTS.top_p
    top_k: TopK = _DEFAULTS.top_k
    repetition_penalty: Annotated[
        RepetitionPenalty,
        Field(validation_alias=AliasChoices("repetition_penalty", "repeat_penalty")),
    ] = _DEFAULTS.repetition_penalty
    seed: Annotated[StrictInteger, Field(ge=0, le=2**64 - 1)] | None = None
    stop: StopList = Field(default_factory=list)
    stream: StrictBool = False
    keep_alive: Annotated[float | None, BeforeValidator(parse_keep_alive)] = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if self.prompt is None and self.messages is None:
            raise ValueError("Either 'prompt' or 'messages' is required")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("Give either 'prompt' or 'messages', not both")
        return self

    def to_input(self, prompt: str | None = None) -> GenerationInput:
        """What ``prepare`` needs; a field left out stays unset, so the model's configured
        default applies before the dialect's. ``prompt`` replaces the request's own."""
        sent = self.model_fields_set
        messages = None
        if self.messages is not None and prompt is None:
            messages = [Message(m.role, m.content) for m in self.messages]
        return GenerationInput(
            prompt=prompt if prompt is not None else self.prompt,
            messages=messages,
            system=self.system,
            sampling={name: getattr(self, name) for name in _SAMPLING_FIELDS if name in sent},
            stop=list(self.stop),
            max_tokens=self.max_tokens if "max_tokens" in sent else None,
        )


def parse_generate_request(data: Any) -> GenerateRequest:
    """Validate already-parsed JSON as a ``GenerateRequest``."""
    return validate_body(GenerateRequest, data)


class BatchPrompts(WireModel):
    prompts: Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)]


def parse_batch_request(data: Any) -> tuple[list[str], GenerateRequest]:
    """The prompts, and the shared options validated exactly as ``/api/generate`` validates
    them (the first prompt stands in for ``prompt``)."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    for field in ("prompt", "messages"):
        if field in data:
            raise InvalidRequest(
                f"'{field}' is not accepted here: put the texts in 'prompts'", param=field
            )
    if data.get("stream") is True:
        raise InvalidRequest("batch generation does not stream", param="stream")
    prompts = validate_body(BatchPrompts, data).prompts
    return prompts, parse_generate_request({**data, "prompt": prompts[0]})


# --- /api/generate/batch as documented ----------------------------------------------------------

# The prompts, and GenerateRequest's fields shared by all of them: derived from the models
# parse_batch_request validates with, so it cannot drift from them.
_BATCH_FIELDS: dict[str, Any] = {
    name: (field.annotation, copy.deepcopy(field))
    for name, field in [
        ("prompts", BatchPrompts.model_fields["prompts"]),
        *GenerateRequest.model_fields.items(),
    ]
    if name not in ("prompt", "messages", "stream")
}
BatchRequest: type[WireModel] = create_model(
    "BatchRequest",
    __base__=WireModel,
    __doc__="The prompts, and the fields of GenerateRequest shared by all of them ('prompt' and "
    "'messages' are refused, and so is 'stream': true)",
    **_BATCH_FIELDS,
)


# --- responses ----------------------------------------------------------------------------------


class GenerateChoice(ResponseModel):
    text: str
    index: int
    finish_reason: FinishReason


class GenerateResponse(ResponseModel):
    """``POST /api/generate`` without ``stream``."""

    id: str
    model: str
    created: int
    choices: list[GenerateChoice]
    usage: Usage


class BatchItem(ResponseModel):
    index: int
    text: str
    finish_reason: FinishReason
    usage: Usage


class BatchResponse(ResponseModel):
    """``POST /api/generate/batch``: one answer per prompt, in order."""

    id: str
    model: str
    created: int
    responses: list[BatchItem]
    usage: Usage


class ModelInfo(ResponseModel):
    """A model found by discovery (``ModelEntry.to_api``)."""

    id: str
    name: str
    description: str | None
    path: str
    size_bytes: int
    architecture: str | None
    quantization: str | None
    parameter_count: int | None
    context_length: int | None
    has_chat_template: bool
    loaded: bool
    source: str
    usable: bool
    verified: bool = Field(
        description="Pulled, and matched a checksum its source published (false for files "
        "pulled without one and for files shimmy did not download)"
    )
    error: str | SkipJsonSchema[None] = Field(None, description="Why the file cannot be served")


class ModelList(ResponseModel):
    models: list[ModelInfo]
    default: str | None


class SlotSummary(ResponseModel):
    busy: int
    total: int
    queued: int


class Health(ResponseModel):
    status: Literal["healthy"]
    models_loaded: int
    memory_usage: str
    version: str
    uptime_seconds: float
    requests_total: int
    slots: SlotSummary = Field(description="Generation slots over every loaded model")

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
    ModelField,
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
from shimmy.api.protocol.fim import ExtraFiles, Indent, LineCount, Milliseconds, seconds
from shimmy.api.protocol.responses import ResponseModel, Usage
from shimmy.engine.types import EarlyStop, FinishReason
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import Message
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.serving.fim import FimInput
from shimmy.serving.prepare import GenerationInput

MAX_BATCH_PROMPTS = 64
_DEFAULTS = DEFAULTS[Dialect.NATIVE]
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


class GenerateRequest(WireModel):
    model: ModelField = "default"
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
    # Code completion: fill in the middle between prefix (or prompt) and suffix.
    prefix: StrictStr | None = None
    suffix: StrictStr | None = None
    extra: ExtraFiles | None = None
    max_lines: LineCount | None = None
    min_indent: Indent | None = None
    time_budget_ms: Milliseconds | None = None
    speculative: StrictBool | None = Field(
        None, description="Speculative decoding from the text's own n-grams (default: server's)"
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        given = [
            name for name in ("prompt", "messages", "prefix") if getattr(self, name) is not None
        ]
        if not given:
            raise ValueError("Either 'prompt' or 'messages' is required")
        if len(given) > 1:
            raise ValueError(f"Give one of {' and '.join(repr(g) for g in given)}, not both")
        if self.messages is not None and (self.suffix is not None or self.extra is not None):
            raise ValueError("'suffix' and 'extra' go with 'prompt' or 'prefix', not 'messages'")
        return self

    def fim_input(self, prompt: str | None) -> FimInput | None:
        """Fill in the middle: with ``prefix``, or a non-empty ``suffix`` after the prompt
        (an empty one says nothing follows the cursor: a plain continuation)."""
        prefix = self.prefix if self.prefix is not None else prompt
        if prefix is None or (self.prefix is None and not self.suffix and not self.extra):
            return None
        extra = tuple(chunk.to_extra() for chunk in self.extra or ())
        return FimInput(prefix=prefix, suffix=self.suffix or "", extra=extra)

    def early_stop(self) -> EarlyStop | None:
        rules = EarlyStop(
            max_lines=self.max_lines,
            min_indent=self.min_indent or 0,
            time_budget=seconds(self.time_budget_ms),
        )
        return None if rules == EarlyStop() else rules

    def to_input(self, prompt: str | None = None) -> GenerationInput:
        """What ``prepare`` needs; a field left out stays unset, so the model's configured
        default applies before the dialect's. ``prompt`` replaces the request's own."""
        sent = self.model_fields_set
        messages = None
        if self.messages is not None and prompt is None:
            messages = [Message(m.role, m.content) for m in self.messages]
        text = prompt if prompt is not None else self.prompt
        fim = self.fim_input(text)
        return GenerationInput(
            prompt=None if fim is not None or messages is not None else text,
            messages=messages,
            fim=fim,
            early_stop=self.early_stop(),
            system=self.system,
            sampling={name: getattr(self, name) for name in _SAMPLING_FIELDS if name in sent},
            stop=list(self.stop),
            max_tokens=self.max_tokens if "max_tokens" in sent else None,
            speculative=self.speculative,
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
    for field in ("prompt", "messages", "prefix"):
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
    if name not in ("prompt", "messages", "prefix", "stream")
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


class ModelFailure(ResponseModel):
    """Why the model's last worker process died (until it loads again)."""

    reason: str = Field(description="How the worker ended and the last line of its log")
    at: float = Field(description="Unix time of the crash")
    recent_crashes: int = Field(description="Crashes within the crash window")


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
    failure: ModelFailure | SkipJsonSchema[None] = Field(
        None, description="Present when the model's last worker crashed"
    )


class ModelList(ResponseModel):
    models: list[ModelInfo]
    default: str | None


class SlotSummary(ResponseModel):
    busy: int
    total: int
    queued: int


class PromptCacheSummary(ResponseModel):
    entries: int = Field(description="Sequences saved in host memory after leaving their slot")
    bytes: int
    limit_bytes: int = Field(description="cache_ram, over every loaded model")


class Health(ResponseModel):
    status: Literal["healthy"]
    models_loaded: int
    memory_usage: str
    version: str
    uptime_seconds: float
    requests_total: int
    slots: SlotSummary = Field(description="Generation slots over every loaded model")
    prompt_cache: PromptCacheSummary = Field(
        description="The host-memory prompt caches of every loaded model"
    )

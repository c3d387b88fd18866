"""LocalLab's request bodies (``/generate``, ``/chat``, ``/generate/batch``, ``/models/load``).

``null`` means "use the default" everywhere; ``do_sample: false`` means greedy decoding.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, StrictBool, StrictStr

from shimmy.api.native.protocol import MAX_BATCH_PROMPTS
from shimmy.api.protocol.common import (
    ChatMessage,
    NonEmptyStr,
    PositiveInt,
    RepetitionPenalty,
    StrictFloat,
    Temperature,
    TopK,
    TopP,
    WireModel,
)
from shimmy.serving.chat import Message
from shimmy.serving.prepare import GenerationInput

# The official client's unload_model() is true only when "status" is exactly this.
UNLOADED_STATUS = "Model unloaded successfully"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


class LocalLabOptions(WireModel):
    """Fields every LocalLab generation endpoint takes."""

    model_id: StrictStr | None = Field(None, validation_alias=AliasChoices("model_id", "model"))
    max_length: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("max_length", "max_tokens", "max_new_tokens")
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    do_sample: StrictBool | None = None
    max_time: Annotated[StrictFloat, Field(gt=0)] | None = None
    system_prompt: StrictStr | None = None
    stream: StrictBool | None = None

    def to_input(
        self, *, prompt: str | None = None, messages: list[ChatMessage] | None = None
    ) -> GenerationInput:
        sampling: dict[str, Any] = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        if self.do_sample is False:
            sampling["temperature"] = 0.0
        return GenerationInput(
            prompt=prompt,
            messages=None if messages is None else [Message(m.role, m.content) for m in messages],
            system=self.system_prompt,
            sampling=sampling,
            max_tokens=self.max_length,
        )


class GenerateBody(LocalLabOptions):
    prompt: StrictStr


class ChatBody(LocalLabOptions):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class BatchBody(LocalLabOptions):
    prompts: Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)]


class LoadBody(WireModel):
    model_id: NonEmptyStr

"""LocalLab's request bodies (``/generate``, ``/chat``, ``/generate/batch``, ``/models/load``).

``null`` means "use the default" everywhere; ``do_sample: false`` means greedy decoding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, StrictBool, StrictStr

from shimmy.api.admin.protocol import ComputeDevice
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
from shimmy.api.protocol.responses import ResponseModel, Usage
from shimmy.engine.types import FinishReason
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


# --- responses ----------------------------------------------------------------------------------


class LocalLabGenerateResponse(ResponseModel):
    response: str
    text: str = Field(description="The same as 'response'")
    model: str
    finish_reason: FinishReason
    usage: Usage


class LocalLabAssistantMessage(ResponseModel):
    role: Literal["assistant"]
    content: str


class LocalLabChatChoice(ResponseModel):
    message: LocalLabAssistantMessage
    index: int
    finish_reason: FinishReason


class LocalLabChatResponse(ResponseModel):
    model: str
    choices: list[LocalLabChatChoice]
    usage: Usage


class LocalLabBatchResponse(ResponseModel):
    responses: list[str] = Field(description="One text per prompt, in order")
    model: str
    usage: Usage


class LocalLabModel(ResponseModel):
    id: str
    name: str
    can_load: bool
    description: str | None
    is_loaded: bool


class LocalLabModelList(ResponseModel):
    models: list[LocalLabModel]
    current_model: str | None


class LocalLabCurrentModel(ResponseModel):
    id: str
    name: str
    description: str | None
    is_loaded: bool
    loading_progress: float = Field(ge=0, le=1)


class LocalLabLoadResult(ResponseModel):
    status: Literal["success"]
    message: str
    model_id: str
    load_seconds: float


class LocalLabUnloadResult(ResponseModel):
    status: Literal["Model unloaded successfully"] = Field(
        description="The same whether or not a model was loaded: LocalLab's client reads it as "
        "success"
    )
    message: str
    model_id: str | None
    unloaded: bool


class LocalLabSystemInfo(ResponseModel):
    cpu_usage: float = Field(description="Percent")
    memory_usage: float = Field(description="Percent of the machine's")
    gpu_info: Annotated[list[ComputeDevice], Field(min_length=1)] | None
    active_model: str | None
    uptime: float
    request_count: int


class LocalLabHealth(ResponseModel):
    status: Literal["healthy"]

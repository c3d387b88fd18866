"""RKLLama's requests and answers (seed 003: its REST API documentation)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictStr

from shimmy.api.protocol.common import ChatMessage, NonEmptyStr, WireModel
from shimmy.api.protocol.responses import ResponseModel
from shimmy.serving.chat import Message


class RKLLamaLoadModelRequest(WireModel):
    model_name: NonEmptyStr = Field(description="A model id, or its file name")


class RKLLamaModelRequest(WireModel):
    """``POST /pull`` and ``DELETE /rm``."""

    model: NonEmptyStr


class RKLLamaGenerateRequest(WireModel):
    messages: StrictStr | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="A prompt, or a conversation rendered with the model's chat template"
    )
    stream: StrictBool = False

    def to_messages(self) -> list[Message]:
        if isinstance(self.messages, str):
            return [Message("user", self.messages)]
        return [Message(m.role, m.content) for m in self.messages]


class RKLLamaWelcome(ResponseModel):
    message: str
    github: str


class RKLLamaModelNames(ResponseModel):
    models: list[str]


class RKLLamaDone(ResponseModel):
    message: str


class RKLLamaCurrentModel(ResponseModel):
    model_name: str


class RKLLamaChoice(ResponseModel):
    role: Literal["assistant"]
    content: str
    finish_reason: Literal["stop", "length"] | None


class RKLLamaUsage(ResponseModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class RKLLamaCompletion(ResponseModel):
    """``POST /generate``; streamed, each chunk has this shape (followed by a blank line)."""

    id: Literal["rkllm_chat"]
    object: Literal["rkllm_chat"]
    created: int
    choices: list[RKLLamaChoice]
    usage: RKLLamaUsage

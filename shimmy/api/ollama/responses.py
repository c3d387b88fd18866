"""What Ollama's API answers, as its clients read it (``/openapi.json`` publishes these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from shimmy.api.protocol.responses import ResponseModel

DoneReason = Literal["stop", "length", "load", "unload"]


class OllamaModelDetails(ResponseModel):
    parent_model: str
    format: Literal["gguf"]
    family: str
    families: list[str] | None
    parameter_size: str = Field(description='e.g. "8.0B", "268.10M"; "" when unknown')
    quantization_level: str


class OllamaListedModel(ResponseModel):
    name: str = Field(description="ID:latest (Ollama's own models: their name and tag)")
    model: str
    modified_at: str
    size: int
    digest: str = Field(description="sha256 of the file; empty until it has been computed")
    details: OllamaModelDetails


class OllamaTagsResponse(ResponseModel):
    """``GET /api/tags``."""

    models: list[OllamaListedModel]


class OllamaRunningModel(ResponseModel):
    name: str
    model: str
    size: int
    digest: str
    details: OllamaModelDetails
    expires_at: str = Field(description="When it unloads if left idle (far ahead: never)")
    size_vram: int
    context_length: int


class OllamaPsResponse(ResponseModel):
    """``GET /api/ps``."""

    models: list[OllamaRunningModel]


class OllamaShowResponse(ResponseModel):
    """``POST /api/show``."""

    modelfile: str
    parameters: str
    template: str
    license: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaVersionResponse(ResponseModel):
    version: str


class _Timings(ResponseModel):
    done: bool
    done_reason: DoneReason | SkipJsonSchema[None] = None
    total_duration: int | SkipJsonSchema[None] = Field(None, description="Nanoseconds")
    load_duration: int | SkipJsonSchema[None] = None
    prompt_eval_count: int | SkipJsonSchema[None] = None
    prompt_eval_duration: int | SkipJsonSchema[None] = None
    eval_count: int | SkipJsonSchema[None] = None
    eval_duration: int | SkipJsonSchema[None] = None


class OllamaGenerateResponse(_Timings):
    """``POST /api/generate`` with ``stream: false``; streamed, each NDJSON line has this shape
    and the last one (``done: true``) the counts, durations and ``context``."""

    model: str
    created_at: str
    response: str
    context: list[int] | SkipJsonSchema[None] = None


class OllamaReplyFunction(ResponseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class OllamaReplyToolCall(ResponseModel):
    id: str
    function: OllamaReplyFunction


class OllamaAssistantMessage(ResponseModel):
    role: Literal["assistant"]
    content: str
    tool_calls: list[OllamaReplyToolCall] | SkipJsonSchema[None] = None


class OllamaChatResponse(_Timings):
    """``POST /api/chat`` with ``stream: false``; streamed, each NDJSON line has this shape."""

    model: str
    created_at: str
    message: OllamaAssistantMessage


class OllamaEmbedResponse(ResponseModel):
    """``POST /api/embed``."""

    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(ResponseModel):
    """``POST /api/embeddings``."""

    embedding: list[float]


class OllamaProgressResponse(ResponseModel):
    """``POST /api/pull``: the answer with ``stream: false``; streamed, one per line."""

    status: str
    total: int | SkipJsonSchema[None] = None
    completed: int | SkipJsonSchema[None] = None

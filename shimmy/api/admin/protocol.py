"""Requests and responses of the model lifecycle endpoints (``/api/models/...``, ``/api/pull``)
and of ``GET /api/system``.

The handlers read ``LoadRequest`` and ``PullRequest``'s fields from the raw JSON object; the
models say what those fields are.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, StrictBool, StrictStr
from pydantic.json_schema import SkipJsonSchema

from shimmy.api.keepalive import parse_keep_alive
from shimmy.api.native.protocol import ModelFailure
from shimmy.api.protocol.common import WireModel
from shimmy.api.protocol.responses import ResponseModel

KeepAlive = Annotated[float | None, BeforeValidator(parse_keep_alive)]


class LoadRequest(WireModel):
    """``POST /api/models/{id}/load``; the body may be left out."""

    keep_alive: KeepAlive = None


class PullRequest(WireModel):
    model: StrictStr = Field(description="hf://OWNER/REPO/FILE.gguf or a URL")
    stream: StrictBool = Field(True, description="Answer with NDJSON progress events")


# --- lifecycle ----------------------------------------------------------------------------------


class LoadedModel(ResponseModel):
    id: str
    loaded_at: int
    memory_bytes: int
    idle_seconds: float
    keep_alive: float
    expires_in: float | None = Field(description="null: kept loaded")
    busy: int
    queued: int
    slots: int
    context_length: int
    n_gpu_layers: int
    load_count: int
    worker_pid: int | None = Field(description="The model's worker process; null: in-process")


class FailedModel(ModelFailure):
    id: str


class LoadedModels(ResponseModel):
    models: list[LoadedModel]
    loading: list[str]
    failed: list[FailedModel] = Field(description="Models whose worker crashed since they loaded")


class LoadResult(ResponseModel):
    id: str
    loaded: Literal[True]
    already_loaded: bool
    load_seconds: float
    memory_bytes: int


class UnloadResult(ResponseModel):
    id: str
    unloaded: bool = Field(description="false when it was not loaded")


class DeleteResult(ResponseModel):
    id: str
    deleted: list[str] = Field(description="The files removed")


class PullFailure(ResponseModel):
    code: str
    message: str


class PullEvent(ResponseModel):
    """One progress event of ``/api/pull`` (an NDJSON line), or the last one."""

    status: Literal["waiting", "downloading", "verifying", "success", "error"]
    message: str | SkipJsonSchema[None] = None
    total: int | SkipJsonSchema[None] = None
    completed: int | SkipJsonSchema[None] = None
    file: str | SkipJsonSchema[None] = None
    id: str | SkipJsonSchema[None] = None
    path: str | SkipJsonSchema[None] = None
    error: PullFailure | SkipJsonSchema[None] = None


# --- GET /api/system ----------------------------------------------------------------------------


class ComputeDevice(ResponseModel):
    """A compute device llama.cpp's ggml backends registered."""

    name: str
    description: str
    type: Literal["cpu", "gpu", "igpu", "accel", "other"]
    memory_total_bytes: int
    memory_free_bytes: int


class Versions(ResponseModel):
    shimmy: str
    python: str
    llama_cpp_python: str | None
    platform: str
    executable: str


class LlamaCppFacts(ResponseModel):
    system_info: str
    gpu_offload: bool
    mmap: bool
    mlock: bool
    max_devices: int


class CpuFacts(ResponseModel):
    model: str | None
    architecture: str
    features: list[str]
    logical_cores: int | None
    physical_cores: int | None
    threads: int
    threads_batch: int


class MemoryFacts(ResponseModel):
    total_bytes: int
    available_bytes: int
    process_rss_bytes: int


class GpuFacts(ResponseModel):
    offload_supported: bool
    devices: list[ComputeDevice]
    n_gpu_layers_setting: int | None


class LoadedModelSummary(ResponseModel):
    id: str
    load_seconds: float
    loaded_at: float
    memory_bytes: int
    n_ctx: int
    n_gpu_layers: int
    slots: int
    busy: int
    queued: int
    tokens_generated: int


class ModelFolder(ResponseModel):
    source: str
    path: str
    exists: bool


class ModelsFacts(ResponseModel):
    available: int
    default: str | None
    folders: list[ModelFolder]
    loaded: list[LoadedModelSummary]
    loading: list[str]


class SystemInfo(ResponseModel):
    """``GET /api/system``: the ``shimmy diag`` report and what the server is doing."""

    versions: Versions
    llama_cpp: LlamaCppFacts
    cpu: CpuFacts
    memory: MemoryFacts
    gpu: GpuFacts
    models: ModelsFacts
    uptime_seconds: float
    requests_total: int

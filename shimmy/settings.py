"""Every knob of shimmy, in one place.

CLI flags and ``SHIMMY_*`` environment variables both map onto ``Settings``; nothing else reads
the environment. Defaults are the safe ones: loopback only, bounded queues and bodies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(value: object, sep: str) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shimmy"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHIMMY_", extra="ignore", validate_default=True, protected_namespaces=()
    )

    # --- network -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(11435, ge=0, le=65535, description="TCP port (0 picks a free one)")
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a connection has to send a whole request head"
    )
    body_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds of grace before a body must keep body_min_rate"
    )
    body_min_rate: int = Field(
        1024, ge=1, description="Bytes per second a request body must average after its grace"
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections at most (also capped by the descriptor limit)"
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxies whose X-Forwarded-For/-Proto are believed ('*': any); none by default",
    )
    ollama: str | None = Field(
        None,
        description="Also serve Ollama's API on this HOST:PORT (`serve --ollama`; Ollama's "
        "clients expect 127.0.0.1:11434)",
    )

    # --- models ----------------------------------------------------------------------------
    model_paths: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Extra folders (or files) to search for GGUF models, ':'-separated in env",
    )
    models_dir: Path = Field(Path("models"), description="shimmy's own models folder")
    default_model: str | None = Field(None, description="Model id or path served as 'default'")
    scan_user_caches: bool = Field(
        True,
        description="Also search the Hugging Face cache, Ollama and LM Studio folders",
    )
    config: Path | None = Field(None, description="TOML file with per-model options")
    starter_model: bool = Field(True, description="Offer the bundled starter model if installed")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="shimmy's cache folder")

    # --- llama.cpp ---------------------------------------------------------------------------
    ctx_size: int = Field(4096, ge=64, le=1 << 20, description="Context length per sequence")
    n_gpu_layers: int | None = Field(
        None, ge=-1, description="Layers to offload; unset = all when the build supports GPU"
    )
    threads: int | None = Field(None, ge=1, le=1024, description="Decode threads (unset: auto)")
    threads_batch: int | None = Field(None, ge=1, le=1024, description="Prompt threads")
    batch_size: int = Field(512, ge=16, le=1 << 16, description="Max tokens per llama_decode")
    parallel: int = Field(4, ge=1, le=256, description="Sequences decoded together per model")
    prefill_chunk: int = Field(
        256, ge=8, le=1 << 16, description="Max prompt tokens of one request per step"
    )
    swa_full: bool = Field(
        False,
        description="Keep full KV for sliding-window layers (more memory; prefixes are reused "
        "without it too, from the window and checkpoints)",
    )
    prefix_cache: bool = Field(True, description="Reuse KV of a slot's previous prompt")
    cache_ram: int = Field(
        2048,
        ge=0,
        description="MiB of host memory per model for the KV of conversations evicted from "
        "their slot, restored when they come back (0: off)",
    )
    speculative: bool = Field(
        True,
        description="Speculative decoding from n-grams of the sequence itself (no draft model); "
        "a request's 'speculative' overrides it",
    )
    draft_max: int = Field(32, ge=2, le=256, description="Most draft tokens verified per step")

    # --- requests ----------------------------------------------------------------------------
    default_max_tokens: int = Field(100, ge=1)
    max_tokens_cap: int = Field(8192, ge=1, description="Upper bound on any max_tokens")
    open_max_tokens: int = Field(
        2048, ge=1, description="max_tokens of OpenAI chat and LocalLab requests without one"
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot before 503")
    request_timeout: float = Field(
        600.0, gt=0, description="Deadline of one generation (s); it then ends as 'length'"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Max HTTP body size")
    ws_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    ws_max_queued_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Bytes of request frames one WebSocket connection may have unanswered; "
        "a request past it is answered server_busy instead of being kept",
    )
    template_timeout: float = Field(2.0, gt=0, description="Chat template render limit (s)")
    template_max_chars: int = Field(1_000_000, ge=1000, description="Rendered prompt size limit")
    embedding_token_ids: Literal["cl100k", "model"] = Field(
        "cl100k",
        description="Whose token ids /v1/embeddings reads: tiktoken's cl100k (what OpenAI "
        "clients such as LangChain send) or the model's own vocabulary",
    )
    responses_store_size: int = Field(
        256,
        ge=0,
        description="Responses API: how many responses are kept (in memory, least recently "
        "used dropped first) for GET and previous_response_id; 0 keeps none",
    )

    # --- lifecycle ---------------------------------------------------------------------------
    max_loaded_models: int = Field(2, ge=1)
    keep_alive: float = Field(
        300.0, ge=-1, description="Idle seconds before a model unloads; 0 at once, -1 never"
    )
    memory_budget: int | None = Field(
        None, ge=0, description="Bytes loaded models may use (unset: 90% of available RAM)"
    )
    model_workers: bool = Field(
        True,
        description="Run each loaded model in a worker process of its own, so that llama.cpp "
        "aborting on a bad file or input ends only that model's requests",
    )
    crash_limit: int = Field(
        3, ge=1, description="Worker crashes within crash_window after which a model is unusable"
    )
    crash_window: float = Field(600.0, gt=0, description="Seconds crash_limit counts over")

    # --- security ----------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API keys, ','-separated in env"
    )
    api_key: str | None = Field(None, description="One more accepted API key")
    api_key_file: FilePath | None = Field(
        None, description="File of accepted API keys: one per line, '#' comments"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limit: float | None = Field(
        None, gt=0, description="Requests per minute per client address and per API key"
    )
    rate_burst: int = Field(10, ge=1, description="Requests a client may make at once")
    auth_failures_per_minute: int = Field(
        10, ge=1, description="Failed API-key checks per client address and minute before 429"
    )
    allow_private_pull: bool = Field(
        False,
        description="Let pulls reach loopback, private and link-local addresses and plain http",
    )
    open_model_admin: bool = Field(
        False,
        description="Serve /api/pull and DELETE /api/models on a non-loopback bind without a key",
    )

    # --- web page ----------------------------------------------------------------------------
    web_ui: bool = Field(
        True, description="Serve the chat page at / (its assets under /ui/); off: / is a 404"
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("model_paths", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        return _split_list(value, os.pathsep)

    @field_validator(
        "api_keys", "allowed_hosts", "cors_origins", "forwarded_allow_ips", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        return _split_list(value, ",")

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

"""LocalEngine: one model loaded in this process, served by one worker thread.

Loading (weights, the generation context, a LoRA adapter) happens in the constructor, which
blocks: the registry calls it in a thread. The ``Scheduler``'s worker then owns every llama.cpp
object and frees them when it stops.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import psutil

from shimmy.chat.templates import ChatTemplate
from shimmy.engine.embedder import Embedder
from shimmy.engine.llama import (
    ContextConfig,
    LlamaContext,
    LlamaModel,
    LoraAdapter,
    gpu_offload_supported,
    quiet_llama_logs,
)
from shimmy.engine.protocol import EngineHooks, Stream
from shimmy.engine.scheduler import Scheduler
from shimmy.engine.stream import GenerationStream
from shimmy.engine.types import EmbeddingResult, GenerationRequest
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings


def default_threads() -> int:
    """Decode is memory-bound: one thread per physical core is llama.cpp's own advice."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def estimate_memory(entry: ModelEntry, kv_tokens: int) -> int:
    """Weights plus a full KV cache: what loading this model may cost, before loading it."""
    per_token = entry.kv_bytes_per_token or 0
    return entry.size_bytes + kv_tokens * per_token


def chat_template_for(entry: ModelEntry, options: ModelOptions, settings: Settings) -> ChatTemplate:
    """The template from the GGUF's header text or the config: rendering needs no weights."""
    return ChatTemplate.for_entry(
        entry,
        options.chat_template,
        timeout=settings.template_timeout,
        max_chars=settings.template_max_chars,
    )


def default_gpu_layers() -> int:
    return 999 if gpu_offload_supported() else 0


class LocalEngine:
    """Implements ``shimmy.engine.protocol.Engine``."""

    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        options: ModelOptions | None = None,
        *,
        hooks: EngineHooks | None = None,
    ) -> None:
        hooks = hooks or EngineHooks()
        quiet_llama_logs(settings.log_level == "debug")
        self.options = options or ModelOptions()
        settings = settings.model_copy(update=self.options.settings_overrides())
        self.entry = entry
        self.settings = settings
        self.template = chat_template_for(entry, self.options, settings)
        self.keep_alive = settings.keep_alive
        started = time.perf_counter()
        n_gpu_layers = (
            settings.n_gpu_layers if settings.n_gpu_layers is not None else default_gpu_layers()
        )
        progress = hooks.on_load_progress
        self.model = LlamaModel(
            entry.path,
            n_gpu_layers=n_gpu_layers,
            on_progress=functools.partial(progress, entry.id) if progress else None,
        )
        self.n_gpu_layers = n_gpu_layers
        self.fim_tokens = self.model.fim_tokens()
        self.eog_tokens = self.model.eog_tokens()
        self.n_ctx = min(settings.ctx_size, self.model.n_ctx_train or settings.ctx_size)
        self.n_parallel = settings.parallel
        self.threads = settings.threads or default_threads()
        self.threads_batch = settings.threads_batch or os.cpu_count() or self.threads
        # Each sequence gets its own KV stream of n_ctx cells (kv_unified off): attention then
        # only spans a sequence's own tokens, which is faster when sequences share no prefix.
        config = ContextConfig(
            n_ctx=self.n_ctx * self.n_parallel,
            n_seq_max=self.n_parallel,
            n_batch=max(settings.batch_size, self.n_parallel),
            n_threads=self.threads,
            n_threads_batch=self.threads_batch,
            swa_full=settings.swa_full,
            kv_unified=False,
        )
        self._lora: LoraAdapter | None = None
        ctx: LlamaContext | None = None
        try:
            ctx = LlamaContext(self.model, config)
            if self.options.lora is not None:
                self._lora = LoraAdapter(self.model, self.options.lora)
                self._lora.apply(ctx, self.options.lora_scale)
        except Exception:
            if ctx is not None:
                ctx.close()
            self.model.close()
            raise
        self.ctx = ctx
        self.n_ctx = min(self.n_ctx, ctx.n_ctx_seq)
        self.memory_bytes = estimate_memory(entry, self.n_ctx * self.n_parallel)
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self._embedder = Embedder(
            self.model,
            n_ctx=self.n_ctx,
            threads=self.threads,
            threads_batch=self.threads_batch,
            swa_full=settings.swa_full,
        )
        self._scheduler = Scheduler(
            entry.id,
            self.model,
            ctx,
            settings,
            n_ctx=self.n_ctx,
            n_parallel=self.n_parallel,
            hooks=hooks,
            teardown=self._free,
        )
        self._scheduler.start()

    def submit(self, request: GenerationRequest) -> GenerationStream:
        return self._scheduler.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[Stream]:
        return [*self._scheduler.submit_many(requests)]

    # The vocabulary is immutable after load, so tokenizing needs no trip to the worker.
    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return await asyncio.to_thread(self.model.tokenize, text, add_special=add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        return await asyncio.to_thread(self.model.detokenize, tokens)

    async def tokenize_literal(self, texts: list[str]) -> list[list[int]]:
        def run() -> list[list[int]]:
            return [self.model.tokenize(t, add_special=False, parse_special=False) for t in texts]

        return await asyncio.to_thread(run)

    def count_tokens(self, text: str, *, add_special: bool = True) -> int:
        return len(self.model.tokenize(text, add_special=add_special))

    async def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult:
        return await self._scheduler.call(lambda: self._embedder.embed(texts))

    def stats(self) -> dict[str, Any]:
        busy, queued = self._scheduler.load()
        return {
            "slots": self.n_parallel,
            "busy": busy,
            "queued": queued,
            "n_ctx": self.n_ctx,
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "memory_bytes": self.memory_bytes,
            **self._scheduler.prompt_cache_stats(),
            **dict(self._scheduler.counters),
        }

    @property
    def in_flight(self) -> int:
        busy, queued = self._scheduler.load()
        return busy + queued

    @property
    def last_used(self) -> float:
        return self._scheduler.last_used

    @last_used.setter
    def last_used(self, value: float) -> None:
        self._scheduler.last_used = value

    def close(self) -> None:
        self._scheduler.stop()

    def _free(self) -> None:
        if self._lora is not None:
            self._lora.close()
        self._embedder.close()
        self.ctx.close()
        self.model.close()

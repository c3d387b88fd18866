"""ModelEngine: one loaded model, one worker thread, many sequences decoded together.

The worker thread is the only code that touches the llama context. Each step it builds one
llama_batch holding the next token of every generating sequence plus a chunk of each waiting
prompt (continuous batching, as llama.cpp's own server does), decodes it once, then samples
every sequence with its own sampler chain. Prompts are processed in chunks, so a long prompt
delays others' next token by one chunk, not by the whole prompt.

Each slot owns one llama sequence id and keeps the tokens of its last request in the KV cache.
A new request goes to the free slot whose cached tokens share the longest prefix with its prompt
and only the differing tail is decoded (the next turn of a chat, a shared system prompt).

Requests reach the worker through a FIFO queue bounded by ``max_queue``; results travel back to
the event loop through a per-request asyncio queue (``GenerationStream``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import psutil

from shimmy.chat.templates import ChatTemplate
from shimmy.engine.llama import (
    Batch,
    ContextConfig,
    LlamaContext,
    LlamaModel,
    LoraAdapter,
    Sampler,
    gpu_offload_supported,
    quiet_llama_logs,
)
from shimmy.engine.textstream import TextAssembler
from shimmy.engine.types import (
    EmbeddingResult,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shimmy.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ServerBusy,
    ServerError,
    ShimmyError,
)
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
_Deliver = Callable[[Any, BaseException | None], None]


def default_threads() -> int:
    """Decode is memory-bound: one thread per physical core is llama.cpp's own advice."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def estimate_memory(entry: ModelEntry, kv_tokens: int) -> int:
    """Weights plus a full KV cache: what loading this model may cost, before loading it."""
    per_token = entry.kv_bytes_per_token or 0
    return entry.size_bytes + kv_tokens * per_token


def default_gpu_layers() -> int:
    return 999 if gpu_offload_supported() else 0


class GenerationStream:
    """The event loop's end of one request: an async iterator of TextDelta ... Finished."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_worker: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._wake_worker = wake_worker
        self._done = False
        self.cancelled = False  # read by the worker thread each step

    # --- worker side ---------------------------------------------------------------------
    def push(self, item: Event | ShimmyError) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # --- event loop side -------------------------------------------------------------------
    def cancel(self) -> None:
        if not self._done and not self.cancelled:
            self.cancelled = True
            self._wake_worker()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if self._queue.empty():
            item = await self._queue.get()
        else:
            # Queue.get() does not suspend when an item is waiting: a consumer that never
            # blocks (a fast model read by a synchronous writer) would then never see its own
            # cancellation (Ctrl-C) and would starve every other task on the loop.
            await asyncio.sleep(0)
            item = self._queue.get_nowait()
        if isinstance(item, ShimmyError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item  # type: ignore[no-any-return]

    async def collect(self) -> tuple[str, Finished]:
        parts: list[str] = []
        finished: Finished | None = None
        try:
            async for event in self:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    finished = event
        finally:
            if finished is None:
                self.cancel()
        assert finished is not None
        return "".join(parts), finished


@dataclass
class _Job:
    request: GenerationRequest
    stream: GenerationStream
    deadline: float
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    job: _Job | None = None
    prompt: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    assembler: TextAssembler | None = None
    next_token: int | None = None  # sampled, not yet decoded
    batch_index: int = -1  # where this slot's logits are in the current batch; -1 = none
    max_new: int = 0
    generated: int = 0
    cached_at_start: int = 0
    first_token_at: float = 0.0
    last_used: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.job is not None and len(self.cached) < len(self.prompt)


class ModelEngine:
    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        options: ModelOptions | None = None,
        *,
        on_load_progress: Callable[[float], None] | None = None,
    ) -> None:
        quiet_llama_logs(settings.log_level == "debug")
        self.options = options or ModelOptions()
        settings = settings.model_copy(update=self.options.settings_overrides())
        self.entry = entry
        self.settings = settings
        self.template = ChatTemplate.for_entry(
            entry,
            self.options.chat_template,
            timeout=settings.template_timeout,
            max_chars=settings.template_max_chars,
        )
        # Set by the registry: how long to stay loaded when idle, and whom to tell when idle.
        self.keep_alive = settings.keep_alive
        self.on_idle: Callable[[], None] | None = None
        # Called on the worker thread when a generation ends (metrics): model id, usage, time
        # the request was queued, time of its first token (None if it produced none).
        self.on_finish: Callable[[str, Usage, float, float | None], None] | None = None
        started = time.perf_counter()
        n_gpu_layers = (
            settings.n_gpu_layers if settings.n_gpu_layers is not None else default_gpu_layers()
        )
        self.model = LlamaModel(entry.path, n_gpu_layers=n_gpu_layers, on_progress=on_load_progress)
        self.n_gpu_layers = n_gpu_layers
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
        try:
            self.ctx = LlamaContext(self.model, config)
            if self.options.lora is not None:
                self._lora = LoraAdapter(self.model, self.options.lora)
                self._lora.apply(self.ctx, self.options.lora_scale)
        except Exception:
            if hasattr(self, "ctx"):
                self.ctx.close()
            self.model.close()
            raise
        self.n_ctx = min(self.n_ctx, self.ctx.n_ctx_seq)
        self.memory_bytes = estimate_memory(entry, self.n_ctx * self.n_parallel)
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self._embed_ctx: LlamaContext | None = None
        self._batch = Batch(self.ctx.n_batch)
        self._slots = [_Slot(seq_id=i) for i in range(self.n_parallel)]
        self._queue: collections.deque[_Job] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], _Deliver]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._piece_buf = ctypes.create_string_buffer(256)
        self.counters: dict[str, int] = collections.Counter()
        self.last_used = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"shimmy-engine-{entry.id}", daemon=True
        )
        self._thread.start()

    # ======================================================================================
    # Event-loop-facing API
    # ======================================================================================
    def submit(self, request: GenerationRequest) -> GenerationStream:
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[GenerationStream]:
        """Queue several requests atomically: all are accepted or none (ServerBusy), and the
        worker sees them together, so they start in the same batch when slots are free."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout
        jobs = [_Job(r, GenerationStream(loop, self._wake), deadline) for r in requests]
        with self._cv:
            if self._stopping:
                raise ServerBusy("the model is being unloaded", retry_after=1)
            busy = sum(1 for s in self._slots if s.job is not None)
            if busy + len(self._queue) + len(jobs) > self.n_parallel + self.settings.max_queue:
                self.counters["rejected_busy"] += 1
                raise ServerBusy(
                    f"all {self.n_parallel} slots are busy and {len(self._queue)} requests "
                    "are waiting",
                    retry_after=self._retry_after_estimate(),
                )
            self._queue.extend(jobs)
            self.last_used = time.monotonic()
            self._cv.notify()
        return [job.stream for job in jobs]

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return await asyncio.to_thread(self.model.tokenize, text, add_special=add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        return await asyncio.to_thread(self.model.detokenize, tokens)

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        return await self._call_in_worker(lambda: self._embed(texts))

    def stats(self) -> dict[str, Any]:
        with self._cv:
            busy = sum(1 for s in self._slots if s.job is not None)
            queued = len(self._queue)
        return {
            "slots": self.n_parallel,
            "busy": busy,
            "queued": queued,
            "n_ctx": self.n_ctx,
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "memory_bytes": self.memory_bytes,
            **dict(self.counters),
        }

    @property
    def in_flight(self) -> int:
        with self._cv:
            return sum(1 for s in self._slots if s.job is not None) + len(self._queue)

    def close(self) -> None:
        with self._cv:
            if self._stopping and not self._thread.is_alive():
                return
            self._stopping = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _retry_after_estimate(self) -> float:
        return float(max(1, math.ceil(len(self._queue) / max(1, self.n_parallel))))

    async def _call_in_worker(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        with self._cv:
            if self._stopping:
                raise ServerBusy("the model is being unloaded", retry_after=1)
            self._tasks.append((fn, deliver))
            self._cv.notify()
        return await future

    # ======================================================================================
    # Worker thread
    # ======================================================================================
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    tasks = list(self._tasks)
                    self._tasks.clear()
                for fn, deliver in tasks:
                    self._run_task(fn, deliver)
                self._drop_cancelled_queued()
                self._admit()
                self._reap_cancelled_and_expired()
                if any(s.job is not None for s in self._slots):
                    self._step()
        except BaseException:  # pragma: no cover - a bug in the scheduler itself
            log.exception("engine worker for %s crashed", self.entry.id)
            self._fail_everything(ServerError("the model's worker stopped unexpectedly"))
        finally:
            self._fail_everything(ServerBusy("the model was unloaded", retry_after=1))
            self._free()

    def _has_work(self) -> bool:
        return bool(self._tasks or self._queue or any(s.job for s in self._slots))

    def _run_task(self, fn: Callable[[], Any], deliver: _Deliver) -> None:
        try:
            result = fn()
        except ShimmyError as exc:
            deliver(None, exc)
        except Exception as exc:
            log.exception("engine task failed")
            deliver(None, GenerationFailed(str(exc) or type(exc).__name__))
        else:
            deliver(result, None)

    def _drop_cancelled_queued(self) -> None:
        with self._cv:
            if not any(job.stream.cancelled for job in self._queue):
                return
            kept = collections.deque(j for j in self._queue if not j.stream.cancelled)
            dropped = [j for j in self._queue if j.stream.cancelled]
            self._queue = kept
        for job in dropped:
            job.stream.push(Finished("cancelled", Usage()))

    # --- admission -----------------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            with self._cv:
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                self._start(job, free)
            except ShimmyError as exc:
                job.stream.push(exc)
            except Exception as exc:
                log.exception("could not start a request")
                job.stream.push(GenerationFailed(str(exc) or type(exc).__name__))

    def _start(self, job: _Job, free: list[_Slot]) -> None:
        request = job.request
        if isinstance(request.prompt, str):
            prompt = self.model.tokenize(request.prompt, add_special=request.add_bos)
        else:
            prompt = list(request.prompt)
            bad = [t for t in prompt if not 0 <= t < self.model.n_vocab]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary")
        if not prompt:
            if self.model.bos < 0:
                raise InvalidRequest("the prompt is empty")
            prompt = [self.model.bos]
        if len(prompt) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx} "
                "(including at least one generated token)",
                param="prompt",
            )
        room = self.n_ctx - len(prompt)
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)
        slot, reused = self._pick_slot(prompt, free)
        slot.sampler = Sampler(self.model, request.sampling)
        slot.job = job
        slot.prompt = prompt
        slot.assembler = TextAssembler(request.stop)
        slot.next_token = None
        slot.batch_index = -1
        slot.max_new = max_new
        slot.generated = 0
        slot.cached_at_start = reused
        slot.last_used = time.monotonic()
        self.counters["requests"] += 1
        if reused:
            self.counters["prefix_hits"] += 1
            self.counters["prefix_tokens_reused"] += reused

    def _pick_slot(self, prompt: list[int], free: list[_Slot]) -> tuple[_Slot, int]:
        """Choose the free slot that already holds the longest prefix of ``prompt``; cut its
        cache to that prefix. Without a useful match take the least recently used slot, so
        the caches of recent conversations survive longest."""
        best, best_len = None, 0
        if self.settings.prefix_cache:
            for slot in free:
                common = _common_prefix(slot.cached, prompt)
                if common > best_len:
                    best, best_len = slot, common
        if best is None:
            best = min(free, key=lambda s: s.last_used)
        # At least the last prompt token must be decoded again to get logits for sampling.
        keep = min(best_len, len(prompt) - 1)
        if keep <= 0 or not self.ctx.forget(best.seq_id, keep):
            self.ctx.forget(best.seq_id, 0)
            keep = 0
        del best.cached[keep:]
        return best, keep

    # --- one decoding step ---------------------------------------------------------------
    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        active = [s for s in self._slots if s.job is not None]
        for slot in active:
            slot.batch_index = -1
            if slot.next_token is not None:
                slot.batch_index = batch.add(slot.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(slot.next_token)
                slot.next_token = None
        # Prompts fill the rest of the batch in admission order, each at most one chunk.
        for slot in sorted((s for s in active if s.prefilling), key=_admission_order):
            take = min(len(slot.prompt) - len(slot.cached), batch.room, self.settings.prefill_chunk)
            if take <= 0:
                break
            start = len(slot.cached)
            for offset in range(take):
                pos = start + offset
                last = pos == len(slot.prompt) - 1
                index = batch.add(slot.prompt[pos], pos, slot.seq_id, last)
                if last:
                    slot.batch_index = index
            slot.cached.extend(slot.prompt[start : start + take])
        if batch.size == 0:
            return
        try:
            self.ctx.decode(batch)
        except ShimmyError as exc:
            log.error("decode failed for %s: %s", self.entry.id, exc)
            for slot in active:
                self._release(slot, error=exc, drop_cache=True)
            return
        self.counters["decode_steps"] += 1
        for slot in active:
            if slot.batch_index >= 0 and slot.job is not None:
                self._sample(slot)

    def _sample(self, slot: _Slot) -> None:
        assert slot.sampler is not None and slot.assembler is not None and slot.job is not None
        token = slot.sampler.sample(self.ctx, slot.batch_index)
        if self.model.is_eog(token):
            self._finish(slot, "stop")
            return
        slot.generated += 1
        if slot.generated == 1:
            slot.first_token_at = time.monotonic()
        self.counters["tokens_generated"] += 1
        piece = self.model.token_bytes(token, self._piece_buf)
        logprobs = None
        if slot.job.request.logprobs is not None:
            logprobs = [self._logprob(slot, token, piece, slot.job.request.logprobs)]
        text = slot.assembler.feed(piece)
        if text or logprobs:
            slot.job.stream.push(TextDelta(text, logprobs))
        if slot.assembler.stopped:
            self._finish(slot, "stop")
        elif slot.generated >= slot.max_new:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _logprob(self, slot: _Slot, token: int, piece: bytes, top_n: int) -> TokenLogprob:
        logits = self.ctx.logits(slot.batch_index, self.model.n_vocab).astype(np.float64)
        shifted = logits - logits.max()
        logsumexp = math.log(float(np.exp(shifted).sum()))
        top: dict[str, float] = {}
        if top_n > 0:
            best = np.argpartition(-shifted, min(top_n, len(shifted) - 1))[:top_n]
            for t in sorted(best, key=lambda t: -shifted[t]):
                text = self.model.token_bytes(int(t), self._piece_buf).decode("utf-8", "replace")
                top.setdefault(text, float(shifted[t] - logsumexp))
        return TokenLogprob(
            token=piece.decode("utf-8", "replace"),
            logprob=float(shifted[token] - logsumexp),
            top=top,
        )

    def _finish(self, slot: _Slot, reason: FinishReason) -> None:
        assert slot.job is not None and slot.assembler is not None
        tail = slot.assembler.finish()
        if tail:
            slot.job.stream.push(TextDelta(tail))
        usage = Usage(
            prompt_tokens=len(slot.prompt),
            completion_tokens=slot.generated,
            cached_tokens=slot.cached_at_start,
        )
        stream = slot.job.stream
        self.counters["requests_" + reason] += 1
        self._report_finish(slot, usage)
        # Free the slot before the client hears "finished", so anything it does next (stats,
        # another request) already sees the slot free.
        self._release(slot)
        stream.push(Finished(reason, usage))

    def _report_finish(self, slot: _Slot, usage: Usage) -> None:
        if self.on_finish is None or slot.job is None:
            return
        first = slot.first_token_at if slot.generated else None
        try:
            self.on_finish(self.entry.id, usage, slot.job.enqueued_at, first)
        except Exception:  # metrics must never break generation
            log.exception("on_finish hook failed")

    def _release(
        self, slot: _Slot, *, error: ShimmyError | None = None, drop_cache: bool = False
    ) -> None:
        stream = slot.job.stream if slot.job is not None else None
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = None
        slot.job = None
        slot.assembler = None
        slot.next_token = None
        slot.batch_index = -1
        slot.last_used = time.monotonic()
        if drop_cache:
            self.ctx.forget(slot.seq_id, 0)
            slot.cached.clear()
        self.last_used = time.monotonic()
        if error is not None and stream is not None:
            stream.push(error)
        if self.on_idle is not None and not self._queue and all(s.job is None for s in self._slots):
            self.on_idle()

    def _reap_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if job.stream.cancelled:
                self.counters["requests_cancelled"] += 1
                usage = Usage(len(slot.prompt), slot.generated, slot.cached_at_start)
                self._report_finish(slot, usage)
                # Mid-prompt the cache is still valid up to what was decoded: keep it.
                self._release(slot)
                job.stream.push(Finished("cancelled", usage))
            elif now > job.deadline:
                self.counters["requests_timed_out"] += 1
                self._release(
                    slot,
                    error=GenerationFailed(
                        f"the request exceeded the server's {self.settings.request_timeout:g}s "
                        "time limit"
                    ),
                )

    # --- embeddings ----------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> EmbeddingResult:
        if self._embed_ctx is None:
            self._embed_ctx = LlamaContext(
                self.model,
                ContextConfig(
                    n_ctx=self.n_ctx,
                    n_seq_max=1,
                    n_batch=self.n_ctx,
                    n_threads=self.threads,
                    n_threads_batch=self.threads_batch,
                    embeddings=True,
                    swa_full=self.settings.swa_full,
                ),
            )
        ctx = self._embed_ctx
        batch = Batch(ctx.n_batch)
        vectors: list[list[float]] = []
        total = 0
        try:
            for index, text in enumerate(texts):
                tokens = self.model.tokenize(text)
                if len(tokens) > ctx.n_batch:
                    raise ContextLengthExceeded(
                        f"input {index} has {len(tokens)} tokens; the limit is {ctx.n_batch}",
                        param="input",
                    )
                total += len(tokens)
                ctx.clear()
                batch.clear()
                for pos, token in enumerate(tokens):
                    batch.add(token, pos, 0, True)
                ctx.decode(batch)
                vector = ctx.sequence_embedding(0, self.model.n_embd)
                norm = float(np.linalg.norm(vector))
                vectors.append((vector / norm if norm > 0 else vector).tolist())
        finally:
            batch.close()
            ctx.clear()
        return EmbeddingResult(vectors=vectors, prompt_tokens=total)

    # --- teardown ------------------------------------------------------------------------
    def _fail_everything(self, error: ShimmyError) -> None:
        for slot in self._slots:
            if slot.job is not None:
                self._release(slot, error=error)
        with self._cv:
            queued = list(self._queue)
            self._queue.clear()
            tasks = list(self._tasks)
            self._tasks.clear()
        for job in queued:
            job.stream.push(error)
        for _, deliver in tasks:
            deliver(None, error)

    def _free(self) -> None:
        self._batch.close()
        if self._lora is not None:
            self._lora.close()
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.ctx.close()
        self.model.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _admission_order(slot: _Slot) -> float:
    return slot.job.enqueued_at if slot.job is not None else 0.0

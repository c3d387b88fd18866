"""The worker thread of one loaded model: admission, continuous batching, reaping.

The worker is the only code that touches the llama context. Each step it builds one
llama_batch holding the next token of every generating sequence plus a chunk of each waiting
prompt (continuous batching, as llama.cpp's own server does), decodes it once, then samples
every sequence with its own sampler chain. Prompts are processed in chunks, so a long prompt
delays others' next token by one chunk, not by the whole prompt.

Requests reach the worker through a FIFO queue bounded by ``max_queue``; their events travel
back through each request's ``GenerationStream``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from shimmy.engine.llama import Batch, LlamaContext, LlamaModel, Sampler
from shimmy.engine.logprobs import prompt_token_score, token_logprob
from shimmy.engine.placement import Placer
from shimmy.engine.protocol import EngineHooks
from shimmy.engine.slots import Job, Slot
from shimmy.engine.speculation import add_drafts, propose_draft
from shimmy.engine.stream import GenerationStream, WorkerCall
from shimmy.engine.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    PromptToken,
    StopCause,
    TextDelta,
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
from shimmy.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Scheduler:
    def __init__(
        self,
        model_id: str,
        model: LlamaModel,
        ctx: LlamaContext,
        settings: Settings,
        *,
        n_ctx: int,
        n_parallel: int,
        hooks: EngineHooks,
        teardown: Callable[[], None],
    ) -> None:
        self.model_id = model_id
        self.model = model
        self.ctx = ctx
        self.settings = settings
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.hooks = hooks
        # Run on the worker thread once it stops: llama.cpp objects are freed where they live.
        self._teardown = teardown
        self._batch = Batch(ctx.n_batch)
        self._slots = [Slot(seq_id=i) for i in range(n_parallel)]
        self.counters: collections.Counter[str] = collections.Counter()
        self._placer = Placer(ctx, model, settings, n_ctx=n_ctx, counters=self.counters)
        self._queue: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[WorkerCall[Any]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._piece_buf = ctypes.create_string_buffer(256)
        self.last_used = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"shimmy-engine-{model_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    # ======================================================================================
    # Event-loop side
    # ======================================================================================
    def submit_many(self, requests: list[GenerationRequest]) -> list[GenerationStream]:
        # The worker sees all of them at once, so they start in the same batch when slots
        # are free.
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout
        jobs = [Job(r, GenerationStream(loop, self._wake), deadline) for r in requests]
        with self._cv:
            if self._stopping:
                raise ServerBusy("the model is being unloaded", retry_after=1)
            busy = self._busy()
            if busy + len(self._queue) + len(jobs) > self.n_parallel + self.settings.max_queue:
                self.counters["rejected_busy"] += 1
                raise ServerBusy(
                    f"all {self.n_parallel} slots are busy and {len(self._queue)} requests "
                    "are waiting",
                    retry_after=self._retry_after_estimate(),
                )
            self._queue.extend(_with_forks(jobs))
            self.last_used = time.monotonic()
            self._cv.notify()
        return [job.stream for job in jobs]

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker between two decode steps (it may use the llama objects)."""
        call = WorkerCall(fn)
        with self._cv:
            if self._stopping:
                raise ServerBusy("the model is being unloaded", retry_after=1)
            self._calls.append(call)
            self._cv.notify()
        return await call.future

    def prompt_cache_stats(self) -> dict[str, int]:
        return self._placer.stats()

    def load(self) -> tuple[int, int]:
        """(busy slots, queued requests)."""
        with self._cv:
            return self._busy(), len(self._queue)

    def stop(self) -> None:
        with self._cv:
            if self._stopping and not self._thread.is_alive():
                return
            self._stopping = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _busy(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _retry_after_estimate(self) -> float:
        return float(max(1, math.ceil(len(self._queue) / max(1, self.n_parallel))))

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
                    calls = list(self._calls)
                    self._calls.clear()
                for call in calls:
                    call.run()
                self._drop_cancelled_queued()
                # Reaped before admitting: a request that replaces a cancelled one (the next
                # keystroke of an editor) then finds that one's slot free, with its cache.
                self._reap_cancelled_and_expired()
                self._admit()
                if any(s.job is not None for s in self._slots):
                    self._step()
        except BaseException:  # pragma: no cover - a bug in the scheduler itself
            log.exception("engine worker for %s crashed", self.model_id)
            self._fail_everything(ServerError("the model's worker stopped unexpectedly"))
        finally:
            self._fail_everything(ServerBusy("the model was unloaded", retry_after=1))
            self._batch.close()
            self._teardown()

    def _has_work(self) -> bool:
        return bool(self._calls or self._queue or any(s.job for s in self._slots))

    def _drop_cancelled_queued(self) -> None:
        with self._cv:
            if not any(job.stream.cancelled for job in self._queue):
                return
            kept = collections.deque(j for j in self._queue if not j.stream.cancelled)
            dropped = [j for j in self._queue if j.stream.cancelled]
            self._queue = kept
            # A cancelled request's forks still want their answers: they go first, on their own.
            for job in dropped:
                self._queue.extendleft(reversed(job.forks))
                job.forks = []
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
            except Exception as exc:
                if not isinstance(exc, ShimmyError):
                    log.exception("could not start a request")
                    exc = GenerationFailed(str(exc) or type(exc).__name__)
                # Its forks have its prompt and its parameters: they would fail alike.
                for failed in (job, *job.forks):
                    failed.stream.push(exc)

    def _start(self, job: Job, free: list[Slot]) -> None:
        prompt = self._prompt_tokens(job.request)
        max_new = self._max_new(job.request, prompt)
        # Scoring the prompt needs the logits of every prompt position: nothing is reused.
        scoring = job.request.prompt_logprobs is not None
        prefix_cache = self.settings.prefix_cache and not scoring
        slot, reused = self._placer.place(prompt, free, prefix_cache=prefix_cache)
        sampler = Sampler(self.model, job.request.sampling)
        slot.start(job, prompt, sampler, max_new=max_new, reused=reused)
        if prefix_cache:
            self._placer.plan_checkpoint(slot, reused)
        if scoring:
            slot.scores = [PromptToken(self._token_bytes(prompt[0]).decode("utf-8", "replace"))]
        self.counters["requests"] += 1
        if reused:
            self.counters["prefix_hits"] += 1
            self.counters["prefix_tokens_reused"] += reused
        self._start_forks(job, slot, free)

    def _max_new(self, request: GenerationRequest, prompt: list[int]) -> int:
        room = self.n_ctx - len(prompt)
        return room if request.max_tokens is None else min(request.max_tokens, room)

    def _start_forks(self, job: Job, source: Slot, free: list[Slot]) -> None:
        """Give each of ``job``'s forks a free slot, where it waits for ``source``'s prompt;
        those that find none are queued first, to decode the prompt themselves."""
        forks, job.forks = job.forks, []
        unplaced: list[Job] = []
        for fork in forks:
            rest = [s for s in free if s.job is None]
            if fork.stream.cancelled or not rest:
                unplaced.append(fork)
                continue
            try:
                sampler = Sampler(self.model, fork.request.sampling)
            except ShimmyError as exc:
                fork.stream.push(exc)
                continue
            # The slot's cache is replaced by the copy; placing saves it first, if worth it.
            slot, _ = self._placer.place(source.prompt, rest, prefix_cache=False)
            max_new = self._max_new(fork.request, source.prompt)
            slot.start(fork, source.prompt, sampler, max_new=max_new, reused=0)
            slot.fork_of = source
            source.forks.append(slot)
            self.counters["requests"] += 1
        if unplaced:
            with self._cv:
                self._queue.extendleft(reversed(unplaced))

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
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
                extra={"n_prompt_tokens": len(prompt), "n_ctx": self.n_ctx},
            )
        return prompt

    # --- one decoding step ---------------------------------------------------------------
    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        active = [s for s in self._slots if s.job is not None]
        for slot in active:
            slot.batch_index = -1
            if slot.next_token is not None:
                pos = len(slot.cached)
                slot.batch_index = batch.add(slot.next_token, pos, slot.seq_id, True)
                slot.cached.append(slot.next_token)
                slot.next_token = None
        add_drafts(batch, active, self.settings.draft_max)
        # Prompts fill the rest of the batch in admission order, each at most one chunk.
        prefilling = (s for s in active if s.prefilling and not s.waiting_for_fork)
        for slot in sorted(prefilling, key=lambda s: s.admitted_at):
            take = min(len(slot.prompt) - len(slot.cached), batch.room, self.settings.prefill_chunk)
            if slot.checkpoint_at > len(slot.cached):
                # The chunk stops where the checkpoint is to be taken, after this step.
                take = min(take, slot.checkpoint_at - len(slot.cached))
            if take <= 0:
                break
            start = len(slot.cached)
            scoring = slot.scores is not None
            if scoring:
                slot.scored_chunk = (start, batch.size, take)
            for offset in range(take):
                pos = start + offset
                last = pos == len(slot.prompt) - 1
                index = batch.add(slot.prompt[pos], pos, slot.seq_id, last or scoring)
                if last:
                    slot.batch_index = index
            slot.cached.extend(slot.prompt[start : start + take])
        if batch.size == 0:
            return
        try:
            self.ctx.decode(batch)
        except ShimmyError as exc:
            log.error("decode failed for %s: %s", self.model_id, exc)
            for slot in active:
                self._release(slot, error=exc, drop_cache=True)
            return
        self.counters["decode_steps"] += 1
        for slot in active:
            if slot.checkpoint_at == len(slot.cached):
                self._placer.take_checkpoint(slot)
            if slot.scored_chunk is not None:
                self._score_prompt_chunk(slot)
            if slot.batch_index >= 0 and slot.job is not None:
                # Forks copy the prompt's KV before the source's first token can end it.
                forks, slot.forks = slot.forks, []
                for fork in forks:
                    fork.take_fork(slot, self.ctx)
                    self.counters["prompt_forks"] += 1
                self._sample(slot)
                for fork in forks:
                    if fork.job is not None:
                        self._sample(fork)
                    fork.batch_index = -1  # sampled: not again when the loop reaches it

    def _score_prompt_chunk(self, slot: Slot) -> None:
        """Score the prompt tokens that follow this step's chunk positions: the logits at
        position p rate the prompt token at p + 1."""
        assert slot.scored_chunk is not None and slot.scores is not None and slot.job is not None
        start, first_index, count = slot.scored_chunk
        slot.scored_chunk = None
        top_n = slot.job.request.prompt_logprobs or 0
        for offset in range(count):
            following = start + offset + 1
            if following >= len(slot.prompt):
                break
            logits = self.ctx.logits(first_index + offset, self.model.n_vocab)
            slot.scores.append(
                prompt_token_score(logits, slot.prompt[following], top_n, self._token_bytes)
            )

    def _sample(self, slot: Slot) -> None:
        assert slot.sampler is not None and slot.job is not None
        if slot.max_new <= 0:
            # max_tokens 0: only the prompt was wanted (scored for echo, or read into the cache).
            self._finish(slot, "length")
            return
        draft, slot.draft = slot.draft, []
        index = slot.batch_index
        ended: tuple[FinishReason, StopCause | None] | None = None
        accepted = 0
        while True:
            token = slot.sampler.sample(self.ctx, index)
            ended = self._take(slot, token, index)
            if ended is not None:
                break
            if accepted < len(draft) and token == draft[accepted]:
                # The model chose the drafted token: the KV decoded for it is right, and the
                # logits after it give the next token without another step.
                slot.cached.append(token)
                accepted += 1
                index = slot.draft_index + accepted - 1
                continue
            slot.next_token = token
            break
        if draft:
            self.counters["draft_tokens"] += len(draft)
            self.counters["draft_tokens_accepted"] += accepted
            if accepted < len(draft):
                # The rejected tokens' KV: what follows the accepted ones must be decoded again.
                self.ctx.forget(slot.seq_id, len(slot.cached))
            if slot.drafter is not None:
                slot.drafter.feedback(len(draft), accepted)
        if ended is not None:
            self._finish(slot, ended[0], cause=ended[1])
            return
        propose_draft(slot, self.settings, rewindable=self.model.rewindable, n_ctx=self.n_ctx)

    def _take(
        self, slot: Slot, token: int, index: int
    ) -> tuple[FinishReason, StopCause | None] | None:
        """Pass one sampled token on; how the generation ends, if it does with this token."""
        assert slot.assembler is not None and slot.job is not None
        if self.model.is_eog(token):
            return "stop", "eog"
        self._check_time_budget(slot)
        slot.count_token()
        self.counters["tokens_generated"] += 1
        piece = self.model.token_bytes(token, self._piece_buf)
        logprobs = None
        top_n = slot.job.request.logprobs
        if top_n is not None:
            logits = self.ctx.logits(index, self.model.n_vocab)
            logprobs = [token_logprob(logits, token, piece, top_n, self._token_bytes)]
        text = slot.assembler.feed(piece)
        slot.unsent.append(token)
        if text or logprobs:
            slot.job.stream.push(TextDelta(text, logprobs, slot.unsent))
            slot.unsent = []
        if slot.assembler.stopped:
            cause = slot.assembler.cause
            return ("length" if cause == "time_budget" else "stop"), cause
        if slot.generated >= slot.max_new:
            return "length", None
        return None

    def _token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token, self._piece_buf)

    def _check_time_budget(self, slot: Slot) -> None:
        """A spent time budget ends the completion at its next newline (llama.cpp's
        ``t_max_predict_ms``: counted from the first token, so a slow prompt is not charged)."""
        assert slot.job is not None and slot.assembler is not None
        rules = slot.job.request.early_stop
        if rules is None or rules.time_budget is None or not slot.generated:
            return
        if time.monotonic() - slot.first_token_at > rules.time_budget:
            slot.assembler.expire()

    # --- ending requests -----------------------------------------------------------------
    def _finish(self, slot: Slot, reason: FinishReason, *, cause: StopCause | None = None) -> None:
        usage = slot.finish()
        matched = slot.assembler.matched if slot.assembler is not None else None
        scores = slot.scores
        self.counters["requests_" + reason] += 1
        self._report_finish(slot, usage)
        # Free the slot before the client hears "finished", so anything it does next (stats,
        # another request) already sees the slot free.
        job = self._release(slot)
        if job is not None:
            job.stream.push(
                Finished(reason, usage, stop_sequence=matched, prompt_tokens=scores, cause=cause)
            )

    def _report_finish(self, slot: Slot, usage: Usage) -> None:
        if self.hooks.on_finish is None or slot.job is None:
            return
        try:
            self.hooks.on_finish(self.model_id, usage, slot.job.enqueued_at, slot.first_token_time)
        except Exception:  # metrics must never break generation
            log.exception("on_finish hook failed")

    def _release(
        self, slot: Slot, *, error: ShimmyError | None = None, drop_cache: bool = False
    ) -> Job | None:
        if slot.fork_of is not None:
            slot.fork_of.forks.remove(slot)
            slot.fork_of = None
        for fork in slot.forks:
            fork.fork_of = None  # its source is gone before its prompt was read: read it itself
        slot.forks = []
        job = slot.release(self.ctx, drop_cache=drop_cache)
        self.last_used = time.monotonic()
        if error is not None and job is not None:
            job.stream.push(error)
        if self.hooks.on_idle is not None and not self._queue and self._busy() == 0:
            try:
                self.hooks.on_idle(self.model_id)
            except Exception:
                log.exception("on_idle hook failed")
        return job

    def _reap_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if job.stream.cancelled:
                self.counters["requests_cancelled"] += 1
                usage = slot.usage()
                self._report_finish(slot, usage)
                # Mid-prompt the cache is still valid up to what was decoded: keep it.
                self._release(slot)
                job.stream.push(Finished("cancelled", usage))
            elif now > job.deadline:
                # The deadline ends the answer the way max_tokens does: what was generated is
                # kept and sent, finishing as "length", rather than thrown away in an error.
                self.counters["requests_timed_out"] += 1
                self._finish(slot, "length")

    def _fail_everything(self, error: ShimmyError) -> None:
        for slot in self._slots:
            if slot.job is not None:
                self._release(slot, error=error)
        with self._cv:
            queued = list(self._queue)
            self._queue.clear()
            calls = list(self._calls)
            self._calls.clear()
        for job in queued:
            job.stream.push(error)
            for fork in job.forks:
                fork.stream.push(error)
        for call in calls:
            call.fail(error)


def _with_forks(jobs: list[Job]) -> list[Job]:
    """The jobs to queue: the first of those with the same prompt, carrying the rest as its
    forks. Scoring a prompt reads every position's logits, so those jobs are never forks."""
    sources: dict[tuple[object, bool], Job] = {}
    queued: list[Job] = []
    for job in jobs:
        request = job.request
        if request.prompt_logprobs is not None:
            queued.append(job)
            continue
        prompt = request.prompt if isinstance(request.prompt, str) else tuple(request.prompt)
        source = sources.setdefault((prompt, request.add_bos), job)
        if source is job:
            queued.append(job)
        else:
            source.forks.append(job)
    return queued

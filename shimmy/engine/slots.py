"""Slots: one llama sequence each, running at most one request (llama.cpp server's server_slot).

A slot keeps the tokens of its last request in the KV cache after the request ends. A new
request goes to the free slot whose cached tokens share the longest prefix with its prompt, so
only the differing tail is decoded (the next turn of a chat, a shared system prompt); the
choice, also among sequences saved in host memory, is placement.py's.

Only the worker thread touches slots, except that the event loop counts busy ones under the
scheduler's lock.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from shimmy.engine.llama import LlamaContext, Sampler
from shimmy.engine.ngram import NgramDrafter
from shimmy.engine.stream import GenerationStream
from shimmy.engine.textstream import TextAssembler
from shimmy.engine.types import GenerationRequest, PromptToken, TextDelta, Usage


@dataclass
class Job:
    request: GenerationRequest
    stream: GenerationStream
    deadline: float
    enqueued_at: float = field(default_factory=time.monotonic)
    # Requests with this one's prompt, submitted with it (OpenAI's n > 1, best_of): they wait
    # for its prompt to be decoded and take a copy of its KV instead of decoding it again.
    forks: list[Job] = field(default_factory=list)


@dataclass
class Checkpoint:
    """The sliding-window layers' KV of a sequence when it held its first ``n_tokens``.

    Those layers keep only the last window of positions, so their cache cannot be cut back
    to an earlier position the way full-attention layers' can; loading a checkpoint restores
    them as they were at ``n_tokens``, and the full layers are cut there.
    """

    n_tokens: int
    state: ctypes.Array[ctypes.c_uint8]


# Checkpoints kept per sequence: the newest ones, which the next request most likely needs.
MAX_CHECKPOINTS = 2


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    job: Job | None = None
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
    # Prompt scoring (``prompt_logprobs``): the scores so far, and where this step's prompt
    # chunk sits: (first prompt position, its batch index, how many tokens).
    scores: list[PromptToken] | None = None
    scored_chunk: tuple[int, int, int] | None = None
    # Sampled tokens whose text is still held back (a partial character, a possible stop).
    unsent: list[int] = field(default_factory=list)
    # Speculative decoding: the drafter (None: this request does not draft) and the tokens
    # guessed to follow ``next_token``, decoded with it in the next step.
    drafter: NgramDrafter | None = None
    draft: list[int] = field(default_factory=list)
    draft_index: int = -1  # the batch index of the draft's first token
    checkpoints: list[Checkpoint] = field(default_factory=list)
    # Where this request's prompt stops for a checkpoint before its last token (-1: none).
    checkpoint_at: int = -1
    # Forks: the slots waiting for this one's prompt (``Job.forks``), and the slot a waiting
    # fork copies from. A waiting fork is not prefilled; if its source goes first, it is.
    forks: list[Slot] = field(default_factory=list)
    fork_of: Slot | None = None

    @property
    def waiting_for_fork(self) -> bool:
        return self.fork_of is not None

    @property
    def prefilling(self) -> bool:
        return self.job is not None and len(self.cached) < len(self.prompt)

    def take_fork(self, source: Slot, ctx: LlamaContext) -> None:
        """Become a copy of ``source``, whose prompt (this one's too) has just been decoded:
        its logits at ``source.batch_index`` give this slot's first token as well."""
        ctx.copy_sequence(source.seq_id, self.seq_id)
        self.cached = list(source.cached)
        self.checkpoints = list(source.checkpoints)
        self.cached_at_start = len(self.prompt)
        self.batch_index = source.batch_index
        self.fork_of = None

    @property
    def admitted_at(self) -> float:
        return self.job.enqueued_at if self.job is not None else 0.0

    def start(
        self, job: Job, prompt: list[int], sampler: Sampler, *, max_new: int, reused: int
    ) -> None:
        """Run ``job`` here; the cache must already be cut to ``reused`` tokens of ``prompt``."""
        self.sampler = sampler
        self.job = job
        self.prompt = prompt
        self.assembler = TextAssembler(job.request.stop, job.request.early_stop)
        self.next_token = None
        self.batch_index = -1
        self.max_new = max_new
        self.generated = 0
        self.unsent = []
        self.cached_at_start = reused
        self.last_used = time.monotonic()
        self.scores = None
        self.scored_chunk = None
        self.drafter = None
        self.draft = []
        self.checkpoint_at = -1

    def count_token(self) -> None:
        self.generated += 1
        if self.generated == 1:
            self.first_token_at = time.monotonic()

    @property
    def first_token_time(self) -> float | None:
        return self.first_token_at if self.generated else None

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=self.generated,
            cached_tokens=self.cached_at_start,
        )

    def finish(self) -> Usage:
        """End the generation: send the text held back (a possible stop string's start, a
        partial character). The slot stays busy until ``release``."""
        assert self.job is not None and self.assembler is not None
        tail = self.assembler.finish()
        if tail or self.unsent:
            self.job.stream.push(TextDelta(tail, tokens=self.unsent))
            self.unsent = []
        return self.usage()

    def release(self, ctx: LlamaContext, *, drop_cache: bool = False) -> Job | None:
        """Free the slot; returns the job it ran. The cache is kept for the next request's
        prefix unless ``drop_cache`` (after a failed decode its contents are unknown)."""
        job = self.job
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = None
        self.job = None
        self.assembler = None
        self.next_token = None
        self.batch_index = -1
        self.scores = None
        self.scored_chunk = None
        self.drafter = None
        self.draft = []
        self.last_used = time.monotonic()
        self.checkpoint_at = -1
        if drop_cache:
            ctx.forget(self.seq_id, 0)
            self.cached.clear()
            self.checkpoints.clear()
        return job

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.checkpoints = [c for c in self.checkpoints if c.n_tokens != checkpoint.n_tokens]
        self.checkpoints.append(checkpoint)
        self.checkpoints.sort(key=lambda c: c.n_tokens)
        del self.checkpoints[:-MAX_CHECKPOINTS]

    def keep_prefix(self, ctx: LlamaContext, keep: int) -> int:
        """Cut the cache to its first ``keep`` tokens; returns how many were kept (0 when the
        context cannot cut the sequence there, e.g. a sliding-window cache)."""
        if keep <= 0 or not ctx.forget(self.seq_id, keep):
            ctx.forget(self.seq_id, 0)
            keep = 0
        del self.cached[keep:]
        self.checkpoints = [c for c in self.checkpoints if c.n_tokens <= keep]
        return keep


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

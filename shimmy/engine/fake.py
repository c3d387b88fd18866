"""FakeEngine: an ``Engine`` that loads nothing and answers from a script.

For tests of what sits above the engine seam (routes, response shapes, the registry), which
then need neither llama.cpp nor a model's weights, and get the same answer every time. Give it
to a registry as its factory: ``ModelRegistry(settings, engine_factory=FakeEngine)``, or
``functools.partial(FakeEngine, script=...)`` for other answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from shimmy.chat.templates import ChatTemplate
from shimmy.engine.protocol import EngineHooks, Stream
from shimmy.engine.stream import GenerationStream
from shimmy.engine.textstream import TextAssembler
from shimmy.engine.types import (
    EmbeddingResult,
    FimTokens,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    Usage,
)
from shimmy.errors import ServerBusy, ShimmyError
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

# The pieces (one "token" each) a request is answered with; it may raise a ShimmyError.
Script = Callable[[GenerationRequest], Sequence[str]]

DEFAULT_ANSWER = ("Hello", ",", " world", "!")


def _default_script(_request: GenerationRequest) -> Sequence[str]:
    return DEFAULT_ANSWER


class FakeEngine:
    """Implements ``shimmy.engine.protocol.Engine``. Tokens are UTF-8 bytes; ``max_tokens``
    and stop strings are honoured as a real engine does; ``requests`` records what came in."""

    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        options: ModelOptions | None = None,
        *,
        hooks: EngineHooks | None = None,
        script: Script = _default_script,
        fim_tokens: FimTokens | None = None,
    ) -> None:
        self.options = options or ModelOptions()
        self.settings = settings.model_copy(update=self.options.settings_overrides())
        self.entry = entry
        self.template = ChatTemplate.for_entry(entry, self.options.chat_template)
        self.n_ctx = self.settings.ctx_size
        self.n_parallel = self.settings.parallel
        self.n_gpu_layers = 0
        self.load_seconds = 0.0
        self.loaded_at = time.time()
        self.memory_bytes = 0
        self.keep_alive = self.settings.keep_alive
        self.last_used = time.monotonic()
        self.requests: list[GenerationRequest] = []
        # None: like most chat models, it cannot fill in the middle. Token ids are bytes here,
        # so FIM tokens given for a test should lie above 255.
        self.fim_tokens = fim_tokens
        self.eog_tokens: tuple[int, ...] = ()
        self._hooks = hooks or EngineHooks()
        self._script = script
        self._playing: set[asyncio.Task[None]] = set()
        self._closed = False
        if self._hooks.on_load_progress is not None:
            self._hooks.on_load_progress(entry.id, 1.0)

    def submit(self, request: GenerationRequest) -> Stream:
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[Stream]:
        if self._closed:
            raise ServerBusy("the model is being unloaded", retry_after=1)
        if len(self._playing) + len(requests) > self.n_parallel + self.settings.max_queue:
            raise ServerBusy("all slots are busy", retry_after=1)
        loop = asyncio.get_running_loop()
        streams: list[Stream] = []
        for request in requests:
            self.requests.append(request)
            stream = GenerationStream(loop, wake_worker=lambda: None)
            task = loop.create_task(self._play(request, stream))
            self._playing.add(task)
            task.add_done_callback(self._played)
            streams.append(stream)
        self.last_used = time.monotonic()
        return streams

    async def _play(self, request: GenerationRequest, stream: GenerationStream) -> None:
        enqueued = time.monotonic()
        prompt = request.prompt
        usage = Usage(len(prompt) if isinstance(prompt, list) else self.count_tokens(prompt))
        assembler = TextAssembler(request.stop, request.early_stop)
        try:
            pieces = list(self._script(request))
        except ShimmyError as exc:  # a script may play an engine error, e.g. a too long prompt
            stream.push(exc)
            return
        limit = len(pieces) if request.max_tokens is None else request.max_tokens
        reason: FinishReason = "stop" if len(pieces) <= limit else "length"
        first: float | None = None
        for piece in pieces[:limit]:
            # A yield per piece, as a real engine's decode steps: the consumer may cancel.
            await asyncio.sleep(0)
            if self._closed:
                stream.push(ServerBusy("the model was unloaded", retry_after=1))
                return
            if stream.cancelled:
                reason = "cancelled"
                break
            first = first or time.monotonic()
            usage.completion_tokens += 1
            text = assembler.feed(piece.encode())
            if text:
                stream.push(TextDelta(text))
            if assembler.stopped:
                reason = "length" if assembler.cause == "time_budget" else "stop"
                break
        tail = assembler.finish()
        if tail:
            stream.push(TextDelta(tail))
        if self._hooks.on_finish is not None:
            self._hooks.on_finish(self.entry.id, usage, enqueued, first)
        stream.push(Finished(reason, usage, stop_sequence=assembler.matched, cause=assembler.cause))

    def _played(self, task: asyncio.Task[None]) -> None:
        self._playing.discard(task)
        self.last_used = time.monotonic()
        if not self._playing and self._hooks.on_idle is not None:
            self._hooks.on_idle(self.entry.id)

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(text.encode())

    async def tokenize_literal(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode()) for text in texts]

    async def detokenize(self, tokens: list[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", "replace")

    def count_tokens(self, text: str, *, add_special: bool = True) -> int:
        return len(text.encode())

    async def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult:
        vectors = []
        count = 0
        for text in texts:
            # Token ids are bytes here, as in ``tokenize``.
            data = text.encode() if isinstance(text, str) else bytes(t % 256 for t in text)
            raw = [b - 127.5 for b in hashlib.sha256(data).digest()[:16]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
            count += len(data)
        return EmbeddingResult(vectors, count)

    def stats(self) -> dict[str, Any]:
        return {
            "slots": self.n_parallel,
            "busy": min(len(self._playing), self.n_parallel),
            "queued": max(0, len(self._playing) - self.n_parallel),
            "n_ctx": self.n_ctx,
            "threads": 0,
            "n_gpu_layers": 0,
            "memory_bytes": 0,
            "requests": len(self.requests),
        }

    @property
    def in_flight(self) -> int:
        return len(self._playing)

    def close(self) -> None:
        self._closed = True

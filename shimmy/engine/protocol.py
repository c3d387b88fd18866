"""The seam between an engine and what serves it: the registry, the API and the CLI.

They use an engine only through ``Engine`` and its requests' results only through ``Stream``,
so an engine may run in this process (``LocalEngine``), in a worker process, or be a script
(``FakeEngine``) without them noticing. Hooks are given to the engine when it is made, never
set on it afterwards: an engine in another process could not see a later assignment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shimmy.chat.templates import ChatTemplate
from shimmy.engine.types import (
    EmbeddingResult,
    Event,
    FimTokens,
    Finished,
    GenerationRequest,
    Usage,
)
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

# (model id, usage, when it was queued, when its first token came or None): monotonic times.
FinishHook = Callable[[str, Usage, float, float | None], None]


@dataclass(frozen=True)
class EngineHooks:
    """Whom an engine tells about its events. Every hook gets the model id first and may be
    called on a thread other than the event loop's; an engine survives a hook that raises."""

    on_finish: FinishHook | None = None
    # No request is running or waiting any more (the registry may then unload the model).
    on_idle: Callable[[str], None] | None = None
    # Fraction 0..1 of the weights read so far, on the loading thread.
    on_load_progress: Callable[[str, float], None] | None = None
    # The engine died under its requests (a worker process ended): the reason, from its log.
    on_crash: Callable[[str, str], None] | None = None


class Stream(Protocol):
    """One request's results: ``TextDelta`` events, then one ``Finished``. Errors are raised
    from the iteration. ``cancel()`` stops the work (call it when the client goes away)."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def __anext__(self) -> Event: ...

    def cancel(self) -> None: ...

    async def collect(self) -> tuple[str, Finished]:
        """``(all the text, finished)``; cancels the request if the caller stops waiting."""
        ...


class Engine(Protocol):
    """One loaded model. Made (blocking: call it in a thread) by an ``EngineFactory``."""

    @property
    def entry(self) -> ModelEntry: ...

    @property
    def options(self) -> ModelOptions: ...

    @property
    def settings(self) -> Settings:
        """The server's settings with this model's overrides (``ModelOptions``) applied."""
        ...

    @property
    def template(self) -> ChatTemplate: ...

    @property
    def n_ctx(self) -> int:
        """The context of one request: prompt plus generated tokens."""
        ...

    @property
    def n_parallel(self) -> int: ...

    @property
    def n_gpu_layers(self) -> int: ...

    @property
    def load_seconds(self) -> float: ...

    @property
    def loaded_at(self) -> float:
        """Wall-clock time (``time.time()``) the load finished."""
        ...

    @property
    def memory_bytes(self) -> int: ...

    # Written by the registry too: a request's keep_alive, a lookup that counts as use.
    keep_alive: float  # seconds to stay loaded when idle; 0 = unload when idle, -1 = never
    last_used: float  # time.monotonic()

    @property
    def in_flight(self) -> int:
        """Requests running or waiting."""
        ...

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue one request (call on the event loop); raises ``ServerBusy`` when full."""
        ...

    def submit_many(self, requests: list[GenerationRequest]) -> list[Stream]:
        """Queue several requests atomically: all are accepted or none (``ServerBusy``)."""
        ...

    @property
    def fim_tokens(self) -> FimTokens | None:
        """The model's fill-in-the-middle tokens; None: it cannot fill in the middle."""
        ...

    @property
    def eog_tokens(self) -> tuple[int, ...]:
        """The vocabulary's end-of-generation tokens (EOS, EOT, ``<end_of_turn>``...)."""
        ...

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    async def tokenize_literal(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens as plain text: no BOS, and spellings of special tokens stay text
        (code may well contain ``<|fim_prefix|>``). One call for many texts: a FIM prompt is
        several pieces, and an engine in another process answers them in one round trip."""
        ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    def count_tokens(self, text: str, *, add_special: bool = True) -> int:
        """How many tokens ``text`` is, answered at once (for code that is not async)."""
        ...

    async def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult: ...

    def stats(self) -> dict[str, Any]:
        """slots, busy, queued, n_ctx, threads, n_gpu_layers, memory_bytes and counters."""
        ...

    def close(self) -> None:
        """Stop the work and free the model (blocking: call it in a thread)."""
        ...


class EngineFactory(Protocol):
    def __call__(
        self, entry: ModelEntry, settings: Settings, options: ModelOptions, *, hooks: EngineHooks
    ) -> Engine: ...

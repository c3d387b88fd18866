"""Running prepared requests: one way to start, collect and stream them for every dialect.

- ``start`` submits and waits for the first event, so a failure before any text (context
  exceeded, a full queue, a grammar llama.cpp rejects) is raised while the dialect can still
  answer with an HTTP status.
- ``collect`` runs generations to the end together, and stops them all when one fails, when the
  client goes away or when a time limit passes.
- ``frames`` is the one guarded event loop of a stream: a dialect's ``StreamRenderer`` turns
  events into wire frames, and any failure mid-stream becomes the renderer's error frame.

Errors raised by the engine name the request field they are about in engine terms (``prompt``,
``grammar``); ``for_request`` re-creates them in the dialect's terms (``messages``, ``tools``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from shimmy.engine.types import Event, Finished, TextDelta, TokenLogprob, Usage
from shimmy.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    ShimmyError,
    ShuttingDown,
    unexpected_error,
)
from shimmy.serving.drain import current_drain

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine, Stream
    from shimmy.serving.prepare import Prepared

FrameT = TypeVar("FrameT")
FrameT_co = TypeVar("FrameT_co", covariant=True)


def for_request(err: ShimmyError, prepared: Prepared) -> ShimmyError:
    """``err`` naming the field of ``prepared``'s request it is about (a new error: errors are
    never changed once raised)."""
    if isinstance(err, ContextLengthExceeded) and err.param != prepared.prompt_param:
        return err.copy_with(param=prepared.prompt_param)
    if err.param == "grammar" and prepared.grammar_param is not None:
        return err.copy_with(param=prepared.grammar_param)
    return err


@dataclass
class Started:
    """A submitted generation whose first event has arrived."""

    stream: Stream
    first: Event
    prepared: Prepared

    async def events(self) -> AsyncIterator[Event]:
        """Every event, the first included; a stream that ends without ``Finished`` raises."""
        yield self.first
        if isinstance(self.first, Finished):
            return
        async for event in self.stream:
            yield event
            if isinstance(event, Finished):
                return
        raise GenerationFailed("the generation ended unexpectedly")

    def cancel(self) -> None:
        self.stream.cancel()


async def start(engine: Engine, prepared: Prepared) -> Started:
    [stream] = engine.submit_many([prepared.request])
    try:
        first = await anext(stream)
    except ShimmyError as err:
        stream.cancel()
        raise for_request(err, prepared) from None
    except BaseException:
        stream.cancel()
        raise
    return Started(stream, first, prepared)


@dataclass
class Collected:
    """Everything one generation produced."""

    text: str
    finished: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # where each token's text starts
    first_event_at: float | None = None  # time.monotonic() of its first event
    tokens: list[int] = field(default_factory=list)  # generated ids, where the engine says


async def _drain(stream: Stream) -> Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    offsets: list[int] = []
    tokens: list[int] = []
    length = 0
    first: float | None = None
    async for event in stream:
        first = first or time.monotonic()
        if isinstance(event, TextDelta):
            for token in event.logprobs or ():
                logprobs.append(token)
                offsets.append(length)
            parts.append(event.text)
            length += len(event.text)
            tokens += event.tokens or ()
        else:
            return Collected("".join(parts), event, logprobs, offsets, first, tokens)
    raise GenerationFailed("the generation ended unexpectedly")


async def collect(
    engine: Engine,
    prepared: Sequence[Prepared],
    *,
    until: Callable[[], Awaitable[Any]] | None = None,
    max_seconds: float | None = None,
) -> list[Collected | ShimmyError]:
    """Run ``prepared`` together (queued atomically) and return each result or its error, in
    order. The first failure cancels the others, and so does ``until`` completing (the client
    went away). After ``max_seconds`` every generation still running is cancelled and keeps
    what it produced."""
    streams = engine.submit_many([p.request for p in prepared])

    def cancel_all(_: object = None) -> None:
        for stream in streams:
            stream.cancel()

    async def drain_one(stream: Stream, plan: Prepared) -> Collected | ShimmyError:
        try:
            return await _drain(stream)
        except ShimmyError as err:
            cancel_all()
            return for_request(err, plan)
        except BaseException:
            cancel_all()
            raise

    drains = asyncio.gather(*(drain_one(s, p) for s, p in zip(streams, prepared, strict=True)))
    watch = asyncio.ensure_future(until()) if until is not None else None
    if watch is not None:
        watch.add_done_callback(cancel_all)
    timer = None
    if max_seconds is not None:
        timer = asyncio.get_running_loop().call_later(max_seconds, cancel_all)
    try:
        return await drains
    finally:
        if timer is not None:
            timer.cancel()
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        cancel_all()


async def collect_one(
    engine: Engine,
    prepared: Prepared,
    *,
    until: Callable[[], Awaitable[Any]] | None = None,
    max_seconds: float | None = None,
) -> Collected:
    [result] = await collect(engine, [prepared], until=until, max_seconds=max_seconds)
    if isinstance(result, ShimmyError):
        raise result
    return result


def total_usage(usages: Iterable[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total = Usage(
            total.prompt_tokens + usage.prompt_tokens,
            total.completion_tokens + usage.completion_tokens,
            total.cached_tokens + usage.cached_tokens,
        )
    return total


class StreamRenderer(Protocol, Generic[FrameT_co]):
    """How one dialect writes a stream. Each method returns the frames to send (often none)."""

    def opening(self) -> Iterable[FrameT_co]: ...
    def delta(self, event: TextDelta) -> Iterable[FrameT_co]: ...
    def finished(self, event: Finished) -> Iterable[FrameT_co]: ...
    def error(self, err: ShimmyError) -> Iterable[FrameT_co]: ...
    def closing(self) -> Iterable[FrameT_co]: ...


async def frames(
    started: Started, renderer: StreamRenderer[FrameT]
) -> AsyncGenerator[FrameT, None]:
    """The frames of ``started`` as ``renderer`` writes them; whatever happens, the generation
    is cancelled when the frames stop being read (the client left, the stream was closed)."""
    with current_drain().generation(started.cancel) as generation:
        try:
            for frame in renderer.opening():
                yield frame
            async for event in started.events():
                if (
                    isinstance(event, Finished)
                    and event.finish_reason == "cancelled"
                    and generation.cut
                ):
                    # The shutdown's grace ran out: the stop is the server's, not the client's.
                    raise ShuttingDown("the grace period ended before the generation did")
                out = (
                    renderer.delta(event)
                    if isinstance(event, TextDelta)
                    else renderer.finished(event)
                )
                for frame in out:
                    yield frame
        except ShimmyError as err:
            for frame in renderer.error(for_request(err, started.prepared)):
                yield frame
        except Exception as exc:
            for frame in renderer.error(unexpected_error(exc)):
                yield frame
        finally:
            started.cancel()
    for frame in renderer.closing():
        yield frame

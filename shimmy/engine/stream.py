"""The bridge between the event loop and an engine's worker thread.

Only the worker touches llama.cpp, and the event loop must never block on it. Results cross
back with ``loop.call_soon_threadsafe``: a request's events into its ``GenerationStream``, a
one-off call's result into an asyncio future (``WorkerCall``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from shimmy.engine.types import Event, Finished, TextDelta
from shimmy.errors import GenerationFailed, ShimmyError

log = logging.getLogger(__name__)

T = TypeVar("T")


class GenerationStream:
    """The event loop's end of one request: an async iterator of TextDelta ... Finished."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_worker: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event | ShimmyError] = asyncio.Queue()
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
        return item

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


class WorkerCall(Generic[T]):
    """A function the worker runs between decode steps, and the future that gets its result.
    Made on the event loop; ``run`` or ``fail`` is called on the worker thread."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._loop = asyncio.get_running_loop()
        self.future: asyncio.Future[T] = self._loop.create_future()

    def run(self) -> None:
        try:
            result = self._fn()
        except ShimmyError as exc:
            self.fail(exc)
        except Exception as exc:
            log.exception("engine task failed")
            self.fail(GenerationFailed(str(exc) or type(exc).__name__))
        else:
            self._settle(result, None)

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if self.future.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)

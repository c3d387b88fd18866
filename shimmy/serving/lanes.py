"""Cancel-and-replace: at most one generation per key, the newest one.

An editor asks for a completion at every pause in typing and throws the previous one away. A
request that claims a key (the same ``X-Client-Id`` over HTTP, the same ``id`` on a WebSocket)
cancels the generation holding it and waits, briefly, for that one to end before it starts: the
cancelled one then has freed its slot, with the cache of the text before the cursor, so the
new one reuses that cache instead of queueing behind a completion nobody will read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from shimmy.engine.protocol import Stream

T = TypeVar("T")

# How long a new request waits for the one it replaces to end. A cancelled generation ends at
# the engine's next step; waiting longer only happens when its response is stuck on a client
# that stopped reading, and the new request must not wait on that.
REPLACE_WAIT_SECONDS = 5.0


class Lane:
    """One claim on a key: the generations running under it, cancelled when a newer claim on
    the same key arrives (``replaced``)."""

    def __init__(self) -> None:
        self.replaced = asyncio.Event()
        self._ended = asyncio.Event()
        self._streams: list[Stream] = []

    def attach(self, stream: Stream) -> None:
        self._streams.append(stream)
        if self.replaced.is_set():  # replaced while the model loaded or the prompt was built
            stream.cancel()

    def cancel(self) -> None:
        self.replaced.set()
        for stream in self._streams:
            stream.cancel()

    def watching(self, other: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """An ``until`` for ``collect``: whichever comes first, ``other`` or being replaced."""

        async def wait() -> None:
            waits = [asyncio.ensure_future(other()), asyncio.ensure_future(self.replaced.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                for task in waits:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        return wait


class Lanes:
    """Keys to the lane that holds each. Used from the event loop only."""

    def __init__(self, *, replace_wait: float = REPLACE_WAIT_SECONDS) -> None:
        self._lanes: dict[Hashable, Lane] = {}
        self._replace_wait = replace_wait

    def __len__(self) -> int:
        return len(self._lanes)

    async def claim(self, key: Hashable | None) -> Lane:
        """A lane for ``key``, the one it held cancelled and (within a bound) ended first. No
        key: a lane of its own, which nothing replaces."""
        lane = Lane()
        if key is None:
            return lane
        previous = self._lanes.get(key)
        self._lanes[key] = lane
        if previous is not None:
            previous.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(previous._ended.wait(), self._replace_wait)
        return lane

    def cancel(self, key: Hashable) -> bool:
        """Cancel the generation holding ``key``; False when none does."""
        lane = self._lanes.get(key)
        if lane is None:
            return False
        lane.cancel()
        return True

    def cancel_all(self) -> None:
        for lane in self._lanes.values():
            lane.cancel()

    def release(self, key: Hashable | None, lane: Lane) -> None:
        lane._ended.set()
        if key is not None and self._lanes.get(key) is lane:
            del self._lanes[key]

    @contextlib.asynccontextmanager
    async def holding(self, key: Hashable | None) -> AsyncIterator[Lane]:
        lane = await self.claim(key)
        try:
            yield lane
        finally:
            self.release(key, lane)

    async def releasing(
        self, key: Hashable | None, lane: Lane, frames: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        """``frames``, with ``lane`` released when they end: a streamed generation outlives
        the handler that claimed its lane."""
        try:
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()
            self.release(key, lane)

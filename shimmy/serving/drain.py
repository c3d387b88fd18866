"""What a shutting-down server still owes its clients: the generations in flight.

uvicorn lets HTTP responses run on through its grace period but closes every WebSocket at once
(1012), and when the grace runs out it cancels whatever still runs, which ends a stream without
a final event and logs a traceback. A ``Drain`` (one per event loop, i.e. per server) knows:

- every streamed generation (``generation``, entered by ``shimmy.serving.run.frames``), so that
  at the end of the grace they can be *cut*: stopped, and ended by the dialect's own error
  frame instead of a cancellation;
- which WebSocket connections have requests to answer (``hold``/``release``, keyed by the
  client's address, the one key the route and uvicorn's protocol both have), so the server
  closes a connection only once it is idle or cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Key = tuple[str, int]


@dataclass(eq=False)
class Generation:
    stop: Callable[[], None]
    cut: bool = False  # stopped by the shutdown: it ends with an error, not as "cancelled"


class Drain:
    def __init__(self) -> None:
        self.closing = False  # new requests are refused from now on
        self.cut = False  # the grace is over
        self._generations: set[Generation] = set()
        self._held: dict[Key, int] = {}
        self._on_idle: dict[Key, list[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def generation(self, stop: Callable[[], None]) -> Iterator[Generation]:
        generation = Generation(stop)
        if self.cut:
            generation.cut = True
            stop()
        self._generations.add(generation)
        try:
            yield generation
        finally:
            self._generations.discard(generation)

    def cut_all(self) -> None:
        self.cut = True
        for generation in list(self._generations):
            generation.cut = True
            generation.stop()

    def hold(self, key: Key | None) -> None:
        if key is not None:
            self._held[key] = self._held.get(key, 0) + 1

    def release(self, key: Key | None) -> None:
        if key is None or key not in self._held:
            return
        self._held[key] -= 1
        if self._held[key] > 0:
            return
        del self._held[key]
        for callback in self._on_idle.pop(key, []):
            callback()

    def forget(self, key: Key | None) -> None:
        """The connection has ended: whatever it held is let go."""
        if key is not None and key in self._held:
            self._held[key] = 1
            self.release(key)

    def busy(self, key: Key | None) -> bool:
        return key is not None and key in self._held

    def when_idle(self, key: Key, callback: Callable[[], None]) -> None:
        self._on_idle.setdefault(key, []).append(callback)


_drains: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Drain] = weakref.WeakKeyDictionary()


def current_drain() -> Drain:
    """The drain of the server running on this event loop (tests run several, one per loop)."""
    loop = asyncio.get_running_loop()
    drain = _drains.get(loop)
    if drain is None:
        drain = _drains[loop] = Drain()
    return drain

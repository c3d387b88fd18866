"""Turning a stream of token bytes into text that is safe to send.

Two things make this non-trivial: a UTF-8 character can be split across tokens (byte-level
vocabularies do this constantly), and a stop string can be split across tokens too. Text is
released only when it is whole characters and cannot be the beginning of a stop string.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: list[str] | None = None) -> None:
        # 'replace' turns invalid bytes into U+FFFD instead of failing the request: a model may
        # emit any byte sequence, and clients must still receive valid UTF-8.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = sorted({s for s in (stop or []) if s}, key=len)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that can be released now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release everything still held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self.matched = next(s for s in self._stops if pending.startswith(s, cut))
            self._pending = ""
            return pending[:cut]
        if final:
            self._pending = ""
            return pending
        hold = self._partial_stop_suffix(pending)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def _first_stop(self, text: str) -> int | None:
        positions = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(positions) if positions else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

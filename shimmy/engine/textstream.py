"""Turning a stream of token bytes into text that is safe to send.

Two things make this non-trivial: a UTF-8 character can be split across tokens (byte-level
vocabularies do this constantly), and a stop string can be split across tokens too. Text is
released only when it is whole characters and cannot be the beginning of a stop string.

Code completion adds line rules (``EarlyStop``): at most N lines, no line indented less than
the completion's own block, and "finish the line you are on" once a time budget is spent. Each
ends the text at a newline, which is left out, so an editor never inserts half a line.
"""

from __future__ import annotations

import codecs

from shimmy.engine.types import EarlyStop, StopCause


class TextAssembler:
    def __init__(self, stop: list[str] | None = None, early_stop: EarlyStop | None = None) -> None:
        # 'replace' turns invalid bytes into U+FFFD instead of failing the request: a model may
        # emit any byte sequence, and clients must still receive valid UTF-8.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = sorted({s for s in (stop or []) if s}, key=len)
        self._pending = ""
        self._lines = LineRules(early_stop) if early_stop is not None else None
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self.cause: StopCause | None = None

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that can be released now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._through_lines(self._release(final=False), final=False)

    def finish(self) -> str:
        """End of generation: release everything still held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._through_lines(self._release(final=True), final=True)

    def expire(self) -> None:
        """The time budget is spent: end at the next line end (at once if one is pending)."""
        if self._lines is not None and not self.stopped:
            self._lines.expire()
            self._take_line_stop()

    def _through_lines(self, text: str, *, final: bool) -> str:
        if self._lines is None:
            return text
        # A stop string's cut ends the text as surely as the end of the generation does.
        out = self._lines.feed(text, final=final or self.stopped)
        self._take_line_stop()
        return out

    def _take_line_stop(self) -> None:
        assert self._lines is not None
        if self._lines.cause is not None:
            # A line rule that fired cut the text before any stop string found after it.
            self.stopped = True
            self.cause = self._lines.cause
            self.matched = None

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self.cause = "stop_string"
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


class LineRules:
    """``EarlyStop`` applied to released text, one character at a time.

    A newline is held until the next line shows whether it may stay: under ``min_indent`` its
    indentation is unknown until the line's first visible character, and blank lines in between
    are held with it (a blank line says nothing about the block). When a rule ends the text,
    everything held is dropped, so the text ends with the last line that was kept.
    """

    def __init__(self, rules: EarlyStop) -> None:
        self.rules = rules
        self.cause: StopCause | None = None
        self._newlines = 0  # newlines released
        self._held = ""  # from a held newline up to the current character
        self._expired = False

    def expire(self) -> None:
        self._expired = True
        if self._held and self.cause is None:
            self.cause = "time_budget"

    def feed(self, text: str, *, final: bool) -> str:
        out: list[str] = []
        for char in text:
            if self.cause is not None:
                break
            if char == "\n":
                self._newline(out)
            elif self._held and char in " \t":
                self._held += char
            elif self._held:
                self._visible_after_newline(out, char)
            else:
                out.append(char)
        if final and self.cause is None and self._held:
            out.append(self._held)  # the end of the generation leaves nothing to decide
            self._held = ""
        return "".join(out)

    def _newline(self, out: list[str]) -> None:
        pending = self._newlines + self._held.count("\n")
        max_lines = self.rules.max_lines
        if self._expired:
            self.cause = "time_budget"
        elif max_lines is not None and pending + 1 >= max_lines:
            self.cause = "max_lines"
        elif self.rules.min_indent > 0 or self._held:
            self._held += "\n"
        else:
            self._newlines += 1
            out.append("\n")

    def _visible_after_newline(self, out: list[str], char: str) -> None:
        indent = len(self._held) - self._held.rfind("\n") - 1
        if indent < self.rules.min_indent:
            self.cause = "min_indent"
            return
        self._newlines += self._held.count("\n")
        out.append(self._held + char)
        self._held = ""

"""The prompt cache beyond the slots: evicted sequences' KV kept in host memory.

A slot keeps its last request's KV for the next request that shares its prefix, but there are
only a few slots and more conversations (a chat page, editor plugins and an agent at once):
the least recently used slot is the next conversation needed. Before a slot's cache is
overwritten, its sequence's state is copied to host memory with the tokens it holds; a later
request whose prompt shares a longer prefix with a saved copy than with any slot gets that
copy loaded into a slot, and decodes only what follows. Copies are dropped least recently used
first to stay within ``cache_ram``.

Only the worker thread uses it.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from shimmy.engine.slots import Checkpoint, common_prefix

# Saving a short sequence is not worth its copy: its prompt decodes in one step anyway.
MIN_SAVED_TOKENS = 64


@dataclass
class SavedSequence:
    tokens: list[int]
    state: ctypes.Array[ctypes.c_uint8]
    # The oldest position the state holds KV for: above 0 when a sliding window dropped the
    # start, which limits how far back the copy can be cut.
    first_position: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.state) + sum(len(c.state) for c in self.checkpoints) + 8 * len(self.tokens)


class HostPromptCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: list[SavedSequence] = []
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def worth_saving(self, tokens: list[int]) -> bool:
        """Whether a sequence of these tokens should be copied before it is overwritten: long
        enough, and not already held (as itself or as the start of a longer copy)."""
        if not self.enabled or len(tokens) < MIN_SAVED_TOKENS:
            return False
        return not any(
            len(entry.tokens) >= len(tokens) and entry.tokens[: len(tokens)] == tokens
            for entry in self._entries
        )

    def put(self, saved: SavedSequence) -> bool:
        """Keep a copy, dropping the ones it makes redundant and the least recently used past
        the limit; False if it alone is over the limit."""
        if saved.size > self.limit_bytes:
            return False
        for entry in [e for e in self._entries if saved.tokens[: len(e.tokens)] == e.tokens]:
            self._drop(entry)
        while self._entries and self.bytes + saved.size > self.limit_bytes:
            self._drop(min(self._entries, key=lambda e: e.last_used))
        self._entries.append(saved)
        self.bytes += saved.size
        return True

    def best(self, prompt: list[int]) -> SavedSequence | None:
        """The copy sharing the longest prefix with ``prompt``."""
        best, best_len = None, 0
        for entry in self._entries:
            common = common_prefix(entry.tokens, prompt)
            if common > best_len:
                best, best_len = entry, common
        return best

    def take(self, entry: SavedSequence) -> SavedSequence:
        """Remove a copy that is being loaded into a slot: the slot holds it from now on, and
        it is saved again when that slot is next overwritten."""
        self._drop(entry)
        return entry

    def _drop(self, entry: SavedSequence) -> None:
        self._entries.remove(entry)
        self.bytes -= entry.size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

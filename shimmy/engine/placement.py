"""Where a request runs: the slot, the prefix of its prompt it reuses, and the caches behind it.

A request goes to the free slot sharing the longest usable prefix with its prompt, or gets a
sequence saved in host memory (promptcache.py) loaded into a slot; a cache about to be
overwritten is saved there first. With sliding-window layers (swa_full off) a prefix is usable
only where the window before the cut is still cached, or from a checkpoint of those layers.

Only the worker thread uses it.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from shimmy.engine.llama import LlamaContext, LlamaModel
from shimmy.engine.promptcache import MIN_SAVED_TOKENS, HostPromptCache, SavedSequence
from shimmy.engine.slots import Checkpoint, Slot, common_prefix
from shimmy.errors import ShimmyError
from shimmy.settings import Settings

log = logging.getLogger(__name__)

# A shorter shared prefix (often just BOS) saves nothing, and reusing it would make a prompt's
# arithmetic depend on which slot it lands in: twins in one batch must answer alike.
MIN_REUSED_TOKENS = 4
# A prompt shorter than this is cheap to decode again: no checkpoint is made for it.
CHECKPOINT_MIN_TOKENS = 256


@dataclass(frozen=True)
class Reuse:
    """A prefix a cache can give a prompt, and the checkpoint it needs (None: as it is)."""

    tokens: int = 0
    checkpoint: Checkpoint | None = None


# Loading a saved sequence costs a copy; for a few tokens more than a slot offers, decoding
# them is cheaper.
RESTORE_MIN_GAIN = 16


class Placer:
    def __init__(
        self,
        ctx: LlamaContext,
        model: LlamaModel,
        settings: Settings,
        *,
        n_ctx: int,
        counters: collections.Counter[str],
    ) -> None:
        self.ctx = ctx
        self.counters = counters
        self.saved = HostPromptCache(settings.cache_ram * 1024 * 1024)
        # A sliding window shorter than the context drops old positions' KV in those layers,
        # unless swa_full keeps it all.
        self.window = 0 if settings.swa_full or model.n_swa >= n_ctx else model.n_swa

    def stats(self) -> dict[str, int]:
        return {
            "prompt_cache_entries": len(self.saved),
            "prompt_cache_bytes": self.saved.bytes,
            "prompt_cache_limit_bytes": self.saved.limit_bytes,
        }

    def plan_checkpoint(self, slot: Slot, reused: int) -> None:
        """Have a long prompt on a windowed model stop before its last token for a
        checkpoint, unless the reused prefix already covers that far."""
        last = len(slot.prompt) - 1
        if self.window > 0 and last >= CHECKPOINT_MIN_TOKENS and reused < last:
            slot.checkpoint_at = last

    def place(self, prompt: list[int], free: list[Slot], *, prefix_cache: bool) -> tuple[Slot, int]:
        """Choose a free slot for ``prompt`` and cut its cache to the prefix it can reuse;
        returns the slot and that prefix's length.

        The slot whose cache shares the longest usable prefix wins, if that is most of the
        prompt or of what the slot holds (a shared system prompt alone must not cost another
        conversation its cache), unless a sequence saved in host memory shares a longer one:
        that copy is then loaded into the least recently used free slot. Otherwise the least
        recently used slot is taken, so recent conversations stay longest. A cache about to
        be overwritten is saved first.
        """
        # At least the last prompt token is decoded again, for the logits to sample from.
        limit = len(prompt) - 1
        target: Slot | None = None
        reuse = Reuse()
        if prefix_cache:
            for slot in free:
                found = self._slot_reuse(slot, prompt, limit)
                if found.tokens > reuse.tokens and found.tokens * 2 >= min(
                    len(slot.cached), len(prompt)
                ):
                    target, reuse = slot, found
        restore: SavedSequence | None = None
        if prefix_cache and self.saved.enabled:
            entry = self.saved.best(prompt)
            if entry is not None:
                found = self._reusable(
                    entry.tokens, entry.checkpoints, entry.first_position, prompt, limit
                )
                if found.tokens > reuse.tokens + RESTORE_MIN_GAIN:
                    restore, reuse, target = entry, found, None
        if target is None:
            target = min(free, key=lambda s: s.last_used)
            if restore is None and prefix_cache:
                reuse = self._slot_reuse(target, prompt, limit)
        self._save_before_overwrite(target, keep=0 if restore is not None else reuse.tokens)
        if restore is not None:
            if self._restore(target, self.saved.take(restore)):
                self.counters["prompt_cache_restores"] += 1
                self.counters["prompt_cache_tokens_restored"] += reuse.tokens
            else:
                reuse = Reuse()
        if reuse.checkpoint is not None and not self.ctx.restore_sequence(
            target.seq_id, reuse.checkpoint.state, window_only=True
        ):  # pragma: no cover - the checkpoint's cells replace the sequence's own
            log.warning("a context checkpoint could not be loaded; decoding the prompt again")
            reuse = Reuse()
        if reuse.checkpoint is not None:
            self.counters["checkpoint_restores"] += 1
        return target, target.keep_prefix(self.ctx, reuse.tokens)

    def _restore(self, slot: Slot, saved: SavedSequence) -> bool:
        if not self.ctx.restore_sequence(slot.seq_id, saved.state):  # pragma: no cover
            log.warning("a saved prompt could not be restored; decoding it again")
            self.ctx.forget(slot.seq_id, 0)
            slot.cached.clear()
            slot.checkpoints.clear()
            return False
        slot.cached = list(saved.tokens)
        slot.checkpoints = list(saved.checkpoints)
        return True

    def _slot_reuse(self, slot: Slot, prompt: list[int], limit: int) -> Reuse:
        if not slot.cached:
            return Reuse()
        first = self.ctx.first_position(slot.seq_id)
        return self._reusable(slot.cached, slot.checkpoints, first, prompt, limit)

    def _reusable(
        self,
        cached: list[int],
        checkpoints: list[Checkpoint],
        first_position: int,
        prompt: list[int],
        limit: int,
    ) -> Reuse:
        """How much of a cache whose oldest position is ``first_position`` ``prompt`` can
        reuse. With a sliding window the positions before a cut must still hold the window's
        KV; where they do not, the latest checkpoint before the cut serves."""
        common = min(common_prefix(cached, prompt), limit)
        if common < MIN_REUSED_TOKENS:
            return Reuse()
        if self.window == 0 or first_position <= max(0, common - self.window):
            return Reuse(common)
        checkpoint = next((c for c in reversed(checkpoints) if c.n_tokens <= common), None)
        if checkpoint is None:
            return Reuse()
        return Reuse(checkpoint.n_tokens, checkpoint)

    def _save_before_overwrite(self, slot: Slot, *, keep: int) -> None:
        """Copy the slot's sequence to host memory when the request it is about to serve
        throws most of it away."""
        lost = len(slot.cached) - keep
        if lost < max(MIN_SAVED_TOKENS, len(slot.cached) // 2):
            return
        if not self.saved.worth_saving(slot.cached):
            return
        try:
            state = self.ctx.save_sequence(slot.seq_id)
        except ShimmyError as exc:  # pragma: no cover - llama.cpp refused to copy
            log.warning("could not save a prompt to the host cache: %s", exc)
            return
        first = self.ctx.first_position(slot.seq_id)
        saved = SavedSequence(list(slot.cached), state, first, list(slot.checkpoints))
        if self.saved.put(saved):
            self.counters["prompt_cache_saves"] += 1

    def take_checkpoint(self, slot: Slot) -> None:
        """Save the window layers' KV now that the prompt is decoded but for its last token:
        a next request that shares the prompt but not the answer (regenerate, an edited
        reply) then starts from here even after the window has moved on."""
        slot.checkpoint_at = -1
        try:
            state = self.ctx.save_sequence(slot.seq_id, window_only=True)
        except ShimmyError as exc:  # pragma: no cover - llama.cpp refused to copy
            log.warning("could not save a context checkpoint: %s", exc)
            return
        slot.add_checkpoint(Checkpoint(len(slot.cached), state))
        self.counters["checkpoints_saved"] += 1

"""Speculative decoding's two ends in the scheduler's step: which drafts a step carries, and
the next draft of a sequence (the drafts themselves come from ngram.py).

Only the worker thread uses it.
"""

from __future__ import annotations

from shimmy.engine.llama import Batch
from shimmy.engine.ngram import MIN_DRAFT, NgramDrafter
from shimmy.engine.slots import Slot
from shimmy.settings import Settings

# Drafts only while this few sequences decode together. Measured on Gemma 3 270M Q4_K_M, 2
# cores, greedy stories of 128 tokens (tok/s without drafts / with): 2 clients 77 / 100,
# 4 clients 108 / 131, 16 clients on 8 slots 152 / 123 when all 8 may draft. With many
# sequences a step is bound by arithmetic, and a draft token costs what a sequence's own next
# token does while being right only some of the time.
MAX_DRAFTING_SEQUENCES = 4


def add_drafts(batch: Batch, active: list[Slot], draft_max: int) -> None:
    """Put the slots' drafts after their next tokens, within the step's draft budget.

    A draft pays by sharing a step's fixed cost among more tokens. With more than
    ``MAX_DRAFTING_SEQUENCES`` decoding, nobody drafts; otherwise drafts fill the step up to
    ``draft_max`` + 1 tokens, so a lone sequence drafts in full.
    """
    budget = draft_max + 1
    if sum(1 for slot in active if slot.batch_index >= 0) > MAX_DRAFTING_SEQUENCES:
        for slot in active:
            slot.draft = []
        return
    for slot in active:
        draft, slot.draft = slot.draft, []
        room = min(budget - batch.size, batch.room)
        if not draft or slot.batch_index < 0 or room < MIN_DRAFT:
            continue
        slot.draft = draft[:room]
        # Each draft token with logits: those after draft token i tell whether token i + 1
        # is right.
        pos = len(slot.cached)
        slot.draft_index = batch.size
        for offset, token in enumerate(slot.draft):
            batch.add(token, pos + offset, slot.seq_id, True)


def propose_draft(slot: Slot, settings: Settings, *, rewindable: bool, n_ctx: int) -> None:
    """Guess what follows the slot's next token, for the next step to verify."""
    assert slot.job is not None and slot.next_token is not None
    wanted = slot.job.request.speculative
    if not (settings.speculative if wanted is None else wanted) or not rewindable:
        return
    if slot.drafter is None:
        slot.drafter = NgramDrafter(max_draft=settings.draft_max)
    # The drafter has seen everything up to the previous next token; since then the accepted
    # draft tokens and this next token came.
    slot.drafter.extend(slot.cached[slot.drafter.size :])
    slot.drafter.extend([slot.next_token])
    # Never past max_tokens or the context: the next token itself takes one place.
    room = min(slot.max_new - slot.generated - 1, n_ctx - len(slot.cached) - 2)
    if room > 0:
        slot.draft = slot.drafter.draft(room)

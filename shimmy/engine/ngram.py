"""Prompt-lookup drafts for speculative decoding, without a draft model.

Text that repeats what came before (code being edited or quoted, a document rewritten, a
list continued) can be predicted from the sequence itself: when its last few tokens occurred
earlier, the tokens that followed them then are a likely continuation now. The scheduler
decodes such a draft in the same step as the sequence's next token and keeps the drafted
tokens the model itself samples, so a good draft yields several tokens per step and output is
exactly what decoding one token at a time gives.

A draft that misses costs the decoding of its tokens. On a CPU a batch of a few tokens costs
several single steps (measured with Gemma 3 270M Q4_K_M on 2 cores: 1 token 12 ms, 2 tokens
27 ms, 4 tokens 39 ms, 8 tokens 45 ms, 16 tokens 62 ms: past one token the quantized matrix
kernels change), so a short draft can never pay for itself and a long one pays once about a
third of it is accepted. Drafts are therefore long or absent: a match must span several
tokens, a draft is at least ``MIN_DRAFT`` tokens, its length halves towards that after a
partial acceptance, and after a miss (fewer tokens accepted than pay for the draft) the
sequence stops drafting for a while, the pause growing fourfold with each miss in a row. Text
that does not repeat itself, or is sampled too freely to follow its own past, then almost
never drafts: a few missed drafts in a few hundred tokens.
"""

from __future__ import annotations

KEY_TOKENS = 4  # how many trailing tokens must match an earlier occurrence
MIN_DRAFT = 8
MIN_ACCEPTED = 3  # fewer accepted than this is a miss: the draft cost more than it gave
MAX_PAUSE_STEPS = 256


class NgramDrafter:
    """Finds drafts in one sequence's own tokens (its prompt and what it generated)."""

    def __init__(self, *, max_draft: int) -> None:
        self.max_draft = max(MIN_DRAFT, max_draft)
        self.limit = self.max_draft
        self._history: list[int] = []
        # n-gram -> index of the token that followed its latest occurrence
        self._follower: dict[tuple[int, ...], int] = {}
        self._misses = 0
        self._pause = 0

    @property
    def size(self) -> int:
        return len(self._history)

    def extend(self, tokens: list[int]) -> None:
        history, follower = self._history, self._follower
        for token in tokens:
            if len(history) >= KEY_TOKENS:
                follower[tuple(history[-KEY_TOKENS:])] = len(history)
            history.append(token)

    def draft(self, room: int) -> list[int]:
        """Tokens that may follow the history, at most ``room`` of them (none: no guess)."""
        if self._pause > 0:
            self._pause -= 1
            return []
        if room < MIN_DRAFT:
            return []
        history = self._history
        if len(history) <= KEY_TOKENS:
            return []
        start = self._follower.get(tuple(history[-KEY_TOKENS:]))
        if start is None:
            return []
        draft: list[int] = []
        for k in range(min(self.limit, room)):
            # Past the history's end the draft continues from itself: a repeating pattern.
            at = start + k
            draft.append(history[at] if at < len(history) else draft[at - len(history)])
        return draft

    def feedback(self, proposed: int, accepted: int) -> None:
        """How the last draft fared; sets the next draft's length."""
        if proposed == 0:
            return
        if accepted == proposed:
            self.limit = min(self.max_draft, self.limit * 2)
        else:
            self.limit = max(MIN_DRAFT, min(self.limit, accepted * 2))
        if accepted >= MIN_ACCEPTED:
            self._misses = 0
            return
        self._misses += 1
        self._pause = min(MAX_PAUSE_STEPS, 1 << (2 * self._misses)) - 1

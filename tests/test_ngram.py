"""The n-gram drafter on its own: what it proposes and how its draft length adapts."""

from __future__ import annotations

from shimmy.engine.ngram import FIRST_DRAFT, KEY_TOKENS, NgramDrafter


def test_a_repeated_ngram_proposes_what_followed_it_last_time() -> None:
    drafter = NgramDrafter(max_draft=16)
    drafter.extend([1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3])
    assert drafter.draft(room=100) == [4, 5, 6, 7][:FIRST_DRAFT]
    assert drafter.draft(room=2) == [4, 5]


def test_the_latest_occurrence_wins_and_unseen_text_proposes_nothing() -> None:
    drafter = NgramDrafter(max_draft=16)
    drafter.extend([1, 2, 3, 8, 8, 1, 2, 3, 9, 9, 1, 2, 3])
    assert drafter.draft(room=2) == [9, 9]
    fresh = NgramDrafter(max_draft=16)
    fresh.extend(list(range(20)))
    assert fresh.draft(room=10) == []
    assert NgramDrafter(max_draft=16).draft(room=10) == []
    short = NgramDrafter(max_draft=16)
    short.extend([1] * KEY_TOKENS)
    assert short.draft(room=10) == []


def test_whole_drafts_grow_the_next_and_misses_pause_drafting() -> None:
    drafter = NgramDrafter(max_draft=16)
    drafter.extend([5, 6, 7] * 20)
    assert len(drafter.draft(room=100)) == FIRST_DRAFT
    drafter.feedback(FIRST_DRAFT, FIRST_DRAFT)
    assert len(drafter.draft(room=100)) == 2 * FIRST_DRAFT
    drafter.feedback(2 * FIRST_DRAFT, 2 * FIRST_DRAFT)
    drafter.feedback(16, 16)
    assert len(drafter.draft(room=100)) == 16  # capped at max_draft
    drafter.feedback(16, 3)
    assert len(drafter.draft(room=100)) == 4  # what was accepted, plus one
    # Misses in a row: 0, then 1, then 3 steps without a draft.
    drafter.feedback(4, 0)
    assert drafter.draft(room=100) != []
    drafter.feedback(2, 0)
    assert drafter.draft(room=100) == []
    assert drafter.draft(room=100) != []
    drafter.feedback(2, 0)
    assert [drafter.draft(room=100) for _ in range(3)] == [[], [], []]
    assert drafter.draft(room=100) != []

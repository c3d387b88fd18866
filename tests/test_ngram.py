"""The n-gram drafter on its own: what it proposes and how its draft length adapts."""

from __future__ import annotations

from shimmy.engine.ngram import KEY_TOKENS, MIN_DRAFT, NgramDrafter


def test_a_repeated_ngram_proposes_what_followed_it_last_time() -> None:
    drafter = NgramDrafter(max_draft=8)
    drafter.extend([1, 2, 3, 4, *range(10, 20), 1, 2, 3, 4])
    assert drafter.draft(room=100) == list(range(10, 18))
    assert drafter.draft(room=MIN_DRAFT) == list(range(10, 10 + MIN_DRAFT))
    assert drafter.draft(room=MIN_DRAFT - 1) == []  # too short to pay for itself


def test_the_latest_occurrence_wins_and_unseen_text_proposes_nothing() -> None:
    drafter = NgramDrafter(max_draft=8)
    drafter.extend([1, 2, 3, 4, *[8] * 8, 1, 2, 3, 4, *[9] * 8, 1, 2, 3, 4])
    assert drafter.draft(room=8) == [9] * 8
    fresh = NgramDrafter(max_draft=8)
    fresh.extend(list(range(40)))
    assert fresh.draft(room=10) == []
    assert NgramDrafter(max_draft=8).draft(room=10) == []
    short = NgramDrafter(max_draft=8)
    short.extend([1] * KEY_TOKENS)
    assert short.draft(room=10) == []


def test_a_repeating_pattern_is_drafted_past_the_history_end() -> None:
    drafter = NgramDrafter(max_draft=12)
    drafter.extend([5, 6, 7, 5, 6, 7, 5])
    assert drafter.draft(room=100) == [6, 7, 5] * 4


def test_partial_drafts_shrink_the_next_and_misses_pause_drafting() -> None:
    drafter = NgramDrafter(max_draft=32)
    drafter.extend([5, 6, 7] * 30)
    assert len(drafter.draft(room=100)) == 32
    drafter.feedback(32, 6)
    assert len(drafter.draft(room=100)) == 12  # twice what was accepted
    drafter.feedback(12, 12)
    assert len(drafter.draft(room=100)) == 24  # taken whole: twice as long
    # A miss (too few accepted to pay for the draft): the shortest drafts, after a pause of
    # 3 steps; a second miss in a row pauses 15.
    drafter.feedback(24, 2)
    assert [drafter.draft(room=100) for _ in range(3)] == [[]] * 3
    assert len(drafter.draft(room=100)) == MIN_DRAFT
    drafter.feedback(MIN_DRAFT, 0)
    assert [drafter.draft(room=100) for _ in range(15)] == [[]] * 15
    assert len(drafter.draft(room=100)) == MIN_DRAFT
    # A draft that pays ends the run of misses.
    drafter.feedback(MIN_DRAFT, 4)
    assert drafter.draft(room=100) != []

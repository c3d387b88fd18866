"""Prefix reuse beyond the slots (sequences saved in host memory) and with sliding windows,
on the real llama.cpp with tiny F32 models: a reused or restored cache must give exactly the
tokens a fresh prefill gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tiny_gguf import write_tiny_gguf

from shimmy.engine.local import LocalEngine
from shimmy.engine.types import Finished, GenerationRequest, SamplingParams
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
Scored = tuple[str, float]
WINDOW = 16


def make_engine(path: Path, **overrides: object) -> LocalEngine:
    values: dict[str, object] = {
        "ctx_size": 1024,
        "parallel": 1,
        "threads": 2,
        "speculative": False,
    }
    values.update(overrides)
    return LocalEngine(ModelEntry(id=path.stem, path=path, source="test"), Settings(**values))


@pytest.fixture(scope="module")
def window_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Gemma 3 shaped model whose layers all attend to the last 16 positions only."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("swa") / "window.gguf", sliding_window=WINDOW, seed=77
    )


async def generate(
    engine: LocalEngine, prompt: str | list[int], max_tokens: int = 40
) -> tuple[str, Finished]:
    request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, sampling=GREEDY)
    return await engine.submit(request).collect()


async def scored(engine: LocalEngine, prompt: list[int] | str) -> tuple[list[Scored], Finished]:
    """A greedy generation's tokens with their logprobs."""
    request = GenerationRequest(prompt=prompt, max_tokens=30, sampling=GREEDY, logprobs=1)
    tokens: list[Scored] = []
    finished = None
    async for event in engine.submit(request):
        if isinstance(event, Finished):
            finished = event
        for item in getattr(event, "logprobs", None) or []:
            tokens.append((item.token, item.logprob))
    assert finished is not None
    return tokens, finished


async def same_as_fresh(
    engine: LocalEngine, fresh: LocalEngine, prompt: list[int] | str, *, exact: bool = False
) -> tuple[list[Scored], Finished]:
    """Generate on both: the same tokens. ``exact``: the same logprobs too, bit for bit, as
    when nothing was reused (a prompt decoded in other chunks than the reference's moves them
    by float rounding; a cache reused wrongly, by far more, even when the tokens agree)."""
    got, finished = await scored(engine, prompt)
    want, _ = await scored(fresh, prompt)
    assert [token for token, _ in got] == [token for token, _ in want]
    if exact:
        assert got == want
    return got, finished


async def answer_ids(engine: LocalEngine, prompt: str, max_tokens: int = 40) -> list[int]:
    """The generated tokens' ids: a next turn built from them shares the cache exactly (text
    of random bytes would tokenize differently)."""
    request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, sampling=GREEDY)
    ids: list[int] = []
    async for event in engine.submit(request):
        ids.extend(getattr(event, "tokens", None) or [])
    return ids


async def next_turn(
    engine: LocalEngine, history: str, answer: list[int], more: str
) -> tuple[list[int], int]:
    """The next turn's prompt, and how many of its tokens the previous turn decoded (all
    but the answer's last token, which was sampled and never decoded)."""
    before = [*await engine.tokenize(history), *answer]
    return [*before, *await engine.tokenize(more, add_special=False)], len(before) - 1


def conversation(n: int) -> str:
    return f"Conversation {n}: " + " ".join(f"line {n}-{i} of the history" for i in range(6))


@pytest.fixture
async def fresh(tiny_model_path: Path) -> AsyncIterator[LocalEngine]:
    """The reference: every prompt decoded from scratch."""
    engine = make_engine(tiny_model_path, prefix_cache=False, cache_ram=0)
    yield engine
    engine.close()


async def kept_in_slot(
    path: Path, first: list[int], turn2: list[int], decoded: int
) -> list[Scored]:
    """The next turn where conversation 1 never left its slot (two slots, two
    conversations): a restored copy must continue exactly as that one does."""
    engine = make_engine(path, parallel=2, cache_ram=0)
    try:
        assert await answer_ids(engine, conversation(1), max_tokens=len(first)) == first
        await generate(engine, conversation(2))
        tokens, finished = await scored(engine, turn2)
        assert finished.usage.cached_tokens == decoded
        return tokens
    finally:
        engine.close()


async def test_an_evicted_conversation_is_restored_from_host_memory(
    tiny_model_path: Path, fresh: LocalEngine
) -> None:
    engine = make_engine(tiny_model_path)  # one slot: every new conversation evicts the last
    try:
        first = await answer_ids(engine, conversation(1))
        await generate(engine, conversation(2))
        stats = engine.stats()
        assert stats["prompt_cache_saves"] == 1 and stats["prompt_cache_entries"] == 1
        assert 0 < stats["prompt_cache_bytes"] <= stats["prompt_cache_limit_bytes"]

        turn2, decoded = await next_turn(engine, conversation(1), first, " And then?")
        restored, finished = await same_as_fresh(engine, fresh, turn2)
        assert engine.stats()["prompt_cache_restores"] == 1
        # Everything decoded before: the history and the answer but its last token.
        assert finished.usage.cached_tokens == decoded
        assert restored == await kept_in_slot(tiny_model_path, first, turn2, decoded)
        # Loaded into the slot, the copy left host memory; conversation 2 was saved instead.
        assert engine.stats()["prompt_cache_saves"] == 2
        assert engine.stats()["prompt_cache_entries"] == 1
    finally:
        engine.close()


async def test_many_conversations_over_few_slots_each_resume_from_cache(
    tiny_model_path: Path, fresh: LocalEngine
) -> None:
    engine = make_engine(tiny_model_path, parallel=2)
    try:
        answers = {}
        for n in range(6):
            answers[n] = await answer_ids(engine, conversation(n))
        for n in range(6):
            turn2, decoded = await next_turn(engine, conversation(n), answers[n], " Go on.")
            _, finished = await same_as_fresh(engine, fresh, turn2)
            assert finished.usage.cached_tokens == decoded
        assert engine.stats()["prompt_cache_restores"] >= 4
    finally:
        engine.close()


async def test_the_host_cache_stays_within_its_limit(tiny_model_path: Path) -> None:
    engine = make_engine(tiny_model_path, cache_ram=1)
    try:
        for n in range(12):
            await generate(engine, conversation(n), max_tokens=200)
        stats = engine.stats()
        assert stats["prompt_cache_limit_bytes"] == 1 << 20
        assert 0 < stats["prompt_cache_bytes"] <= 1 << 20
        assert stats["prompt_cache_saves"] == 11
        assert stats["prompt_cache_entries"] < 11  # the oldest were dropped
    finally:
        engine.close()


async def test_cache_ram_zero_saves_nothing(tiny_model_path: Path) -> None:
    engine = make_engine(tiny_model_path, cache_ram=0)
    try:
        for n in range(3):
            await generate(engine, conversation(n))
        assert engine.stats().get("prompt_cache_saves", 0) == 0
        assert engine.stats()["prompt_cache_entries"] == 0
    finally:
        engine.close()


async def test_a_sliding_window_cache_is_reused_only_where_its_window_is_whole(
    window_model_path: Path,
) -> None:
    # The window layers keep about 256 cells per sequence here (the window plus a batch), so
    # a 600-token conversation has lost its oldest positions.
    small = {"batch_size": 64, "prefill_chunk": 64}
    engine = make_engine(window_model_path, **small)
    fresh = make_engine(window_model_path, prefix_cache=False, cache_ram=0, **small)
    try:
        assert engine.model.n_swa == WINDOW
        history = conversation(1) * 3
        first = await answer_ids(engine, history, max_tokens=80)
        # Continuing where the cache ends needs only the last window: reused.
        turn2, decoded = await next_turn(engine, history, first, " Next?")
        _, finished = await same_as_fresh(engine, fresh, turn2)
        assert finished.usage.cached_tokens == decoded
        # Cutting far back needs positions the window dropped: decoded again, not reused.
        early = history[:200] + " A different question?"
        _, finished = await same_as_fresh(engine, fresh, early, exact=True)
        assert finished.usage.cached_tokens == 0
    finally:
        engine.close()
        fresh.close()


async def test_a_sliding_window_sequence_restored_from_host_memory_matches(
    window_model_path: Path,
) -> None:
    engine = make_engine(window_model_path)
    fresh = make_engine(window_model_path, prefix_cache=False, cache_ram=0)
    try:
        first = await answer_ids(engine, conversation(1), max_tokens=300)
        await generate(engine, conversation(2))
        turn2, decoded = await next_turn(engine, conversation(1), first, " More.")
        restored, finished = await same_as_fresh(engine, fresh, turn2)
        assert engine.stats()["prompt_cache_restores"] == 1
        assert finished.usage.cached_tokens == decoded
        assert restored == await kept_in_slot(window_model_path, first, turn2, decoded)
    finally:
        engine.close()
        fresh.close()


async def test_health_and_metrics_show_the_prompt_cache(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": conversation(1), "max_tokens": 4}
    response = await asyncio.to_thread(client.post, "/api/generate", json=body)
    assert response.status_code == 200
    health = (await asyncio.to_thread(client.get, "/api/health")).json()
    assert health["prompt_cache"]["limit_bytes"] == 2048 << 20
    assert health["prompt_cache"]["entries"] == 0
    metrics = (await asyncio.to_thread(client.get, "/metrics")).text
    assert 'shimmy_prompt_cache_limit_bytes{model="tiny"}' in metrics
    assert "shimmy_prompt_cache_restores_total" in metrics


@pytest.mark.parametrize("evicted", [False, True], ids=["in-slot", "from-host-memory"])
async def test_a_checkpoint_lets_a_regenerated_answer_reuse_its_prompt(
    window_model_path: Path, evicted: bool
) -> None:
    # After a long answer the window layers hold only its end, so the prompt alone cannot be
    # cut back to; the checkpoint taken before the prompt's last token can.
    small = {"batch_size": 64, "prefill_chunk": 64}
    engine = make_engine(window_model_path, **small)
    try:
        prompt = await engine.tokenize(conversation(1) * 2)
        assert len(prompt) > 256
        first, cached = await scored_long(engine, prompt)
        assert cached == 0
        assert engine.stats()["checkpoints_saved"] == 1
        if evicted:
            await generate(engine, conversation(2))
            assert engine.stats()["prompt_cache_saves"] == 1
        again, cached = await scored_long(engine, prompt)
        assert cached == len(prompt) - 1
        stats = engine.stats()
        assert stats["checkpoint_restores"] == 1
        assert stats.get("prompt_cache_restores", 0) == (1 if evicted else 0)
        # The first answer also decoded the prompt's last token alone after the checkpoint:
        # the same tokens; the logprobs move only by float rounding (the restored cells sit
        # in another order), where decoding without the window's KV moves them by far more.
        assert [token for token, _ in again] == [token for token, _ in first]
        assert [lp for _, lp in again] == pytest.approx([lp for _, lp in first], abs=1e-3)
    finally:
        engine.close()


async def scored_long(engine: LocalEngine, prompt: list[int]) -> tuple[list[Scored], int]:
    request = GenerationRequest(prompt=prompt, max_tokens=300, sampling=GREEDY, logprobs=1)
    tokens: list[Scored] = []
    cached = -1
    async for event in engine.submit(request):
        if isinstance(event, Finished):
            cached = event.usage.cached_tokens
        for item in getattr(event, "logprobs", None) or []:
            tokens.append((item.token, item.logprob))
    return tokens, cached

"""Several answers to one prompt (OpenAI's ``n``, ``best_of``) decode the prompt once: the
first request's KV is copied into the others' sequences (``llama_memory_seq_cp``), and each
samples its first token from the same logits. On the tiny F32 model every answer must equal
that request run alone, bit for bit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_gguf

from shimmy.engine.local import LocalEngine
from shimmy.engine.types import Finished, GenerationRequest, SamplingParams
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

PROMPT = "the quick brown fox jumps over the lazy dog " * 4


def seeded(seed: int, max_tokens: int = 24) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, seed=seed)
    return GenerationRequest(prompt=PROMPT, max_tokens=max_tokens, sampling=sampling)


@pytest.fixture(scope="module")
def window_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sliding-window model: its KV is two caches, both copied."""
    return write_tiny_gguf(tmp_path_factory.mktemp("forks") / "w.gguf", sliding_window=16)


@pytest.fixture(params=["full", "window"])
async def engine(
    request: pytest.FixtureRequest, tiny_model_path: Path, window_model: Path
) -> AsyncIterator[LocalEngine]:
    path = tiny_model_path if request.param == "full" else window_model
    settings = Settings(ctx_size=512, parallel=3, threads=2, speculative=False)
    engine = LocalEngine(ModelEntry(id="tiny", path=path, source="test"), settings)
    yield engine
    engine.close()


async def alone(engine: LocalEngine, request: GenerationRequest) -> str:
    text, _ = await engine.submit(request).collect()
    return text


async def together(engine: LocalEngine, requests: list[GenerationRequest]) -> list[Finished]:
    streams = engine.submit_many(requests)
    results = await asyncio.gather(*(s.collect() for s in streams))
    return [finished for _, finished in results]


async def test_answers_to_one_prompt_share_its_decoding(engine: LocalEngine) -> None:
    requests = [seeded(seed) for seed in (1, 2, 3)]
    expected = [await alone(engine, r) for r in requests]
    assert len(set(expected)) == 3  # different seeds: the answers tell each other apart
    before = engine.stats()
    streams = engine.submit_many(requests)
    results = await asyncio.gather(*(s.collect() for s in streams))
    assert [text for text, _ in results] == expected
    after = engine.stats()
    assert after["prompt_forks"] - before.get("prompt_forks", 0) == 2
    prompt_tokens = results[0][1].usage.prompt_tokens
    # The copies decoded none of the prompt.
    assert [f.usage.cached_tokens for _, f in results[1:]] == [prompt_tokens] * 2


async def test_more_answers_than_slots_still_all_come(engine: LocalEngine) -> None:
    requests = [seeded(seed, max_tokens=8) for seed in range(10, 15)]
    expected = [await alone(engine, r) for r in requests]
    streams = engine.submit_many(requests)
    results = await asyncio.gather(*(s.collect() for s in streams))
    assert [text for text, _ in results] == expected


async def test_forks_outlive_their_source(engine: LocalEngine) -> None:
    requests = [seeded(seed) for seed in (4, 5, 6)]
    expected = [await alone(engine, r) for r in requests]
    streams = engine.submit_many(requests)
    # Whether the first is cancelled while queued, while its prompt is read or later, the
    # others must answer as if it had never been there.
    streams[0].cancel()
    results = await asyncio.gather(*(s.collect() for s in streams[1:]))
    assert [text for text, _ in results] == expected[1:]
    _, first = await streams[0].collect()
    assert first.finish_reason in ("cancelled", "length")


async def test_different_lengths_and_scoring_are_not_confused(engine: LocalEngine) -> None:
    short, long = seeded(7, max_tokens=3), seeded(8, max_tokens=20)
    scoring = GenerationRequest(
        prompt=PROMPT, max_tokens=2, sampling=SamplingParams(temperature=0.0), prompt_logprobs=1
    )
    finished = await together(engine, [short, long, scoring])
    assert [f.usage.completion_tokens for f in finished[:2]] == [3, 20]
    # A request scoring the prompt decodes it itself, with every position's logits.
    assert finished[2].prompt_tokens is not None
    assert len(finished[2].prompt_tokens) == finished[2].usage.prompt_tokens

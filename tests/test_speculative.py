"""N-gram speculative decoding on the real llama.cpp with the tiny F32 model.

The tiny model's greedy output falls into a cycle within a few dozen tokens, so drafts from the
sequence's own n-grams are proposed and mostly accepted; its F32 kernels are batch-invariant,
so decoding a token together with a draft gives the same logits as decoding it alone, and
every output must be identical with speculation on and off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shimmy.engine.local import LocalEngine
from shimmy.engine.types import Finished, GenerationRequest, SamplingParams
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
PROMPTS = ("hello", "abcabcabcabcabc", "the cat the cat the cat", "0123456789 0123456789")


def make_engine(path: Path, **overrides: object) -> LocalEngine:
    values: dict[str, object] = {"ctx_size": 512, "parallel": 4, "threads": 2}
    values.update(overrides)
    return LocalEngine(ModelEntry(id="tiny", path=path, source="test"), Settings(**values))


@pytest.fixture
async def engines(tiny_model_path: Path) -> AsyncIterator[tuple[LocalEngine, LocalEngine]]:
    plain = make_engine(tiny_model_path, speculative=False)
    drafting = make_engine(tiny_model_path, speculative=True)
    yield plain, drafting
    plain.close()
    drafting.close()


async def generate_all(
    engine: LocalEngine, requests: list[GenerationRequest]
) -> list[tuple[str, Finished]]:
    """All requests at once, so they are decoded in the same batches."""
    streams = engine.submit_many(requests)
    return list(await asyncio.gather(*(stream.collect() for stream in streams)))


def drafted(engine: LocalEngine) -> tuple[int, int]:
    stats = engine.stats()
    return stats.get("draft_tokens", 0), stats.get("draft_tokens_accepted", 0)


async def test_greedy_output_is_identical_with_and_without_speculation(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    requests = [GenerationRequest(prompt=p, max_tokens=200, sampling=GREEDY) for p in PROMPTS]
    expected = await generate_all(plain, requests)
    got = await generate_all(drafting, requests)
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, want), (_, have) in zip(expected, got, strict=True):
        assert have.finish_reason == want.finish_reason
        assert have.usage.completion_tokens == want.usage.completion_tokens == 200
    proposed, accepted = drafted(drafting)
    assert accepted > 100 and proposed >= accepted
    assert drafted(plain) == (0, 0)
    # Accepted drafts are tokens that took no step of their own.
    steps = drafting.stats()["decode_steps"]
    assert steps < plain.stats()["decode_steps"] / 2


async def test_seeded_sampling_is_identical_with_and_without_speculation(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    sampling = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=11)
    requests = [GenerationRequest(prompt=p, max_tokens=150, sampling=sampling) for p in PROMPTS]
    expected = await generate_all(plain, requests)
    got = await generate_all(drafting, requests)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert drafted(drafting)[1] > 0


async def test_logprobs_and_penalties_are_identical_with_speculation(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    sampling = SamplingParams(temperature=0.0, repetition_penalty=1.1, penalty_last_n=16)
    request = GenerationRequest(prompt="abcabcabc", max_tokens=120, sampling=sampling, logprobs=2)

    async def logprobs(engine: LocalEngine) -> list[tuple[str, float, dict[str, float]]]:
        out = []
        async for event in engine.submit(request):
            for item in getattr(event, "logprobs", None) or []:
                out.append((item.token, item.logprob, item.top))
        return out

    got, want = await logprobs(drafting), await logprobs(plain)
    assert [token for token, _, _ in got] == [token for token, _, _ in want]
    # A token decoded with a draft after it goes through other matrix shapes than one decoded
    # alone: the same choices, logits equal to float32 rounding.
    for (_, have, have_top), (_, expect, expect_top) in zip(got, want, strict=True):
        assert have == pytest.approx(expect, abs=1e-5)
        assert have_top.keys() == expect_top.keys()


async def test_stop_strings_and_max_tokens_cut_inside_an_accepted_draft(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    text, _ = (
        await generate_all(
            plain, [GenerationRequest(prompt="hello", max_tokens=200, sampling=GREEDY)]
        )
    )[0]
    # A stop string from deep inside the cycle, where drafts are being accepted.
    stop = text[150:154]
    for max_tokens in (57, 130):
        request = GenerationRequest(prompt="hello", max_tokens=max_tokens, sampling=GREEDY)
        (want,) = await generate_all(plain, [request])
        (got,) = await generate_all(drafting, [request])
        assert got[0] == want[0]
        assert got[1].usage.completion_tokens == max_tokens
    request = GenerationRequest(prompt="hello", max_tokens=200, sampling=GREEDY, stop=[stop])
    (want,) = await generate_all(plain, [request])
    (got,) = await generate_all(drafting, [request])
    assert got[0] == want[0] and got[1].finish_reason == want[1].finish_reason == "stop"
    # The slot's cache holds exactly what was decoded: the next turn reuses it and continues
    # as a fresh engine would.
    follow = GenerationRequest(prompt="hello" + got[0], max_tokens=40, sampling=GREEDY)
    (again,) = await generate_all(drafting, [follow])
    (fresh,) = await generate_all(plain, [follow])
    assert again[0] == fresh[0]


async def test_a_request_can_turn_speculation_off_or_on(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    off = GenerationRequest(prompt="hello", max_tokens=120, sampling=GREEDY, speculative=False)
    await generate_all(drafting, [off])
    assert drafted(drafting) == (0, 0)
    on = GenerationRequest(prompt="hello", max_tokens=120, sampling=GREEDY, speculative=True)
    await generate_all(plain, [on])
    assert drafted(plain)[1] > 0


async def test_grammar_constrained_output_is_identical_with_speculation(
    engines: tuple[LocalEngine, LocalEngine],
) -> None:
    plain, drafting = engines
    grammar = 'root ::= ("ab" | "cd" | " ")+'
    sampling = SamplingParams(temperature=0.0, repetition_penalty=1.0, grammar=grammar)
    request = GenerationRequest(prompt="ab cd ab cd", max_tokens=80, sampling=sampling)
    (want,) = await generate_all(plain, [request])
    (got,) = await generate_all(drafting, [request])
    assert got[0] == want[0]
    assert set(got[0]) <= set("abcd ")

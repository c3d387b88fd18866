"""The scheduler on the real llama.cpp with the tiny random model, without HTTP."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from shimmy.engine.local import LocalEngine
from shimmy.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta
from shimmy.errors import ContextLengthExceeded, InvalidRequest, ServerBusy
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


def make_engine(path: Path, **overrides: object) -> LocalEngine:
    values: dict[str, object] = {"ctx_size": 512, "parallel": 4, "threads": 2}
    values.update(overrides)
    return LocalEngine(ModelEntry(id="tiny", path=path, source="test"), Settings(**values))


@pytest.fixture
async def engine(tiny_model_path: Path) -> AsyncIterator[LocalEngine]:
    eng = make_engine(tiny_model_path)
    yield eng
    eng.close()


async def run(eng: LocalEngine, prompt: str | list[int], **kwargs: object) -> tuple[str, Finished]:
    return await eng.submit(GenerationRequest(prompt=prompt, **kwargs)).collect()  # type: ignore[arg-type]


async def test_greedy_is_deterministic_and_length_is_honest(engine: LocalEngine) -> None:
    first = await run(engine, "hello", max_tokens=40, sampling=GREEDY)
    second = await run(engine, "hello", max_tokens=40, sampling=GREEDY)
    assert first[0] == second[0]
    assert first[1].finish_reason == "length"
    assert first[1].usage.completion_tokens == 40
    assert first[1].usage.prompt_tokens == len(await engine.tokenize("hello"))


async def test_same_seed_same_text_and_different_seed_differs(engine: LocalEngine) -> None:
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=seed)

    a = await run(engine, "x", max_tokens=60, sampling=seeded(7))
    b = await run(engine, "x", max_tokens=60, sampling=seeded(7))
    c = await run(engine, "x", max_tokens=60, sampling=seeded(8))
    assert a[0] == b[0]
    assert a[0] != c[0]


async def test_streamed_pieces_are_whole_text_and_join_to_the_result(engine: LocalEngine) -> None:
    sampling = SamplingParams(temperature=1.0, seed=3)
    stream = engine.submit(GenerationRequest(prompt="abc", max_tokens=200, sampling=sampling))
    pieces = []
    async for event in stream:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
    whole, _ = await run(engine, "abc", max_tokens=200, sampling=sampling)
    assert "".join(pieces) == whole
    # The random byte model splits multi-byte characters all the time; none may leak broken.
    assert any(ord(ch) > 127 for ch in whole)
    for piece in pieces:
        piece.encode("utf-8")


async def test_stop_string_spanning_tokens_cuts_before_it(engine: LocalEngine) -> None:
    text, _ = await run(engine, "stop test", max_tokens=80, sampling=GREEDY)
    tokens = await engine.tokenize(text, add_special=False)
    assert len(tokens) > 20
    stop = text[len(text) // 2 : len(text) // 2 + 5]
    cut, finished = await run(engine, "stop test", max_tokens=80, sampling=GREEDY, stop=[stop])
    assert cut == text[: text.index(stop)]
    assert finished.finish_reason == "stop"


async def test_prompt_longer_than_context_is_refused(engine: LocalEngine) -> None:
    with pytest.raises(ContextLengthExceeded):
        await run(engine, "z" * 2000, max_tokens=5)


async def test_max_tokens_is_clamped_to_the_context(engine: LocalEngine) -> None:
    prompt = "q" * 500
    n_prompt = len(await engine.tokenize(prompt))
    _, finished = await run(engine, prompt, max_tokens=10_000, sampling=GREEDY)
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == engine.n_ctx - n_prompt


async def test_token_ids_outside_the_vocabulary_are_refused(engine: LocalEngine) -> None:
    with pytest.raises(InvalidRequest):
        await run(engine, [1, 2, 10_000_000], max_tokens=3)


async def test_concurrent_streams_get_exactly_their_solo_answers(engine: LocalEngine) -> None:
    """No cross-talk: every sequence of a shared batch produces what it produces alone.

    The tiny model is F32, whose CPU kernels give bit-identical rows whatever the batch size,
    so equality here is exact; any mix-up of positions, sequence ids, logits rows or sampler
    state between slots would show as a difference.
    """
    prompts = [f"prompt number {i} " * (i + 1) for i in range(8)]
    params = [SamplingParams(temperature=0.9, seed=100 + i) for i in range(8)]
    solo = [
        await run(engine, p, max_tokens=48, sampling=s)
        for p, s in zip(prompts, params, strict=True)
    ]
    together = await asyncio.gather(
        *(run(engine, p, max_tokens=48, sampling=s) for p, s in zip(prompts, params, strict=True))
    )
    assert [t[0] for t in together] == [s[0] for s in solo]
    assert len({t[0] for t in together}) == 8


async def test_cancel_frees_the_slot(engine: LocalEngine) -> None:
    stream = engine.submit(GenerationRequest(prompt="c", max_tokens=100_000, sampling=GREEDY))
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    stream.cancel()
    events = [event async for event in stream]
    assert isinstance(events[-1], Finished)
    assert events[-1].finish_reason == "cancelled"
    assert engine.stats()["busy"] == 0


async def test_cancel_while_waiting_in_the_queue(tiny_model_path: Path) -> None:
    eng = make_engine(tiny_model_path, parallel=1, max_queue=4)
    try:
        running = eng.submit(GenerationRequest(prompt="a", max_tokens=100_000))
        waiting = eng.submit(GenerationRequest(prompt="b", max_tokens=5))
        waiting.cancel()
        events = [event async for event in waiting]
        assert [type(e) for e in events] == [Finished]
        running.cancel()
        assert (await running.collect())[1].finish_reason == "cancelled"
    finally:
        eng.close()


async def test_queue_overflow_is_refused_with_retry_after(tiny_model_path: Path) -> None:
    eng = make_engine(tiny_model_path, parallel=1, max_queue=1)
    try:
        first = eng.submit(GenerationRequest(prompt="a", max_tokens=100_000))
        second = eng.submit(GenerationRequest(prompt="b", max_tokens=100_000))
        with pytest.raises(ServerBusy) as refused:
            eng.submit(GenerationRequest(prompt="c", max_tokens=1))
        assert refused.value.retry_after is not None and refused.value.retry_after >= 1
        first.cancel()
        second.cancel()
        await first.collect()
        await second.collect()
    finally:
        eng.close()


async def test_prefix_of_previous_request_is_reused(engine: LocalEngine) -> None:
    turn1 = "system: be brief. user: hi " * 10
    _, first = await run(engine, turn1, max_tokens=4, sampling=GREEDY)
    assert first.usage.cached_tokens == 0
    _, second = await run(engine, turn1 + " user: and more", max_tokens=4, sampling=GREEDY)
    n_turn1 = len(await engine.tokenize(turn1))
    assert second.usage.cached_tokens >= n_turn1 - 1
    assert engine.stats()["prefix_hits"] >= 1


async def test_prefix_cache_can_be_turned_off(tiny_model_path: Path) -> None:
    eng = make_engine(tiny_model_path, prefix_cache=False)
    try:
        await run(eng, "same prompt " * 5, max_tokens=2)
        _, again = await run(eng, "same prompt " * 5, max_tokens=2)
        assert again.usage.cached_tokens == 0
    finally:
        eng.close()


async def test_reused_prefix_gives_the_same_greedy_text(engine: LocalEngine) -> None:
    prompt = "a shared system prompt " * 8
    fresh_engine_text, _ = await run(engine, prompt, max_tokens=30, sampling=GREEDY)
    cached_text, finished = await run(engine, prompt, max_tokens=30, sampling=GREEDY)
    assert finished.usage.cached_tokens > 0
    assert cached_text == fresh_engine_text


async def test_long_prompt_does_not_freeze_a_running_stream(tiny_model_path: Path) -> None:
    """Prefill is chunked: while a long prompt is processed, the running stream keeps getting
    one token per step."""
    eng = make_engine(tiny_model_path, ctx_size=2048, prefill_chunk=32)
    try:
        running = eng.submit(GenerationRequest(prompt="r", max_tokens=400, sampling=GREEDY))
        await anext(running)
        long_prompt = list(range(1, 256)) * 4  # 1020 tokens = 32 chunks
        late = eng.submit(GenerationRequest(prompt=long_prompt, max_tokens=1, sampling=GREEDY))
        counts = {"running": 0}

        async def drain_running() -> None:
            async for event in running:
                if isinstance(event, TextDelta):
                    counts["running"] += 1

        drain = asyncio.create_task(drain_running())
        _, late_finished = await late.collect()
        tokens_meanwhile = counts["running"]
        await drain
        assert late_finished.usage.prompt_tokens == 1020
        # one running token per prefill step: at least ~all 32 chunks' worth
        assert tokens_meanwhile >= 16
    finally:
        eng.close()


async def test_grammar_constrains_the_output(engine: LocalEngine) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    for seed in range(5):
        text, finished = await run(
            engine, "answer", max_tokens=20, sampling=SamplingParams(seed=seed, grammar=grammar)
        )
        assert text in {"yes.", "no."}
        assert finished.finish_reason == "stop"


async def test_bad_grammar_is_an_invalid_request(engine: LocalEngine) -> None:
    with pytest.raises(InvalidRequest):
        await run(engine, "x", max_tokens=2, sampling=SamplingParams(grammar="root ::= ("))


async def test_logprobs_are_reported_per_token(engine: LocalEngine) -> None:
    stream = engine.submit(GenerationRequest(prompt="lp", max_tokens=5, logprobs=3))
    entries = []
    async for event in stream:
        if isinstance(event, TextDelta) and event.logprobs:
            entries.extend(event.logprobs)
    assert len(entries) == 5
    for entry in entries:
        assert entry.logprob <= 0.0
        assert 1 <= len(entry.top) <= 3


async def test_embeddings_are_normalized_vectors(engine: LocalEngine) -> None:
    result = await engine.embed(["hello", "a longer sentence here"])
    assert len(result.vectors) == 2
    assert all(len(v) == 64 for v in result.vectors)
    for vector in result.vectors:
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
    assert result.vectors[0] != result.vectors[1]
    assert result.prompt_tokens == sum(
        [len(await engine.tokenize(t)) for t in ["hello", "a longer sentence here"]]
    )


async def test_generation_still_works_after_embeddings(engine: LocalEngine) -> None:
    await engine.embed(["warm"])
    text, finished = await run(engine, "after", max_tokens=5)
    assert finished.usage.completion_tokens == 5 or finished.finish_reason == "stop"
    assert isinstance(text, str)


async def test_lora_adapter_changes_the_output_and_scale_zero_does_not(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    from tiny_gguf import write_tiny_lora

    from shimmy.models.config import ModelOptions

    adapter = write_tiny_lora(tmp_path / "style.gguf")
    entry = ModelEntry(id="tiny", path=tiny_model_path, source="test")
    settings = Settings(ctx_size=512, parallel=2, threads=2)
    texts = {}
    for label, options in {
        "base": ModelOptions(),
        "lora": ModelOptions(lora=adapter, lora_scale=1.0),
        "off": ModelOptions(lora=adapter, lora_scale=0.0),
    }.items():
        eng = LocalEngine(entry, settings, options)
        try:
            texts[label], _ = await run(eng, "adapt", max_tokens=30, sampling=GREEDY)
        finally:
            eng.close()
    assert texts["lora"] != texts["base"]
    assert texts["off"] == texts["base"]


def test_an_adapter_that_does_not_fit_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    from shimmy.errors import ModelUnusable
    from shimmy.models.config import ModelOptions

    not_an_adapter = tmp_path / "junk.gguf"
    not_an_adapter.write_bytes(b"GGUF" + b"\0" * 64)
    entry = ModelEntry(id="tiny", path=tiny_model_path, source="test")
    with pytest.raises(ModelUnusable):
        LocalEngine(entry, Settings(ctx_size=256, parallel=1), ModelOptions(lora=not_an_adapter))


@pytest.mark.starter
@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.9, seed=11, repetition_penalty=1.3, frequency_penalty=0.5),
    ],
)
async def test_a_grammar_that_allows_the_text_leaves_it_unchanged(
    starter_model_path: Path, sampling: SamplingParams
) -> None:
    # Tokens are sampled freely first and only checked against the grammar: when every
    # sampled token passes, the constrained text (penalties, random state and all) is
    # exactly the unconstrained one. (The starter model writes real text; the tiny one's
    # random bytes are not always whole characters a grammar could spell.)
    # No prefix cache: quantized kernels give slightly different logits for a prompt decoded
    # whole or resumed from cache, and the two runs must see the very same logits.
    engine = make_engine(starter_model_path, parallel=1, prefix_cache=False)
    try:
        plain, _ = await run(engine, "The sea is", max_tokens=40, sampling=sampling)
        grammar = "root ::= " + " ".join(f'"\\U{ord(character):08X}"' for character in plain)
        constrained = replace(sampling, grammar=grammar)
        text, finished = await run(engine, "The sea is", max_tokens=40, sampling=constrained)
    finally:
        engine.close()
    assert text == plain
    assert finished.usage.completion_tokens == 40


async def test_a_grammar_steers_a_model_that_would_write_something_else(
    engine: LocalEngine,
) -> None:
    plain, _ = await run(engine, "hello", max_tokens=8, sampling=GREEDY)
    grammar = 'root ::= "0" [0-9]* "!"'
    text, _ = await run(engine, "hello", max_tokens=8, sampling=replace(GREEDY, grammar=grammar))
    assert re.fullmatch(r"0[0-9]*!?", text), text
    assert text != plain

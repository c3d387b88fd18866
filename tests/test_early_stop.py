"""Code completion's early ends (max lines, indentation, time budget), named sampler chains and
prompt-only requests: the text rules alone, then through the real scheduler, where a grammar
makes the random tiny model write exactly the text a rule is about."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shimmy.engine.chain import sampler_chain
from shimmy.engine.local import LocalEngine
from shimmy.engine.textstream import TextAssembler
from shimmy.engine.types import EarlyStop, GenerationRequest, SamplingParams
from shimmy.errors import InvalidRequest
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings


def assemble(pieces: list[str], rules: EarlyStop, stop: list[str] | None = None) -> TextAssembler:
    assembler = TextAssembler(stop, rules)
    assembler.text = "".join(assembler.feed(p.encode()) for p in pieces)  # type: ignore[attr-defined]
    if not assembler.stopped:
        assembler.text += assembler.finish()  # type: ignore[attr-defined]
    return assembler


def text_of(pieces: list[str], rules: EarlyStop) -> tuple[str, str | None]:
    assembler = assemble(pieces, rules)
    return assembler.text, assembler.cause  # type: ignore[attr-defined]


def test_max_lines_ends_before_the_newline_that_would_start_one_more() -> None:
    assert text_of(["a = 1", "\nb", " = 2\n", "c"], EarlyStop(max_lines=1)) == (
        "a = 1",
        "max_lines",
    )
    assert text_of(["a\nb\nc\nd"], EarlyStop(max_lines=2)) == ("a\nb", "max_lines")
    assert text_of(["a\nb"], EarlyStop(max_lines=2)) == ("a\nb", None)


def test_a_line_indented_less_than_min_indent_ends_the_completion() -> None:
    pieces = ["x = f(\n", "    1,\n", "    ", "2,\n", ")\n", "y = 3"]
    assert text_of(pieces, EarlyStop(min_indent=4)) == ("x = f(\n    1,\n    2,", "min_indent")


def test_blank_lines_are_held_and_dropped_with_the_line_after_them() -> None:
    kept = text_of(["if a:\n", "    b()\n", "\n", "    c()"], EarlyStop(min_indent=4))
    assert kept == ("if a:\n    b()\n\n    c()", None)
    cut = text_of(["if a:\n", "    b()\n", "  \n", "d()"], EarlyStop(min_indent=4))
    assert cut == ("if a:\n    b()", "min_indent")


def test_the_end_of_generation_releases_what_was_held() -> None:
    assert text_of(["a:\n", "  "], EarlyStop(min_indent=4)) == ("a:\n  ", None)


def test_an_expired_budget_ends_at_the_next_line_end() -> None:
    assembler = TextAssembler(None, EarlyStop(time_budget=1.0))
    assert assembler.feed(b"first") == "first"
    assembler.expire()
    assert assembler.feed(b" line\nsecond") == " line"
    assert assembler.stopped and assembler.cause == "time_budget"


def test_an_expired_budget_ends_at_once_when_a_newline_is_held() -> None:
    assembler = TextAssembler(None, EarlyStop(min_indent=2, time_budget=1.0))
    assert assembler.feed(b"a\n  ") == "a"
    assembler.expire()
    assert assembler.stopped and assembler.cause == "time_budget"


def test_stop_strings_still_apply_and_name_themselves() -> None:
    assembler = assemble(["one\n", "two END three"], EarlyStop(max_lines=5), stop=["END"])
    assert assembler.text == "one\ntwo "  # type: ignore[attr-defined]
    assert assembler.cause == "stop_string" and assembler.matched == "END"


def test_sampler_chains_take_llamacpp_names_aliases_and_letters() -> None:
    assert sampler_chain(["top_k", "Top_P", "infill"]) == ("top_k", "top_p", "infill")
    assert sampler_chain("kpt") == ("top_k", "top_p", "temperature")
    assert sampler_chain(["temp", "typical_p"]) == ("temperature", "typ_p")
    with pytest.raises(InvalidRequest, match="unknown sampler"):
        sampler_chain(["top_k", "bogus"])
    with pytest.raises(InvalidRequest, match="unknown sampler"):
        sampler_chain("kq")


# --- through the scheduler, on real llama.cpp -------------------------------------------------

CODE = "x = f(\\n    1,\\n    2,\\n)\\ny = 3\\n"
CODE_GRAMMAR = f'root ::= "{CODE}" [a-z]*'
LINES_GRAMMAR = 'root ::= ("ab\\n")+'


@pytest.fixture
async def engine(fim_model_dir: Path) -> AsyncIterator[LocalEngine]:
    entry = ModelEntry(id="coder", path=fim_model_dir / "coder.gguf", source="test")
    eng = LocalEngine(entry, Settings(ctx_size=512, parallel=2, threads=2))
    yield eng
    eng.close()


def greedy(grammar: str | None = None, chain: tuple[str, ...] | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, repetition_penalty=1.0, grammar=grammar, chain=chain)


async def test_min_indent_ends_a_real_generation(engine: LocalEngine) -> None:
    request = GenerationRequest(
        "go", max_tokens=80, sampling=greedy(CODE_GRAMMAR), early_stop=EarlyStop(min_indent=4)
    )
    text, finished = await engine.submit(request).collect()
    assert text == "x = f(\n    1,\n    2,"
    assert (finished.finish_reason, finished.cause) == ("stop", "min_indent")
    # The control: without the rule the same generation writes the whole block and more.
    request.early_stop = None
    text, _ = await engine.submit(request).collect()
    assert text.startswith("x = f(\n    1,\n    2,\n)\ny = 3\n")


async def test_max_lines_ends_a_real_generation(engine: LocalEngine) -> None:
    request = GenerationRequest(
        "go", max_tokens=80, sampling=greedy(LINES_GRAMMAR), early_stop=EarlyStop(max_lines=3)
    )
    text, finished = await engine.submit(request).collect()
    assert text == "ab\nab\nab" and finished.cause == "max_lines"


async def test_a_spent_time_budget_ends_at_the_next_newline(engine: LocalEngine) -> None:
    # A budget of a nanosecond is spent by the second token: the first line is finished.
    request = GenerationRequest(
        "go", max_tokens=80, sampling=greedy(LINES_GRAMMAR), early_stop=EarlyStop(time_budget=1e-9)
    )
    text, finished = await engine.submit(request).collect()
    assert text == "ab"
    assert (finished.finish_reason, finished.cause) == ("length", "time_budget")


async def test_max_tokens_zero_reads_the_prompt_into_the_cache(engine: LocalEngine) -> None:
    prompt = "warm the cache with this text, please"
    text, finished = await engine.submit(GenerationRequest(prompt, max_tokens=0)).collect()
    assert text == "" and finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 0 and finished.usage.prompt_tokens > 5
    _, again = await engine.submit(GenerationRequest(prompt + " more", max_tokens=1)).collect()
    assert again.usage.cached_tokens >= finished.usage.prompt_tokens - 1


async def test_named_chains_with_the_infill_sampler_generate(engine: LocalEngine) -> None:
    chain = sampler_chain(["top_k", "top_p", "infill"])
    params = SamplingParams(top_k=40, top_p=0.99, chain=chain, seed=7)
    first = await engine.submit(
        GenerationRequest("def f(", max_tokens=12, sampling=params)
    ).collect()
    again = await engine.submit(
        GenerationRequest("def f(", max_tokens=12, sampling=params)
    ).collect()
    assert first[1].usage.completion_tokens + (first[1].finish_reason == "stop") > 0
    assert first[0] == again[0]  # the same seed, the same chain: the same text
    # Greedy through a named chain: temperature 0 keeps only the likeliest token.
    greedy_chain = SamplingParams(temperature=0.0, chain=("temperature",))
    one = await engine.submit(
        GenerationRequest("abc", max_tokens=8, sampling=greedy_chain)
    ).collect()
    two = await engine.submit(GenerationRequest("abc", max_tokens=8, sampling=greedy())).collect()
    assert one[0] == two[0]

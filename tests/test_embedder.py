"""The batched embedder on the real llama.cpp with the tiny random F32 model.

The reference is the same embedder held to one sequence per decode, one input per call: what a
batch returns must be what each input gets alone, however the inputs are packed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shimmy.engine.embedder import Embedder
from shimmy.engine.llama import Batch, LlamaContext, LlamaModel
from shimmy.errors import ContextLengthExceeded, InvalidRequest

# llama.cpp rounds a context up to a multiple of 256 cells: the smallest that holds exactly this.
N_CTX = 256


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Iterator[LlamaModel]:
    loaded = LlamaModel(tiny_model_path, n_gpu_layers=0)
    yield loaded
    loaded.close()


def make_embedder(model: LlamaModel, *, max_sequences: int, batch_tokens: int = 512) -> Embedder:
    return Embedder(
        model,
        n_ctx=N_CTX,
        threads=2,
        threads_batch=2,
        swa_full=True,
        max_sequences=max_sequences,
        batch_tokens=batch_tokens,
    )


@pytest.fixture(scope="module")
def alone(model: LlamaModel) -> Iterator[Embedder]:
    embedder = make_embedder(model, max_sequences=1)
    yield embedder
    embedder.close()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of every llama_decode made while the test runs."""
    sizes: list[int] = []
    real = LlamaContext.decode

    def counting(self: LlamaContext, batch: Batch) -> None:
        sizes.append(batch.size)
        real(self, batch)

    monkeypatch.setattr(LlamaContext, "decode", counting)
    return sizes


def token_inputs(lengths: list[int], seed: int = 5) -> list[str | list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, size=n)] for n in lengths]


def one_at_a_time(embedder: Embedder, inputs: list[str | list[int]]) -> np.ndarray:
    return np.array([embedder.embed([item]).vectors[0] for item in inputs])


def test_several_sequences_share_a_decode_and_match_one_at_a_time(
    model: LlamaModel, alone: Embedder, decodes: list[int]
) -> None:
    texts: list[str | list[int]] = [
        "hello",
        "a longer sentence, with a few more words in it than the first",
        "x",
        "the same words again: the same words again",
        "a longer sentence, with a few more words in it than the first",
        "café ☕ and 日本語",
        "the end",
    ]
    expected = one_at_a_time(alone, texts)
    decodes.clear()
    batched = make_embedder(model, max_sequences=3)
    try:
        result = batched.embed(texts)
    finally:
        batched.close()
    # Seven inputs, three sequences a decode: three decodes, however few tokens they hold.
    assert len(decodes) == 3
    np.testing.assert_allclose(np.array(result.vectors), expected, rtol=0, atol=1e-5)
    assert result.prompt_tokens == sum(len(model.tokenize(str(t))) for t in texts)


def test_inputs_are_packed_up_to_the_token_budget(
    model: LlamaModel, alone: Embedder, decodes: list[int]
) -> None:
    # 128 tokens a decode, unless one input alone is longer (up to N_CTX):
    # [100, 20] [50] [200] [1, 5] [256] [30, 30, 60].
    inputs = token_inputs([100, 20, 50, 200, 1, 5, 256, 30, 30, 60])
    expected = one_at_a_time(alone, inputs)
    decodes.clear()
    batched = make_embedder(model, max_sequences=32, batch_tokens=128)
    try:
        result = batched.embed(inputs)
    finally:
        batched.close()
    assert decodes == [120, 50, 200, 6, 256, 120]
    np.testing.assert_allclose(np.array(result.vectors), expected, rtol=0, atol=1e-5)
    assert result.prompt_tokens == 752


def test_results_keep_the_order_of_the_inputs(model: LlamaModel) -> None:
    # Three to a decode: reversed, the inputs are also packed differently ([7, 6, 5] ... [1, 0]).
    inputs = token_inputs([3, 40, 7, 90, 12, 1, 64, 25], seed=11)
    embedder = make_embedder(model, max_sequences=3)
    try:
        forward = np.array(embedder.embed(inputs).vectors)
        backward = np.array(embedder.embed(inputs[::-1]).vectors)
    finally:
        embedder.close()
    np.testing.assert_allclose(backward[::-1], forward, rtol=0, atol=1e-5)
    # Distinct inputs give distinct vectors, so a mix-up would not pass unseen.
    distances = np.linalg.norm(forward[:, None, :] - forward[None, :, :], axis=2)
    assert distances[~np.eye(len(inputs), dtype=bool)].min() > 1e-2
    for vector in forward:
        assert abs(float(np.dot(vector, vector)) - 1.0) < 1e-4


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ([], InvalidRequest, "input 3 is empty"),
        ([5, 100_000], InvalidRequest, "input 3 holds token id 100000"),
        ([-1], InvalidRequest, "input 3 holds token id -1"),
        ([7] * (N_CTX + 1), ContextLengthExceeded, f"input 3 has {N_CTX + 1} tokens"),
    ],
)
def test_a_bad_input_is_named_before_anything_is_decoded_and_the_next_call_works(
    model: LlamaModel,
    alone: Embedder,
    decodes: list[int],
    bad: str | list[int],
    error: type[Exception],
    message: str,
) -> None:
    good = token_inputs([20, 30, 40, 50, 60], seed=3)
    expected = one_at_a_time(alone, good)
    decodes.clear()
    embedder = make_embedder(model, max_sequences=2)
    try:
        with pytest.raises(error, match=message):
            embedder.embed([*good[:3], bad, *good[3:]])
        assert decodes == []
        result = embedder.embed(good)
    finally:
        embedder.close()
    np.testing.assert_allclose(np.array(result.vectors), expected, rtol=0, atol=1e-5)

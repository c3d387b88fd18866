"""GGUF files that make llama.cpp abort the process, yet pass shimmy's header checks.

Each is the tiny model with one thing no real model has; each was checked to end plain
llama-cpp-python with SIGABRT at the stage it is named for. shimmy must contain them in the
model's worker process (tests/test_worker_isolation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType
from tiny_gguf import BOS, EOS, Vocabulary, vocabulary, write_tiny_gguf


@dataclass(frozen=True)
class Crasher:
    name: str
    stage: str  # "load", "context", "tokenize" or "decode"
    # What llama.cpp says as it dies, as the model's failure reason shows it.
    says: str
    prompt: str = "Hello"
    options: Callable[[], dict[str, Any]] = dict


def _duplicate_tokens() -> dict[str, Any]:
    tokens, types = vocabulary()
    tokens[259] = tokens[100]  # two ids, one spelling: llama.cpp asserts its maps agree
    return {"vocab": Vocabulary("gpt2", tokens, types, merges=["Ġ t", "h e"])}


def _sentencepiece_without_bytes() -> dict[str, Any]:
    # A SentencePiece vocabulary with no byte fallback for "€": tokenizing it looks the byte
    # up with unordered_map::at, whose exception crosses llama_tokenize and ends the process.
    pieces = ["<unk>", BOS, EOS, "<0x0A>", "▁", "▁Hello", "H", "e", "l", "o"]
    kinds = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]
    types = [int(kind) for kind in kinds] + [int(TokenType.NORMAL)] * 6
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -3.0, -3.0, -3.0]
    return {"vocab": Vocabulary("llama", pieces, types, scores=scores)}


def _metadata(write: Callable[[GGUFWriter], object]) -> Callable[[], dict[str, Any]]:
    return lambda: {"metadata": write}


CRASHERS = (
    Crasher(
        "bad-rope-scaling",
        "load",
        "GGML_ASSERT(hparams.rope_scaling_type_train",
        options=_metadata(lambda w: w.add_string("llama.rope.scaling.type", "sideways")),
    ),
    Crasher(
        "duplicate-tokens", "load", "GGML_ASSERT(id_to_token.size()", options=_duplicate_tokens
    ),
    Crasher(
        "more-experts-used-than-exist",
        "load",
        "GGML_ASSERT(n_expert_used_max",
        options=_metadata(
            lambda w: (
                w.add_uint32("llama.expert_count", 4),
                w.add_uint32("llama.expert_used_count", 9),
            )
        ),
    ),
    # head_count_kv as a per-layer array: 4 query heads do not share 3 key/value heads, which
    # only the context's first graph finds.
    Crasher(
        "heads-do-not-divide",
        "context",
        "GGML_ASSERT(ggml_can_mul_mat",
        options=lambda: {"head_count_kv": [3, 3], "kv_shaped_by_heads": True},
    ),
    Crasher(
        "euro-sign",
        "tokenize",
        "unordered_map::at",
        prompt="Hello €",
        options=_sentencepiece_without_bytes,
    ),
    # One-dimensional heads: rotary embedding needs pairs, which the first decode checks.
    Crasher(
        "odd-rope-dimensions",
        "decode",
        "GGML_ASSERT(n_dims % 2 == 0)",
        options=lambda: {"head_count": 64, "head_count_kv": 64, "rope_dimension_count": 1},
    ),
)


def write_crashers(folder: Path) -> None:
    for crasher in CRASHERS:
        write_tiny_gguf(folder / f"{crasher.name}.gguf", name=crasher.name, **crasher.options())

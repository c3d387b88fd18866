"""Refusing model hyperparameters that no model has, before llama.cpp sees them.

llama.cpp trusts these numbers: a block count of 0 aborts the whole process inside ggml, and a
context length of 0xFFFFFFFF makes it size buffers for four billion positions and fail as "not
enough memory". Both are facts of the header, so a file carrying them is ``ModelUnusable``
(422, and listed as unusable) from the moment it is read, never a 500 or a crash at load time.

The checks only cover what every architecture shares. Recurrent models (Mamba, RWKV) write 0
attention heads, so the head checks apply to models that declare heads at all; per-layer head
counts (arrays) are left to llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable

from shimmy.errors import ModelUnusable

# Far above any real model (the longest trained context today is about 10M tokens, the
# deepest models have a few hundred layers), far below what overflows a size computation.
MAX_CONTEXT_LENGTH = 1 << 26
MAX_BLOCK_COUNT = 1 << 14
MAX_HEAD_COUNT = 1 << 14
MAX_EMBEDDING_LENGTH = 1 << 20


def check_hyperparameters(arch: str, integer: Callable[[str], int | None]) -> None:
    """``integer(key)`` reads an integer metadata value (None when absent or not one)."""

    def bounded(name: str, low: int, high: int) -> int | None:
        value = integer(f"{arch}.{name}")
        if value is not None and not low <= value <= high:
            raise ModelUnusable(f"{arch}.{name} is {value}, which no model has ({low} to {high})")
        return value

    bounded("context_length", 0, MAX_CONTEXT_LENGTH)
    bounded("block_count", 1, MAX_BLOCK_COUNT)
    embedding = bounded("embedding_length", 1, MAX_EMBEDDING_LENGTH)
    heads = bounded("attention.head_count", 0, MAX_HEAD_COUNT)
    if not heads:
        return
    heads_kv = bounded("attention.head_count_kv", 1, heads)
    if heads_kv is not None and heads % heads_kv:
        raise ModelUnusable(
            f"{arch}.attention.head_count {heads} is not a multiple of head_count_kv {heads_kv}"
        )
    if (
        embedding is not None
        and integer(f"{arch}.attention.key_length") is None
        and embedding % heads
    ):
        raise ModelUnusable(
            f"{arch}.embedding_length {embedding} does not split into {heads} attention heads"
        )

"""What the FIM tests compare against: llama.cpp's own tokenization of each piece, and a
server whose engines record the requests they are given."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

from shimmy.engine.local import LocalEngine
from shimmy.engine.protocol import Stream
from shimmy.engine.types import GenerationRequest


@functools.cache
def _vocab(path: Path) -> Any:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not read {path}"
    return llama_cpp.llama_model_get_vocab(model)  # the model stays loaded: a test process


def llama_tokens(path: Path, text: str) -> list[int]:
    """``text`` tokenized by llama.cpp directly, as plain text (no BOS, specials not parsed)."""
    vocab = _vocab(path)
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    assert n >= 0
    return list(buf[:n])


def recording_factory(log: list[GenerationRequest]) -> Callable[..., LocalEngine]:
    """An engine factory for ``ModelRegistry``: real engines that append every request they
    are given to ``log``."""

    class Recording(LocalEngine):
        def submit_many(self, requests: list[GenerationRequest]) -> list[Stream]:
            log.extend(requests)
            return super().submit_many(requests)

    return Recording


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n

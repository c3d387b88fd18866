"""Sampler chains named the way llama.cpp's server names them (its ``samplers`` field).

Editor plugins written for llama.cpp choose their chain: llama.vscode sends
``["top_k", "top_p", "infill"]``. The names are llama.cpp's, in the order given, with a random
draw (``dist``) at the end, as llama.cpp builds it. ``dry``, ``typ_p``, ``xtc`` and
``top_n_sigma`` are accepted and do nothing: shimmy takes none of their parameters, and at
llama.cpp's defaults they do nothing there either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import llama_cpp

from shimmy.engine.types import SamplingParams
from shimmy.errors import InvalidRequest

# Canonical names, then llama.cpp's other spellings and one-letter codes ("kpt").
_NAMES = (
    "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
    "temperature", "infill",
)  # fmt: skip
_ALIASES = {"typical_p": "typ_p", "typical": "typ_p", "nucleus": "top_p", "temp": "temperature"}
_LETTERS = {
    "e": "penalties", "d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma",
    "m": "min_p", "t": "temperature", "x": "xtc", "i": "infill",
}  # fmt: skip
_NO_OPS = frozenset({"dry", "typ_p", "xtc", "top_n_sigma"})
MAX_CHAIN = 32


def sampler_chain(value: str | Iterable[str], *, param: str = "samplers") -> tuple[str, ...]:
    """Canonical sampler names from a list of names or a string of one-letter codes; an
    unknown name is an ``InvalidRequest`` (a chain silently missing a sampler samples wrong)."""
    names = [_LETTERS.get(c, c) for c in value] if isinstance(value, str) else list(value)
    if len(names) > MAX_CHAIN:
        raise InvalidRequest(f"at most {MAX_CHAIN} samplers", param=param)
    chain: list[str] = []
    for name in names:
        canonical = _ALIASES.get(name.lower(), name.lower())
        if canonical not in _NAMES:
            known = ", ".join(_NAMES)
            raise InvalidRequest(f"unknown sampler {name[:40]!r}; known: {known}", param=param)
        chain.append(canonical)
    return tuple(chain)


def add_named_samplers(
    add: Callable[[object], None], vocab: object, n_vocab: int, p: SamplingParams, seed: int
) -> None:
    """Add ``p.chain``'s samplers to a chain through ``add``, then the final random draw."""
    assert p.chain is not None
    for name in p.chain:
        if name in _NO_OPS:
            continue
        if name == "penalties":
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    p.penalty_last_n,
                    p.repetition_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                )
            )
        elif name == "top_k":
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        elif name == "top_p":
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        elif name == "min_p":
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        elif name == "temperature":
            # A temperature of 0 keeps only the likeliest token: greedy, as in llama.cpp.
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
        elif name == "infill":
            # Merges candidates that are prefixes of one another and weighs ending the
            # middle against continuing it: what FIM models need to stop in the right place.
            add(llama_cpp.llama_sampler_init_infill(vocab))
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

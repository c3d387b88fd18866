"""What llama.cpp's answers share: how a generation ended, its timings, the settings it ran
with, ``response_fields``. Timings are measured here, around the engine: ``prompt_ms`` runs
from the request's start to its first token (a wait for a slot included), ``predicted_ms``
from then to the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from shimmy.api.llamacpp.protocol import StopType
from shimmy.engine.types import Finished
from shimmy.serving.prepare import Prepared

# llama.cpp's "no seed given": a fresh random one per request.
RANDOM_SEED = 2**32 - 1


def stop_type(finished: Finished) -> StopType:
    if finished.finish_reason == "cancelled":
        return "none"
    if finished.cause == "eog":
        return "eos"
    if finished.cause == "stop_string":
        return "word"
    return "limit"  # the length limit, and the line rules (llama.cpp's n_indent is a limit)


@dataclass
class Clock:
    """When the request started and its first event came (``time.monotonic()``)."""

    started: float = field(default_factory=time.monotonic)
    first: float | None = None

    def timings(self, finished: Finished, ended: float) -> dict[str, Any]:
        usage = finished.usage
        first = self.first if self.first is not None else ended
        prompt_n = usage.prompt_tokens - usage.cached_tokens
        prompt_ms = (first - self.started) * 1000
        predicted_ms = (ended - first) * 1000
        return {
            "cache_n": usage.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": usage.completion_tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": (
                predicted_ms / usage.completion_tokens if usage.completion_tokens else 0.0
            ),
            "predicted_per_second": (
                usage.completion_tokens / predicted_ms * 1000 if predicted_ms > 0 else 0.0
            ),
        }


def select_fields(result: dict[str, Any], paths: list[str] | None) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: only the fields named, by slash-separated paths, each
    keyed by its path; a path that leads nowhere is left out."""
    if not paths:  # llama.cpp: an empty list, like none, means every field
        return result
    chosen: dict[str, Any] = {}
    for path in paths:
        node: Any = result
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            chosen[path] = node
    return chosen


def generation_settings(
    prepared: Prepared, model: str, n_predict: int, stream: bool, **extra: Any
) -> dict[str, Any]:
    """The settings a generation ran with, under llama.cpp's names."""
    sampling = prepared.request.sampling
    return {
        "model": model,
        "n_predict": n_predict,
        "seed": sampling.seed if sampling.seed is not None else RANDOM_SEED,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_last_n": sampling.penalty_last_n,
        "repeat_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "samplers": list(sampling.chain) if sampling.chain is not None else None,
        "grammar": sampling.grammar or "",
        # JSON has no -inf: llama.cpp writes a banned token's bias as null.
        "logit_bias": [
            {"bias": bias if math.isfinite(bias) else None, "token": token}
            for token, bias in sampling.logit_bias
        ],
        "stop": list(prepared.request.stop),
        "stream": stream,
        **extra,
    }

"""Log-probabilities of a sampled token and its top alternatives, from the raw logits.

They describe the model's distribution before any sampler (temperature, penalties, grammar)
reshaped it, as OpenAI's ``logprobs`` do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from shimmy.engine.types import PromptToken, TokenLogprob


def token_logprob(
    logits: np.ndarray, token: int, piece: bytes, top_n: int, token_bytes: Callable[[int], bytes]
) -> TokenLogprob:
    # float64 and the max subtracted first: exp() of float32 logits overflows.
    shifted = logits.astype(np.float64) - float(logits.max())
    logsumexp = math.log(float(np.exp(shifted).sum()))
    top: dict[str, float] = {}
    top_ids: dict[str, int] = {}
    if top_n > 0:
        best = np.argpartition(-shifted, min(top_n, len(shifted) - 1))[:top_n]
        for t in sorted(best, key=lambda t: -shifted[t]):
            text = token_bytes(int(t)).decode("utf-8", "replace")
            # Tokens that decode to the same text (broken UTF-8 pieces) keep the likeliest.
            if text not in top:
                top[text] = float(shifted[t] - logsumexp)
                top_ids[text] = int(t)
    return TokenLogprob(
        token=piece.decode("utf-8", "replace"),
        logprob=float(shifted[token] - logsumexp),
        top=top,
        id=token,
        top_ids=top_ids,
    )


def prompt_token_score(
    logits: np.ndarray, token: int, top_n: int, token_bytes: Callable[[int], bytes]
) -> PromptToken:
    """How likely the model found prompt token ``token``, from the logits of the position
    before it."""
    scored = token_logprob(logits, token, token_bytes(token), top_n, token_bytes)
    return PromptToken(scored.token, scored.logprob, scored.top)

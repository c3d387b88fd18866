"""Plain data passed between the transport layers and the engine's worker thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]
# What ended a generation early, when it was not the length limit: the model's end-of-generation
# token, a stop string, or one of code completion's line rules (``EarlyStop``).
StopCause = Literal["eog", "stop_string", "max_lines", "min_indent", "time_budget"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 40  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.1  # 1.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None  # None = a fresh random seed per request
    grammar: str | None = None  # GBNF, root rule "root"
    # llama.cpp's sampler names in the order to chain them ("top_k", "top_p", "infill", ...);
    # None = shimmy's chain (penalties, top-k, top-p, min-p, temperature). See engine/chain.py.
    chain: tuple[str, ...] | None = None
    # Added to a token's logit before any sampler; -inf bans it (llama.cpp's and OpenAI's
    # ``logit_bias``, with ``ignore_eos`` as -inf on every end-of-generation token).
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class EarlyStop:
    """Code completion's early ends, each at a line boundary, so an editor never gets half a
    line. The newline where a completion ends is not part of its text."""

    max_lines: int | None = None  # at most this many lines (1 = stop at the first newline)
    min_indent: int = 0  # a later line indented by fewer spaces/tabs than this ends it
    # Seconds after the first token; once spent, the completion ends at its next newline.
    time_budget: float | None = None


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (llama.cpp's ``llama_vocab_fim_*``). ``rep``
    and ``sep`` (repository name, file separator) exist in repository-level FIM models only."""

    pre: int
    suf: int
    mid: int
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None
    bos: int | None = None  # the BOS a prompt of this model starts with; None: it takes none


@dataclass
class GenerationRequest:
    """One completion. ``prompt`` is text (special tokens such as ``<start_of_turn>`` are parsed)
    or already-tokenized ids. ``max_tokens`` None means "until the context is full"; 0 means
    "only read the prompt" (it fills the prefix cache, as editor plugins do ahead of time)."""

    prompt: str | list[int]
    max_tokens: int | None = 100
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top-N alternatives per token; None = off
    add_bos: bool = True  # a BOS already present at the start of the text is not doubled
    # Score the prompt too: each prompt token's logprob and top-N alternatives (OpenAI's
    # ``echo`` with ``logprobs``). None = off. The prompt is then decoded whole, never reused.
    prompt_logprobs: int | None = None
    early_stop: EarlyStop | None = None
    # Speculative decoding from the sequence's own n-grams; None = the server's setting.
    speculative: bool | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from a previous request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    # Vocabulary ids of the token and of each ``top`` entry (llama.cpp's n_probs shows them).
    id: int = -1
    top_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class PromptToken:
    """One prompt token as scored by the model; the first has no logprob (nothing precedes it)."""

    token: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class TextDelta:
    """A piece of generated text: always whole UTF-8 characters, never part of a stop string."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    # The ids of the tokens sampled since the last delta (text held back included), for
    # llama.cpp's ``tokens``; None where they are not known (the fake engine).
    tokens: list[int] | None = None


@dataclass
class Finished:
    finish_reason: FinishReason
    usage: Usage
    # The stop string that ended the reply ("stop" only; None for an end-of-generation token).
    stop_sequence: str | None = None
    prompt_tokens: list[PromptToken] | None = None  # when ``prompt_logprobs`` was asked for
    # What ended it before max_tokens; None when it ran to max_tokens or was cancelled.
    cause: StopCause | None = None


Event = TextDelta | Finished


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int

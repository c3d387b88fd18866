"""The documented defaults of every dialect, in one table.

A field a client leaves out takes, in this order: the model's configured default (the TOML
config's ``[models.ID.sampling]``), then its dialect's row here. Each dialect keeps the defaults
its clients were written against: OpenAI's clients tune against OpenAI (temperature 1, no top-k,
16 tokens for the legacy completions endpoint), LocalLab's against LocalLab's server.
Anthropic's Messages API samples with temperature 1 and neither top-p nor top-k unless asked,
and has no default length (``max_tokens`` is required, as Anthropic requires it).

Every dialect has a finite ``max_tokens``. Clients that leave it out (LangChain's and Open
WebUI's default) on a model that rarely stops would otherwise run to the server's cap and then
into ``request_timeout``. The dialects whose own servers set no limit (OpenAI chat, LocalLab)
take the server's ``open_max_tokens`` setting, ``OPEN_ENDED_MAX_TOKENS`` unless configured:
long enough for any chat answer, short enough to end within minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class Dialect(StrEnum):
    NATIVE = "native"  # POST /api/generate, /api/generate/batch and /ws/generate frames
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETIONS = "openai_completions"
    OPENAI_RESPONSES = "openai_responses"
    ANTHROPIC = "anthropic"
    LOCALLAB = "locallab"
    OLLAMA = "ollama"  # /api/generate and /api/chat of Ollama's API (under /ollama)
    RKLLAMA = "rkllama"
    LLAMACPP = "llamacpp"  # llama.cpp's server routes: /infill
    CLI_GENERATE = "cli_generate"
    CLI_CHAT = "cli_chat"
    CLI_PROBE = "cli_probe"


@dataclass(frozen=True)
class DialectDefaults:
    # None: the server's ``open_max_tokens`` setting, never unbounded. Whichever it is, it is
    # still clamped to the server's cap (``max_tokens_cap``) and to the context.
    max_tokens: int | None
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repetition_penalty: float = 1.1

    def sampling(self) -> dict[str, float | int]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }


OPEN_ENDED_MAX_TOKENS = 2048  # the default of Settings.open_max_tokens

DEFAULTS: Mapping[Dialect, DialectDefaults] = MappingProxyType(
    {
        Dialect.NATIVE: DialectDefaults(max_tokens=100),
        Dialect.OPENAI_CHAT: DialectDefaults(
            None, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0
        ),
        Dialect.OPENAI_COMPLETIONS: DialectDefaults(
            16, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0
        ),
        Dialect.OPENAI_RESPONSES: DialectDefaults(
            None, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0
        ),
        # max_tokens is required by the protocol; None is never used.
        Dialect.ANTHROPIC: DialectDefaults(
            None, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0
        ),
        Dialect.LOCALLAB: DialectDefaults(max_tokens=None, top_k=80, repetition_penalty=1.15),
        # Ollama's DefaultOptions (api/types.go): num_predict -1 generates until the context is
        # full or the server's cap; no repeat penalty.
        Dialect.OLLAMA: DialectDefaults(
            max_tokens=None, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.0
        ),
        # RKLLama's rkllm parameters: top_k 1 (greedy), temperature 0.8, repeat penalty 1.1.
        Dialect.RKLLAMA: DialectDefaults(
            max_tokens=None, temperature=0.8, top_p=0.9, top_k=1, repetition_penalty=1.1
        ),
        # llama.cpp's common_params_sampling; n_predict -1 (no limit) takes
        # open_max_tokens, as every open-ended dialect does.
        Dialect.LLAMACPP: DialectDefaults(
            None, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.0
        ),
        Dialect.CLI_GENERATE: DialectDefaults(max_tokens=50),
        Dialect.CLI_CHAT: DialectDefaults(max_tokens=1024),
        # A fixed, greedy, short generation: the same measurement on every run.
        Dialect.CLI_PROBE: DialectDefaults(max_tokens=16, temperature=0.0),
    }
)

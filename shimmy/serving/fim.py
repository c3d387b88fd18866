"""Fill-in-the-middle prompts, built from the model's own FIM tokens.

Every dialect that takes a suffix (OpenAI's ``/v1/completions``, llama.cpp's ``/infill``, the
native API and its WebSocket, Ollama's ``/api/generate``) says so with a ``FimInput`` in its
``GenerationInput``; ``prepare`` turns it into token ids here. A model without FIM tokens is
refused with ``FimUnsupported`` (a 400): a suffix must never be silently dropped.

The layout is llama.cpp's repository-level one (``format_infill`` in its server, after
Qwen2.5-Coder's report), prefix first::

    [BOS] [REP]myproject\\n [SEP]a.py\\n <a.py's text> ... [SEP]filename\\n
          [PRE] <prefix><prompt> [SUF] <suffix> [MID]

The repository and file-separator pieces appear only where the model has those tokens; a
model without them gets each extra file after a plain-text ``--- snippet ---`` line. One
deliberate difference: BOS comes first, where llama.cpp puts it after the extra files.

Prefix first matters for keystroke latency: as the user types, the prefix grows at its end, so
the previous request's cached tokens (everything before the cursor) stay a prefix of the new
prompt and only the tail is decoded again. Truncation keeps that true: each part has a fixed
share of the context, and a prefix that outgrows its share loses its start in whole blocks, so
the start moves once per block of typing rather than with every keystroke.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shimmy.engine.types import FimTokens
from shimmy.errors import FimUnsupported

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine

# What llama.cpp's server writes for the project and the current file's name (it takes
# neither from the request); the same text keeps prompts, and caches, the same as there.
REPO_NAME = "myproject\n"
CURRENT_FILE = "filename\n"
DEFAULT_FILENAME = "tmp"
# Written between extra files for a model without a file-separator token.
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
# A part longer than its share loses its far end in steps of this fraction of the share.
TRUNCATION_BLOCKS = 8


@dataclass(frozen=True)
class ExtraFile:
    """Another file's text, given as context before the one being edited."""

    text: str
    filename: str = DEFAULT_FILENAME


@dataclass(frozen=True)
class FimInput:
    """What goes around the gap. ``prompt`` is text typed after ``prefix`` (llama.cpp's
    ``prompt``: the cursor's line so far); it joins the prefix. ``param`` is the dialect's name
    of its suffix field, for the error a model without FIM tokens gets."""

    prefix: str
    suffix: str
    prompt: str = ""
    extra: tuple[ExtraFile, ...] = ()
    param: str = "suffix"


@dataclass(frozen=True)
class FimPrompt:
    tokens: list[int]
    truncated: bool  # some of the prefix, suffix or extra files did not fit the context


@dataclass(frozen=True)
class FimPieces:
    """The texts of a FIM prompt, tokenized as plain text."""

    prefix: list[int]
    prompt: list[int]
    suffix: list[int]
    extra: list[tuple[list[int], list[int]]]  # (filename line, text) of each extra file
    repo_name: list[int]
    current_file: list[int]
    snippet: list[int]


def supports_fim(engine: Engine) -> bool:
    return engine.fim_tokens is not None


def require_fim(engine: Engine, param: str = "suffix") -> FimTokens:
    """The engine's FIM tokens, or ``FimUnsupported`` naming the dialect's suffix field."""
    tokens = engine.fim_tokens
    if tokens is None:
        raise FimUnsupported(
            f"model '{engine.entry.id}' has no fill-in-the-middle tokens (prefix, suffix and "
            "middle) in its vocabulary; use a code model trained for infilling",
            param=param,
        )
    return tokens


async def fim_prompt(engine: Engine, fim: FimInput, *, max_tokens: int) -> FimPrompt:
    """The token ids of ``fim`` for ``engine``'s model, fitted to its context with room for
    ``max_tokens`` generated tokens (at most half the context)."""
    tokens = require_fim(engine, fim.param)
    texts = [fim.prefix, fim.prompt, fim.suffix, REPO_NAME, CURRENT_FILE, SNIPPET_SEPARATOR]
    for file in fim.extra:
        texts += [f"{file.filename}\n", file.text]
    pieces = await engine.tokenize_literal(texts)
    prefix, prompt, suffix, repo_name, current_file, snippet = pieces[:6]
    extra = list(zip(pieces[6::2], pieces[7::2], strict=True))
    parts = FimPieces(prefix, prompt, suffix, extra, repo_name, current_file, snippet)
    return layout(tokens, parts, context=engine.n_ctx, max_tokens=max_tokens)


def layout(tokens: FimTokens, parts: FimPieces, *, context: int, max_tokens: int) -> FimPrompt:
    """Assemble the prompt (see the module's docstring), each part within its share."""
    head = [tokens.bos] if tokens.bos is not None else []
    fixed = len(head) + 3  # BOS, PRE, SUF, MID
    room = max(0, context - max(1, min(max_tokens, context // 2)) - fixed)
    extra = _extra_section(tokens, parts)
    suffix_share = room // 4
    extra_share = room // 4 if extra else 0
    prefix_share = room - suffix_share - extra_share
    prefix, cut_prefix = _keep_end(parts.prefix + parts.prompt, prefix_share)
    extra, cut_extra = _keep_end(extra, extra_share)
    suffix = parts.suffix[:suffix_share]
    ids = [*head, *extra, tokens.pre, *prefix, tokens.suf, *suffix, tokens.mid]
    truncated = cut_prefix or cut_extra or len(suffix) < len(parts.suffix)
    return FimPrompt(ids, truncated)


def _extra_section(tokens: FimTokens, parts: FimPieces) -> list[int]:
    section: list[int] = []
    if tokens.rep is not None:
        section += [tokens.rep, *parts.repo_name]
    for filename, text in parts.extra:
        if tokens.sep is not None:
            section += [tokens.sep, *filename]
        else:
            section += parts.snippet
        section += text
    if tokens.sep is not None:
        section += [tokens.sep, *parts.current_file]
    return section


def _keep_end(ids: list[int], share: int) -> tuple[list[int], bool]:
    """The end of ``ids`` within ``share``; what is cut from the start is a whole number of
    blocks, so a part that grows at its end keeps the same start for a block's worth."""
    if len(ids) <= share:
        return ids, False
    block = max(1, share // TRUNCATION_BLOCKS)
    blocks = -(-(len(ids) - share) // block)  # ceiling division
    return ids[blocks * block :], True

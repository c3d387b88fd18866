"""``prepare``: what a dialect parsed, plus the model's and the dialect's defaults, becomes the
engine's request. This is the only place a ``GenerationRequest`` is built.

Everything that decides what the model is asked happens here and nowhere else: the chat
template, the system prompt, tool and JSON instructions with their grammars, merging the
template's end-of-turn markers into the stop strings, and clamping ``max_tokens`` to the cap
(the engine clamps it to the context).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shimmy.engine.types import EarlyStop, GenerationRequest, SamplingParams
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import (
    Message,
    ResponseFormat,
    ToolChoice,
    ToolPlan,
    add_system_note,
    plan_tools,
    template_knows_tools,
    template_messages,
)
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.serving.fim import FimInput, fim_prompt
from shimmy.serving.structured import (
    ToolSpec,
    json_instruction,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
    tools_instruction,
)

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.settings import Settings

# The sampling fields a model's config may give defaults for (``[models.X.sampling]``).
_CONFIGURABLE = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


@dataclass
class GenerationInput:
    """One generation as a dialect parsed it. ``None`` means "the client did not say"."""

    prompt: str | list[int] | None = None  # text (or token ids) sent as is
    messages: list[Message] | None = None  # rendered with the model's chat template
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields sent
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # score the prompt too (OpenAI's echo with logprobs)
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    wire_tools: list[dict[str, Any]] | None = None  # the tools as sent, for native templates
    response_format: ResponseFormat | None = None
    fim: FimInput | None = None  # fill in the middle (serving/fim.py), instead of a prompt
    early_stop: EarlyStop | None = None
    speculative: bool | None = None
    # Token id or text (each of its tokens) to a bias on its logit; -inf bans it.
    logit_bias: list[tuple[int | str, float]] = field(default_factory=list)
    ignore_eos: bool = False  # never end at an end-of-generation token (-inf on each)
    # False: the rendered conversation ends after its last message, without the opening of the
    # assistant's turn (llama.cpp's /apply-template shows either).
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        if [self.prompt, self.messages, self.fim].count(None) != 2:
            raise ValueError("a generation has one of a prompt, messages or a FIM input")


@dataclass
class Prepared:
    """The engine's request, and what the dialect needs to render its answer."""

    request: GenerationRequest
    tools: ToolPlan = field(default_factory=ToolPlan)
    # The request field an engine error is about, in the dialect's terms (see ``run``).
    prompt_param: str = "prompt"
    grammar_param: str | None = None
    truncated: bool = False  # the FIM prompt lost text to fit the context


async def prepare(
    engine: Engine,
    given: GenerationInput,
    dialect: Dialect,
    settings: Settings,
    *,
    prompt_param: str | None = None,
) -> Prepared:
    """Build the engine's request for ``given``. Template rendering and grammar conversion are
    bounded CPU work, so they run off the event loop."""
    model_defaults = engine.options.sampling.values()
    tools = plan_tools(given.tools, given.tool_choice, given.wire_tools)
    grammar: str | None = None
    grammar_param: str | None = None
    truncated = False
    stop = list(given.stop)
    if tools.forced:
        grammar = await asyncio.to_thread(tool_call_grammar, tools.forced)
        grammar_param = "tools"
    # The format is checked even when a forced tool call takes precedence over it.
    response_grammar, schema = await asyncio.to_thread(_response_grammar, given.response_format)
    if given.messages is not None:
        native_tools = template_knows_tools(engine)
        messages = template_messages(given.messages, native_tools)
        if given.system is not None:
            messages.insert(0, {"role": "system", "content": given.system})
        if response_grammar is not None and grammar is None:
            # Saying "JSON" in the prompt costs nothing and keeps small models from fighting
            # the grammar.
            add_system_note(messages, json_instruction(schema))
        if tools.offered and not native_tools:
            add_system_note(
                messages,
                tools_instruction(
                    tools.offered, tools.forced_name, required=tools.forced is not None
                ),
            )
        wire_tools = tools.wire_tools if tools.offered else None
        prompt: str | list[int] = await asyncio.to_thread(
            engine.template.render,
            messages,
            add_generation_prompt=given.add_generation_prompt,
            tools=wire_tools,
        )
        stop += [marker for marker in engine.template.stop_strings if marker not in stop]
    elif given.fim is not None:
        if given.system is not None:
            raise InvalidRequest("a system prompt cannot be used with a suffix", param="system")
        max_tokens = _max_tokens(given.max_tokens, model_defaults, dialect, settings)
        fim = await fim_prompt(engine, given.fim, max_tokens=max_tokens)
        prompt, truncated = fim.tokens, fim.truncated
    else:
        assert given.prompt is not None
        prompt = given.prompt
        if given.system is not None:
            if not isinstance(prompt, str):
                raise InvalidRequest("a system prompt needs a text prompt", param="system")
            prompt = f"{given.system}\n\n{prompt}"
    if response_grammar is not None and grammar is None:
        grammar, grammar_param = response_grammar, "response_format"
    sampling = _sampling(given.sampling, model_defaults, dialect, grammar)
    if given.logit_bias or given.ignore_eos:
        sampling = dataclasses.replace(sampling, logit_bias=await _logit_bias(engine, given))
    request = GenerationRequest(
        prompt=prompt,
        max_tokens=_max_tokens(given.max_tokens, model_defaults, dialect, settings),
        sampling=sampling,
        stop=stop,
        logprobs=given.logprobs,
        prompt_logprobs=given.prompt_logprobs,
        early_stop=given.early_stop,
        speculative=given.speculative,
    )
    default_param = "messages" if given.messages is not None else "prompt"
    return Prepared(request, tools, prompt_param or default_param, grammar_param, truncated)


def variants(prepared: Prepared, n: int) -> list[Prepared]:
    """``n`` independent samples of one prepared generation (OpenAI's ``n``, ``best_of``).

    Each gets its own seed: with the client's seed the i-th sample uses ``seed + i`` (so the
    whole set is reproducible, and no two are the same); without one, fresh random seeds.
    """
    base = prepared.request.sampling.seed
    out: list[Prepared] = []
    for i in range(n):
        seed = (base + i) & 0xFFFFFFFF if base is not None else random.getrandbits(32)
        sampling = dataclasses.replace(prepared.request.sampling, seed=seed)
        request = dataclasses.replace(prepared.request, sampling=sampling)
        out.append(dataclasses.replace(prepared, request=request))
    return out


def _max_tokens(
    sent: int | None, model_defaults: dict[str, Any], dialect: Dialect, settings: Settings
) -> int:
    chosen = sent if sent is not None else model_defaults.get("max_tokens")
    if chosen is None:
        chosen = DEFAULTS[dialect].max_tokens
    if chosen is None:
        chosen = settings.open_max_tokens
    return min(int(chosen), settings.max_tokens_cap)


def _sampling(
    sent: dict[str, Any], model_defaults: dict[str, Any], dialect: Dialect, grammar: str | None
) -> SamplingParams:
    values: dict[str, Any] = DEFAULTS[dialect].sampling()
    values.update({k: v for k, v in model_defaults.items() if k in _CONFIGURABLE})
    values.update({k: v for k, v in sent.items() if v is not None})
    if grammar is not None:
        values["grammar"] = grammar
    return SamplingParams(**values)


async def _logit_bias(engine: Engine, given: GenerationInput) -> tuple[tuple[int, float], ...]:
    """Token ids and their biases: a text's bias goes to each of its tokens, as llama.cpp
    tokenizes it (no BOS, special-token spellings as text)."""
    texts = [key for key, _ in given.logit_bias if isinstance(key, str)]
    tokenized = iter(await engine.tokenize_literal(texts) if texts else [])
    biases: list[tuple[int, float]] = []
    for key, bias in given.logit_bias:
        ids = [key] if isinstance(key, int) else next(tokenized)
        biases += [(token, bias) for token in ids]
    if given.ignore_eos:
        biases += [(token, -math.inf) for token in engine.eog_tokens]
    return tuple(biases)


def _response_grammar(response_format: ResponseFormat | None) -> tuple[str | None, Any]:
    """The grammar for a response format, and the schema the model is told about."""
    if response_format is None or response_format.kind == "text":
        return None, None
    if response_format.kind == "json_object":
        return json_object_grammar(), None
    if response_format.schema is None:
        raise InvalidRequest(
            "response_format of type json_schema needs json_schema.schema",
            param="response_format",
        )
    return json_schema_grammar(response_format.schema), response_format.schema

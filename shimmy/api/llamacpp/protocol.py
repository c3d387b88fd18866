"""Requests and responses of llama.cpp's server routes, as its clients send and read them.

``POST /infill`` is what llama.vscode and llama.vim call for code completion. The fields are
llama.cpp's (``tools/server/README.md``); unknown fields are ignored, as llama.cpp ignores them.
Accepted and not acted on, as in llama.cpp or because shimmy does it anyway: ``t_max_prompt_ms``
(llama.cpp does not implement it either), ``cache_prompt`` (the prefix cache is always used;
``--no-prefix-cache`` turns it off server-wide), ``id_slot`` (the slot holding the longest
matching prefix is chosen), ``lora``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, RootModel, StrictBool, StrictStr

from shimmy.api.openai.protocol import ChatCompletionRequest
from shimmy.api.protocol.common import (
    LogitBias,
    ModelField,
    RepetitionPenalty,
    StopList,
    StrictFloat,
    StrictInteger,
    TopK,
    WireModel,
)
from shimmy.api.protocol.fim import ExtraFiles, Indent, Milliseconds, seconds
from shimmy.api.protocol.responses import ResponseModel
from shimmy.engine.chain import MAX_CHAIN, sampler_chain
from shimmy.engine.types import EarlyStop
from shimmy.errors import InvalidRequest
from shimmy.serving.chat import ResponseFormat
from shimmy.serving.fim import FimInput
from shimmy.serving.prepare import GenerationInput

Probability = Annotated[StrictFloat, Field(ge=0, le=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
# llama.cpp's seeds are 32-bit; -1 and 0xFFFFFFFF (its default) both mean "random".
Seed = Annotated[StrictInteger, Field(ge=-1, le=2**32 - 1)]
RANDOM_SEEDS = (-1, 2**32 - 1)
Samplers = (
    Annotated[list[StrictStr], Field(max_length=MAX_CHAIN)]
    | Annotated[StrictStr, Field(max_length=MAX_CHAIN)]
)
MAX_RESPONSE_FIELDS = 64


class LlamaSampling(WireModel):
    """What llama.cpp's generation routes (/completion, /infill) share: the model, the length
    and its samplers, named as llama.cpp names them."""

    model: ModelField = "default"
    n_predict: Annotated[
        StrictInteger,
        Field(
            ge=-1,
            le=2**31 - 1,
            validation_alias=AliasChoices("n_predict", "max_tokens", "max_completion_tokens"),
            description="-1: until the server's cap; 0: only read the prompt into the cache",
        ),
    ] = -1
    temperature: Annotated[StrictFloat, Field(ge=0)] | None = None
    top_k: TopK | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None
    repeat_penalty: RepetitionPenalty | None = None
    repeat_last_n: Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    stream: StrictBool = False
    samplers: Samplers | None = Field(
        None, description='Sampler names in order (["top_k", "top_p", "infill"]) or letters'
    )
    response_fields: Annotated[list[StrictStr], Field(max_length=MAX_RESPONSE_FIELDS)] | None = None
    logit_bias: LogitBias = Field(default_factory=list)
    ignore_eos: StrictBool = False
    speculative_n_max: Annotated[StrictInteger, Field(ge=0, le=1024)] | None = Field(
        None,
        validation_alias=AliasChoices("speculative.n_max", "speculative_n_max"),
        description="Most draft tokens per step; 0 turns speculative decoding off",
    )

    def speculative(self) -> bool | None:
        return None if self.speculative_n_max is None else self.speculative_n_max > 0

    def sampling_sent(self) -> dict[str, Any]:
        """The sampling fields the client set, in engine terms (llama.cpp's names differ)."""
        sent: dict[str, Any] = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repeat_penalty,
            "penalty_last_n": self.repeat_last_n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.seed is not None and self.seed not in RANDOM_SEEDS:
            sent["seed"] = self.seed
        if self.samplers is not None:
            sent["chain"] = sampler_chain(self.samplers)
        return {name: value for name, value in sent.items() if value is not None}


class InfillRequest(LlamaSampling):
    input_prefix: StrictStr
    input_suffix: StrictStr
    input_extra: ExtraFiles = Field(default_factory=list)
    prompt: StrictStr = Field("", description="Text after input_prefix: the cursor's line so far")
    n_indent: Indent = 0
    t_max_predict_ms: Milliseconds = Field(
        0, description="After this long (from the first token), end at the next newline"
    )

    def to_input(self) -> GenerationInput:
        fim = FimInput(
            prefix=self.input_prefix,
            suffix=self.input_suffix,
            prompt=self.prompt,
            extra=tuple(chunk.to_extra() for chunk in self.input_extra),
            param="input_suffix",
        )
        early = EarlyStop(min_indent=self.n_indent, time_budget=seconds(self.t_max_predict_ms))
        return GenerationInput(
            fim=fim,
            sampling=self.sampling_sent(),
            stop=list(self.stop),
            max_tokens=None if self.n_predict < 0 else self.n_predict,
            early_stop=early if early != EarlyStop() else None,
            speculative=self.speculative(),
            logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos,
        )


# --- responses ----------------------------------------------------------------------------------

StopType = Literal["eos", "word", "limit", "none"]


class Timings(ResponseModel):
    cache_n: int = Field(description="Prompt tokens whose KV was reused")
    prompt_n: int = Field(description="Prompt tokens decoded")
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class InfillPartial(ResponseModel):
    """One streamed piece (``stream``: true); the last event is an ``InfillResult``."""

    index: int
    content: str
    tokens: list[int]
    stop: Literal[False]
    id_slot: int


class InfillResult(ResponseModel):
    """``POST /infill`` without ``stream`` (with ``response_fields``: only those, by path).
    ``prompt`` is left out: echoing the files back on every keystroke costs time."""

    index: int
    content: str
    tokens: list[int]
    id_slot: int = Field(description="Always -1: slots are chosen by shimmy")
    stop: Literal[True]
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict[str, Any]
    has_new_line: bool
    truncated: bool = Field(description="Some of the prefix, suffix or input_extra was cut")
    stop_type: StopType
    stopping_word: str
    tokens_cached: int
    timings: Timings


class InfillAnswer(RootModel[InfillResult | dict[str, Any]]):
    """The final object, or with ``response_fields`` the fields named there, keyed by path."""


# --- /completion ------------------------------------------------------------------------------

MAX_PROMPTS = 16  # prompts in one /completion request (each is its own sequence)
MAX_PROBS = 20


class LlamaCompletionRequest(LlamaSampling):
    """``POST /completion``. ``prompt`` is text, token ids, text and ids mixed in one sequence,
    ``{"prompt_string": ...}``, or a list of those (then the answer is a list, one per prompt).
    Accepted and not acted on: ``cache_prompt`` (the prefix cache is always on), ``id_slot``,
    ``post_sampling_probs`` (probabilities are those before sampling, as ``n_probs`` gives)."""

    prompt: StrictStr | list[Any] | dict[str, Any]
    grammar: StrictStr | None = Field(None, description="A GBNF grammar, root rule `root`")
    json_schema: dict[str, Any] | None = Field(None, description="Constrain to this JSON schema")
    n_probs: Annotated[StrictInteger, Field(ge=0, le=MAX_PROBS)] = 0
    post_sampling_probs: StrictBool = False
    return_tokens: StrictBool = False
    cache_prompt: StrictBool = True

    def prompts(self) -> list[list[str | int]]:
        """Each prompt as its pieces: texts and token ids, in order."""
        prompt = self.prompt
        if not isinstance(prompt, list) or _one_sequence(prompt):
            return [_pieces(prompt)]
        if not prompt:
            raise InvalidRequest("the prompt list is empty", param="prompt")
        if len(prompt) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        return [_pieces(item) for item in prompt]

    def to_input(self, prompt: str | list[int]) -> GenerationInput:
        sampling = self.sampling_sent()
        if self.grammar is not None and self.grammar.strip():
            sampling["grammar"] = self.grammar
        schema = self.json_schema
        return GenerationInput(
            prompt=prompt,
            sampling=sampling,
            stop=list(self.stop),
            max_tokens=None if self.n_predict < 0 else self.n_predict,
            logprobs=self.n_probs or None,
            response_format=ResponseFormat("json_schema", schema) if schema is not None else None,
            speculative=self.speculative(),
            logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos,
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_sequence(items: list[Any]) -> bool:
    """A list of ids, or ids and texts mixed, is one prompt; anything else is a list of them."""
    return (
        bool(items)
        and all(_is_id(i) or isinstance(i, str) for i in items)
        and any(_is_id(i) for i in items)
    )


def _pieces(item: Any) -> list[str | int]:
    if isinstance(item, str):
        return [item]
    if isinstance(item, dict):
        if item.get("multimodal_data"):
            raise InvalidRequest("this model takes no images or audio", param="prompt")
        text = item.get("prompt_string")
        if not isinstance(text, str):
            raise InvalidRequest("a prompt object needs a prompt_string", param="prompt")
        return [text]
    if isinstance(item, list) and _one_sequence(item):
        for piece in item:
            if _is_id(piece) and not 0 <= piece < 2**31:
                raise InvalidRequest("token ids are non-negative", param="prompt")
        return list(item)
    raise InvalidRequest(
        "a prompt is a string, token ids (mixed with strings) or {prompt_string}", param="prompt"
    )


class LlamaTokenProb(ResponseModel):
    id: int
    token: str
    bytes: list[int]
    logprob: float


class LlamaCompletionProbability(LlamaTokenProb):
    top_logprobs: list[LlamaTokenProb]


class LlamaCompletionResult(ResponseModel):
    """``POST /completion`` without ``stream``: one object (a list of them for a list of
    prompts); with ``response_fields``, only those fields, keyed by path."""

    index: int
    content: str
    tokens: list[int] = Field(description="The generated token ids, with return_tokens")
    id_slot: int
    stop: Literal[True]
    model: str
    prompt: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict[str, Any]
    has_new_line: bool
    truncated: bool
    stop_type: StopType
    stopping_word: str
    tokens_cached: int
    timings: Timings
    completion_probabilities: list[LlamaCompletionProbability] | None = None


class LlamaCompletionAnswer(
    RootModel[LlamaCompletionResult | list[LlamaCompletionResult] | dict[str, Any]]
):
    """The final object, a list of them, or the fields named in ``response_fields``."""


# --- tokens, templates, server state --------------------------------------------------------

MAX_DETOKENIZE = 1 << 20


class TokenizeRequest(WireModel):
    model: ModelField = "default"
    content: StrictStr
    add_special: StrictBool = False
    parse_special: StrictBool = True
    with_pieces: StrictBool = False


class TokenPiece(ResponseModel):
    id: int
    piece: str = Field(description="Its text (U+FFFD for a part of a character)")


class TokenizeResponse(ResponseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(WireModel):
    model: ModelField = "default"
    tokens: Annotated[
        list[Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)]],
        Field(max_length=MAX_DETOKENIZE),
    ]


class DetokenizeResponse(ResponseModel):
    content: str


class ApplyTemplateResponse(ResponseModel):
    prompt: str


class Props(ResponseModel):
    default_generation_settings: dict[str, Any]
    total_slots: int
    model_alias: str
    model_path: str
    chat_template: str
    bos_token: str
    eos_token: str
    modalities: dict[str, bool]
    build_info: str
    is_sleeping: bool


class SlotState(ResponseModel):
    id: int
    n_ctx: int
    is_processing: bool


class SlotList(RootModel[list[SlotState]]):
    """One entry per slot of the model."""


class ApplyTemplateRequest(ChatCompletionRequest):
    """OpenAI's chat body; only the messages and tools matter here."""

    add_generation_prompt: StrictBool = True

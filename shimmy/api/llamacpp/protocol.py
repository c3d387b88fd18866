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

from shimmy.api.protocol.common import (
    NonEmptyStr,
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


class InfillRequest(WireModel):
    model: NonEmptyStr = "default"
    input_prefix: StrictStr
    input_suffix: StrictStr
    input_extra: ExtraFiles = Field(default_factory=list)
    prompt: StrictStr = Field("", description="Text after input_prefix: the cursor's line so far")
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
    n_indent: Indent = 0
    t_max_predict_ms: Milliseconds = Field(
        0, description="After this long (from the first token), end at the next newline"
    )
    response_fields: Annotated[list[StrictStr], Field(max_length=MAX_RESPONSE_FIELDS)] | None = None

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
        )

    def sampling_sent(self) -> dict[str, Any]:
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

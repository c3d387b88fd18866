"""Property tests of the request schemas (hypothesis).

Two promises are checked: every request the contract allows validates (and keeps its values),
and *any* JSON at all ends either in a validated request or in ``InvalidRequest`` (a 400) —
never in another exception, which the server would turn into a 500.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shimmy.api.native.protocol import parse_generate_request
from shimmy.api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from shimmy.api.protocol.common import parse_json
from shimmy.api.protocol.common import validate_body as parse_body
from shimmy.errors import InvalidRequest

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)

# --- arbitrary JSON -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
any_json = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)

GENERATE_FIELDS = [
    "model", "prompt", "messages", "system", "max_tokens", "temperature", "top_p", "top_k",
    "repetition_penalty", "repeat_penalty", "seed", "stop", "stream", "keep_alive",
]  # fmt: skip
CHAT_FIELDS = [
    "model", "messages", "temperature", "top_p", "presence_penalty", "frequency_penalty",
    "seed", "stop", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
]  # fmt: skip
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "echo", "logprobs", "best_of", "suffix", "temperature",
    "stop", "n", "stream", "seed",
]  # fmt: skip
EMBEDDING_FIELDS = ["model", "input", "encoding_format", "dimensions"]


def objects_with(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects whose keys are mostly the model's own fields, with any values."""
    keys = st.sampled_from(fields) | st.text(max_size=8)
    return st.dictionaries(keys, any_json, max_size=8)


def mutated(valid: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> Any:
    """A valid request with one field replaced by any JSON value."""
    return st.tuples(valid, st.sampled_from(fields), any_json).map(lambda t: {**t[0], t[1]: t[2]})


def assert_only_invalid_request(action: Callable[[], object]) -> None:
    try:
        action()
    except InvalidRequest as err:
        assert err.status == 400
        assert err.code == "invalid_request"
        assert err.details is None or len(err.details) <= 1000


# --- valid native requests ----------------------------------------------------------------------

text = st.text(max_size=40)
non_empty = st.text(min_size=1, max_size=20)
unit_number = st.floats(min_value=0, max_value=1) | st.integers(0, 1)
durations = st.builds(
    lambda n, unit: f"{n}{unit}",
    st.integers(-5, 10_000),
    st.sampled_from(["", "ms", "s", "m", "h"]),
)
native_content = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))
native_message = st.fixed_dictionaries({"role": non_empty, "content": native_content})
stop_values = st.none() | non_empty | st.lists(non_empty, max_size=16)

optional_native = {
    "model": non_empty,
    "system": text,
    "max_tokens": st.integers(min_value=1),
    "temperature": st.floats(min_value=0, max_value=2) | st.integers(0, 2),
    "top_p": unit_number,
    "top_k": st.integers(0, 2**31 - 1),
    "repetition_penalty": st.floats(min_value=0, exclude_min=True, allow_infinity=False),
    "seed": st.none() | st.integers(0, 2**64 - 1),
    "stop": stop_values,
    "stream": st.booleans(),
    "keep_alive": st.none()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(10**6), 10**9)
    | durations,
}
valid_generate = st.one_of(
    st.fixed_dictionaries({"prompt": text}, optional=optional_native),
    st.fixed_dictionaries(
        {"messages": st.lists(native_message, min_size=1, max_size=4)}, optional=optional_native
    ),
)


@PROPERTY_SETTINGS
@given(data=valid_generate, extra=st.dictionaries(st.text(max_size=8).map("x-{}".format), any_json))
def test_valid_generate_requests_validate(data: dict[str, Any], extra: dict[str, Any]) -> None:
    request = parse_generate_request({**extra, **data})
    assert request.prompt == data.get("prompt")
    assert request.max_tokens == data.get("max_tokens", 100)
    assert request.stream == data.get("stream", False)
    if data.get("stop"):
        expected = [data["stop"]] if isinstance(data["stop"], str) else data["stop"]
        assert request.stop == expected
    if request.messages is not None:
        assert len(request.messages) == len(data["messages"])
    sampling = request.to_input().sampling
    assert sampling.get("temperature", 0.7) == data.get("temperature", 0.7)
    assert request.keep_alive is None or math.isfinite(request.keep_alive)


@PROPERTY_SETTINGS
@given(data=valid_generate)
def test_valid_generate_requests_survive_the_json_text_round_trip(data: dict[str, Any]) -> None:
    raw = json.dumps(data).encode()
    assert parse_generate_request(parse_json(raw)) == parse_generate_request(data)


@PROPERTY_SETTINGS
@given(data=any_json | objects_with(GENERATE_FIELDS) | mutated(valid_generate, GENERATE_FIELDS))
def test_any_json_is_a_generate_request_or_invalid_request(data: Any) -> None:
    assert_only_invalid_request(lambda: parse_generate_request(data))


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_parse_as_json_or_invalid_request(raw: bytes) -> None:
    assert_only_invalid_request(lambda: parse_generate_request(parse_json(raw)))


# --- OpenAI requests ----------------------------------------------------------------------------

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
openai_content = (
    st.none()
    | text
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": text})
    )
)
openai_message = st.fixed_dictionaries({"role": roles, "content": openai_content})
openai_stop = st.none() | text | st.lists(text, max_size=16)
penalty = st.none() | st.floats(min_value=-2, max_value=2)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)},
            optional={"description": text, "parameters": st.just({"type": "object"})},
        ),
    }
)
sampling_fields = {
    "model": non_empty,
    "temperature": st.none() | st.floats(min_value=0, max_value=2),
    "top_p": st.none() | unit_number,
    "presence_penalty": penalty,
    "frequency_penalty": penalty,
    "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
    "stop": openai_stop,
    "n": st.none() | st.just(1),
    "stream": st.none() | st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": text,
}
valid_chat = st.fixed_dictionaries(
    {"messages": st.lists(openai_message, min_size=1, max_size=4)},
    optional={
        **sampling_fields,
        "max_tokens": st.none() | st.integers(min_value=1),
        "max_completion_tokens": st.none() | st.integers(min_value=1),
        "logprobs": st.none() | st.booleans(),
        "response_format": st.none()
        | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
        "tools": st.none() | st.lists(tool, max_size=3),
        "tool_choice": st.none() | st.sampled_from(["none", "auto"]),
    },
)
valid_completion = st.fixed_dictionaries(
    {"prompt": text | st.lists(text, min_size=1, max_size=4)},
    optional={
        **sampling_fields,
        "max_tokens": st.none() | st.integers(min_value=1),
        "echo": st.none() | st.just(False),
        "logprobs": st.none() | st.integers(0, 20),
        "best_of": st.none() | st.just(1),
        "suffix": st.none() | text,
    },
)
valid_embedding = st.fixed_dictionaries(
    {"input": text | st.lists(text, min_size=1, max_size=8)},
    optional={
        "model": non_empty,
        "encoding_format": st.none() | st.sampled_from(["float", "base64"]),
        "dimensions": st.none() | st.integers(min_value=1),
    },
)


def use_chat(request: ChatCompletionRequest) -> None:
    """Everything the chat endpoint derives from a validated request before generating."""
    request.choices()
    request.logprobs_top_n()
    request.requested_max_tokens()
    request.include_usage()
    request.stop_list()
    request.to_input()


def use_completion(request: CompletionRequest) -> None:
    request.candidates()
    request.generation_logprobs()
    for prompt in request.prompts():
        request.to_input(prompt)
    request.stop_list()


def use_embedding(request: EmbeddingRequest) -> None:
    request.inputs()


@PROPERTY_SETTINGS
@given(data=valid_chat)
def test_valid_chat_requests_validate(data: dict[str, Any]) -> None:
    request = parse_body(ChatCompletionRequest, data)
    use_chat(request)
    assert len(request.messages) == len(data["messages"])
    expected_max = data.get("max_completion_tokens") or data.get("max_tokens")
    assert request.requested_max_tokens() == expected_max
    assert all(stop for stop in request.stop_list())


@PROPERTY_SETTINGS
@given(data=valid_completion)
def test_valid_completion_requests_validate(data: dict[str, Any]) -> None:
    request = parse_body(CompletionRequest, data)
    use_completion(request)
    prompt = data["prompt"]
    assert request.prompts() == ([prompt] if isinstance(prompt, str) else prompt)


@PROPERTY_SETTINGS
@given(data=valid_embedding)
def test_valid_embedding_requests_validate(data: dict[str, Any]) -> None:
    request = parse_body(EmbeddingRequest, data)
    given_input = data["input"]
    assert request.inputs() == ([given_input] if isinstance(given_input, str) else given_input)


def parse_and_use(model: type[BaseModel], use: Callable[[Any], None], data: Any) -> None:
    use(parse_body(model, data))


@PROPERTY_SETTINGS
@given(data=any_json | objects_with(CHAT_FIELDS) | mutated(valid_chat, CHAT_FIELDS))
def test_any_json_is_a_chat_request_or_invalid_request(data: Any) -> None:
    assert_only_invalid_request(lambda: parse_and_use(ChatCompletionRequest, use_chat, data))


@PROPERTY_SETTINGS
@given(
    data=any_json | objects_with(COMPLETION_FIELDS) | mutated(valid_completion, COMPLETION_FIELDS)
)
def test_any_json_is_a_completion_request_or_invalid_request(data: Any) -> None:
    assert_only_invalid_request(lambda: parse_and_use(CompletionRequest, use_completion, data))


@PROPERTY_SETTINGS
@given(data=any_json | objects_with(EMBEDDING_FIELDS) | mutated(valid_embedding, EMBEDDING_FIELDS))
def test_any_json_is_an_embedding_request_or_invalid_request(data: Any) -> None:
    assert_only_invalid_request(lambda: parse_and_use(EmbeddingRequest, use_embedding, data))


@PROPERTY_SETTINGS
@given(data=valid_generate, field=st.sampled_from(["temperature", "top_p", "max_tokens"]))
def test_non_finite_numbers_are_refused_by_name(data: dict[str, Any], field: str) -> None:
    raw = json.dumps(data)[:-1] + f', "{field}": NaN}}'
    try:
        parse_generate_request(parse_json(raw))
    except InvalidRequest as err:
        assert err.param == field
    else:
        raise AssertionError(f"NaN accepted for {field}")

"""The OpenAI-compatible API (/v1), driven by the official ``openai`` client against a real
uvicorn.

The tiny model emits random tokens, so tests on it check shapes, bookkeeping and constraints
(a grammar must turn even random tokens into valid JSON), never wording. Wording-level checks
run on the starter model (marked ``starter``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import isolated_settings, run_server
from tiny_gguf import write_tiny_gguf

TINY_N_EMBD = 64
SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One tiny-model server shared by this module's tests (none of them changes its state)."""
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("openai-api"))
    with run_server(settings) as url:
        yield url


def make_client(url: str) -> openai.OpenAI:
    # No retries: a retried 5xx would hide the first failure and add the client's back-off.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return make_client(api_url)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """A small JSON-schema check covering the keywords these tests use."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and set(schema.get("required", [])) <= value.keys()
            and value.keys() <= properties.keys()
            and all(conforms(v, properties[k]) for k, v in value.items())
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
            and all(conforms(item, schema["items"]) for item in value)
        )
    if kind == "string":
        return (
            isinstance(value, str)
            and len(value) <= schema.get("maxLength", len(value))
            and re.search(schema.get("pattern", ""), value) is not None
        )
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"the test validator does not know {schema}")


# Strings are bounded so that even the tiny model's random text ends within max_tokens. The
# bounds are patterns rather than maxLength: a grammar counts code points as llama.cpp decodes
# bytes, and the random model's invalid UTF-8 reaches the client as several U+FFFD each.
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "toys": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{0,8}$"},
            "maxItems": 3,
        },
        "vaccinated": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "toys", "vaccinated"],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_the_validator_used_here_can_fail() -> None:
    assert conforms({"name": "Rex", "age": 2, "kind": "dog", "toys": [], "vaccinated": True}, PET)
    assert not conforms(
        {"name": "Rex", "age": 2, "kind": "cow", "toys": [], "vaccinated": True}, PET
    )
    assert not conforms({"name": "Rex", "age": 2, "kind": "dog", "toys": []}, PET)


# --- chat completions -------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=user("Hello there"), max_tokens=8, seed=7
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    assert reply.system_fingerprint is not None and reply.system_fingerprint.startswith("shimmy-")
    assert reply.created > 0
    [choice] = reply.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.tool_calls is None
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    # "length" exactly when the token budget was used up
    assert choice.finish_reason == ("length" if usage.completion_tokens == 8 else "stop")


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=user("Count"), max_completion_tokens=3, seed=1
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 3


def test_same_seed_gives_same_reply(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        reply = client.chat.completions.create(
            model="tiny", messages=user("Determinism"), max_tokens=12, seed=42, temperature=0.9
        )
        return reply.choices[0].message.content

    assert ask() == ask()


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = user("A prompt that is sent twice, so its prefix is cached the second time.")
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 < cached < second.usage.prompt_tokens


def test_content_parts_are_read_like_text(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    as_parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=2
    )
    as_text = client.chat.completions.create(
        model="tiny", messages=user("First part.\nSecond part."), max_tokens=2
    )
    assert as_parts.usage is not None and as_text.usage is not None
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_non_text_content_parts_are_refused(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [image]}], max_tokens=2
        )
    assert "image_url" in caught.value.message


def test_all_roles_and_a_tool_history_render(client: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks"},
    ]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, tools=[TIME_TOOL], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("hi"),
        max_tokens=2,
        user="someone",
        metadata={"k": "v"},
        extra_body={"cache_prompt": True, "min_p": 0.1, "some_editor_flag": {"x": 1}},
    )
    assert reply.choices[0].message.role == "assistant"


def test_streamed_chat_chunk_sequence(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("Stream please"),
        max_tokens=10,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, finish_chunk, usage_chunk = chunks
    assert all(c.choices[0].finish_reason is None for c in body)
    assert all(c.usage is None for c in [*body, finish_chunk])
    assert finish_chunk.choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert usage_chunk.usage.completion_tokens <= 10
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )
    # Streaming and not streaming produce the same text for the same seed.
    same = client.chat.completions.create(
        model="tiny", messages=user("Stream please"), max_tokens=10, seed=3
    )
    assert same.choices[0].message.content == text


def test_stream_without_include_usage_has_no_usage_chunk(api_url: str) -> None:
    body = {"model": "tiny", "messages": user("x"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    blocks = raw.strip().split("\n\n")
    assert blocks[-1] == "data: [DONE]"
    events = [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]
    assert all("usage" not in event for event in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"][0]["delta"] == {}


# --- structured output ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_mode_always_parses(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("Describe a pet as JSON."),
        response_format={"type": "json_object"},
        max_tokens=600,
        seed=seed,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_output_matches_the_schema(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("Describe a pet."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": PET, "strict": True},
        },
        max_tokens=600,
        seed=seed,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert conforms(json.loads(choice.message.content), PET)


def test_streamed_json_schema_output_matches_the_schema(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("Describe a pet."),
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}},
        max_tokens=600,
        seed=5,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert conforms(json.loads(text), PET)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
        {"type": "yaml"},
    ],
)
def test_malformed_response_format_is_a_bad_request(
    client: openai.OpenAI, response_format: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny",
            messages=user("x"),
            response_format=response_format,
        )
    assert caught.value.body is not None
    assert caught.value.body["param"].startswith("response_format")


# --- tool calls -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_named_tool_choice_forces_a_valid_call(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("What is the weather in Oslo?"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300,
        seed=seed,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert conforms(arguments, WEATHER_TOOL["function"]["parameters"])


def test_required_tool_choice_calls_one_of_the_tools(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("Use a tool."),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        max_tokens=300,
        seed=11,
    )
    [call] = reply.choices[0].message.tool_calls or []
    tools = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}
    assert call.function.name in tools
    schema = tools[call.function.name]["function"]["parameters"]
    assert conforms(json.loads(call.function.arguments), schema)
    assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_forced_tool_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("Weather?"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300,
        seed=2,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    [call] = calls
    assert call.index == 0
    assert call.function is not None and call.function.name == "get_weather"
    assert call.function.arguments is not None
    assert conforms(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()


def test_tool_choice_none_never_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("Weather?"),
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=5,
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("tools", "tool_choice"),
    [
        ([WEATHER_TOOL], {"type": "function", "function": {"name": "not_offered"}}),
        (None, "required"),
    ],
)
def test_impossible_tool_choice_is_a_bad_request(
    client: openai.OpenAI, tools: Any, tool_choice: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=user("x"), tools=tools or openai.omit, tool_choice=tool_choice
        )
    assert caught.value.body["param"] == "tool_choice"


# A schema with a constant makes even the tiny model write a known text.
TIME_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_time"},
        "arguments": {"type": "object", "properties": {}},
    },
    "required": ["name", "arguments"],
}


def test_auto_tool_choice_recognises_a_call_in_the_reply(client: openai.OpenAI) -> None:
    forced_text = {"type": "json_schema", "json_schema": {"name": "c", "schema": TIME_CALL_SCHEMA}}
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("What time is it?"),
        tools=[TIME_TOOL],
        response_format=forced_text,
        max_tokens=200,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("What time is it?"),
        tools=[TIME_TOOL],
        response_format=forced_text,
        max_tokens=200,
        stream=True,
    )
    chunks = list(stream)
    [streamed] = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed.function is not None and streamed.function.name == "get_time"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_same_reply_is_plain_content(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=user("What time is it?"),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": TIME_CALL_SCHEMA},
        },
        max_tokens=200,
    )
    assert reply.choices[0].message.tool_calls is None
    assert json.loads(reply.choices[0].message.content or "")["name"] == "get_time"


@pytest.mark.parametrize("stop", ["STOP", ["nothing", "STOP"]])
def test_stop_strings_cut_the_reply(client: openai.OpenAI, stop: Any) -> None:
    known = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"const": "ab STOP cd"}}}
    reply = client.chat.completions.create(
        model="tiny", messages=user("x"), response_format=known, stop=stop, max_tokens=200
    )
    assert reply.choices[0].message.content == '"ab '
    assert reply.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=user("x"), max_tokens=4, logprobs=True, top_logprobs=2, seed=1
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and reply.usage is not None
    assert len(logprobs.content) == reply.usage.completion_tokens
    for token in logprobs.content:
        assert token.logprob <= 0
        assert 1 <= len(token.top_logprobs) <= 2
        assert token.bytes == list(token.token.encode())


TEMPLATE_BODY = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.mark.parametrize(
    ("template", "described_in_a_system_note"),
    [
        # The template takes tools itself (this one then ignores them): no note is added.
        ("{# renders tools #}" + TEMPLATE_BODY, False),
        # The template knows nothing of tools: they are described in a system note.
        (TEMPLATE_BODY, True),
    ],
)
def test_tools_are_described_only_to_templates_without_tool_support(
    tmp_path: Path, server_factory: Any, template: str, described_in_a_system_note: bool
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    write_tiny_gguf(folder / "templated.gguf", chat_template=template)
    client = make_client(server_factory(isolated_settings(folder, tmp_path)))

    def prompt_tokens(**tools: Any) -> int:
        reply = client.chat.completions.create(
            model="templated", messages=user("Weather?"), max_tokens=1, **tools
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    plain = prompt_tokens()
    with_tools = prompt_tokens(tools=[WEATHER_TOOL])
    assert (with_tools > plain) is described_in_a_system_note
    assert prompt_tokens(tools=[WEATHER_TOOL], tool_choice="none") == plain


# --- text completions -------------------------------------------------------------------------


def test_completion_single_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert reply.model == "tiny"
    [choice] = reply.choices
    assert choice.index == 0
    assert isinstance(choice.text, str)
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 6 else "stop")


def test_completion_defaults_to_openai_max_tokens(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Default length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 16


def test_completion_list_of_prompts(client: openai.OpenAI) -> None:
    prompts = ["The first prompt", "A second, rather longer prompt than the first"]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, seed=9)
    assert [choice.index for choice in reply.choices] == [0, 1]
    singles = [
        client.completions.create(model="tiny", prompt=p, max_tokens=4, seed=9) for p in prompts
    ]
    # Each choice is the completion of its own prompt.
    assert [c.text for c in reply.choices] == [s.choices[0].text for s in singles]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_streamed_completion(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="tiny",
        prompt="Streaming text",
        max_tokens=8,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *body, finish_chunk, usage_chunk = chunks
    assert all(c.object == "text_completion" for c in chunks)
    assert all(c.choices[0].finish_reason is None for c in body)
    assert finish_chunk.choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    text = "".join(c.choices[0].text for c in [*body, finish_chunk])
    whole = client.completions.create(model="tiny", prompt="Streaming text", max_tokens=8, seed=4)
    assert whole.choices[0].text == text


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny", prompt="Probabilities", max_tokens=5, logprobs=2, seed=1
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and reply.usage is not None
    n = reply.usage.completion_tokens
    assert logprobs.tokens is not None and len(logprobs.tokens) == n
    assert logprobs.token_logprobs is not None and len(logprobs.token_logprobs) == n
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"n": 2, "stream": True}, "n"),
        ({"n": 17}, "n"),
        ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ],
)
def test_impossible_completion_options_are_bad_requests(
    client: openai.OpenAI, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="x", **options)
    assert caught.value.body["param"] == param


# --- models -----------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [model.id for model in models.data]
    assert ids == ["tiny"]
    model = models.data[0]
    assert model.object == "model" and model.owned_by == "shimmy" and model.created > 0
    assert client.models.retrieve("tiny").id == "tiny"


def test_unknown_model_is_not_found(client: openai.OpenAI, api_url: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=user("x"))
    assert caught.value.code == "model_not_found"
    body = httpx.get(f"{api_url}/v1/models/no-such-model", timeout=30).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


# --- embeddings -------------------------------------------------------------------------------


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    texts = ["first text", "a second text"]
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == TINY_N_EMBD for d in floats.data)
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    encoded = client.embeddings.create(model="tiny", input=texts, encoding_format="base64")
    for as_float, as_b64 in zip(floats.data, encoded.data, strict=True):
        raw = as_b64.embedding
        assert isinstance(raw, str)
        decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        np.testing.assert_allclose(decoded, as_float.embedding, rtol=1e-6)
    assert not np.allclose(floats.data[0].embedding, floats.data[1].embedding)
    # Left to itself the client asks for base64 and decodes it.
    default = client.embeddings.create(model="tiny", input="first text")
    np.testing.assert_allclose(default.data[0].embedding, floats.data[0].embedding, rtol=1e-6)


def test_embedding_token_ids_outside_cl100k_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny", input=[[1, 2, 10**7]])
    assert caught.value.body["param"] == "input"
    assert "cl100k" in caught.value.message


# --- errors -----------------------------------------------------------------------------------


def test_streaming_several_chat_choices_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=user("x"), n=2, stream=True)
    assert caught.value.body["param"] == "n"
    assert caught.value.code == "invalid_request"


def test_out_of_range_temperature_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=user("x"), temperature=5)
    assert caught.value.body["param"] == "temperature"


def test_missing_messages_is_a_bad_request(api_url: str) -> None:
    response = httpx.post(f"{api_url}/v1/chat/completions", json={"model": "tiny"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("stream", [False, True])
def test_too_long_a_prompt_is_context_length_exceeded(client: openai.OpenAI, stream: bool) -> None:
    long_text = "word " * 3000  # the tiny server's context is 1024 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=user(long_text), max_tokens=4, stream=stream
        )
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "messages"


def test_completion_prompt_too_long(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=["short", "word " * 3000], max_tokens=2)
    assert caught.value.code == "context_length_exceeded"


def test_server_busy_is_503(tiny_model_dir: Path, tmp_path: Path, server_factory: Any) -> None:
    # One slot and no queue: while a long stream holds the slot, the next request is refused.
    settings = isolated_settings(tiny_model_dir, tmp_path, parallel=1, max_queue=0, ctx_size=4096)
    client = make_client(server_factory(settings))
    stream = client.chat.completions.create(
        model="tiny", messages=user("hold the slot"), max_tokens=4000, stream=True
    )
    with stream:
        next(iter(stream))  # the request has its slot
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="tiny", messages=user("x"), max_tokens=1)
    assert caught.value.status_code == 503


# --- the starter model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starter_client(starter_server: str) -> openai.OpenAI:
    return make_client(starter_server)


def starter_model_id(client: openai.OpenAI) -> str:
    [model] = client.models.list().data
    return model.id


@pytest.mark.starter
def test_starter_chat_reply_is_text(starter_client: openai.OpenAI) -> None:
    reply = starter_client.chat.completions.create(
        model=starter_model_id(starter_client),
        messages=[{"role": "user", "content": "Say hello to me in one short sentence."}],
        max_tokens=40,
        temperature=0,
    )
    content = reply.choices[0].message.content
    assert content is not None and content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.starter
def test_starter_json_schema_reply_validates(starter_client: openai.OpenAI) -> None:
    reply = starter_client.chat.completions.create(
        model=starter_model_id(starter_client),
        messages=[{"role": "user", "content": "Invent a pet and describe it."}],
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}},
        max_tokens=300,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert conforms(json.loads(choice.message.content), PET)


@pytest.mark.starter
def test_starter_forced_tool_call(starter_client: openai.OpenAI) -> None:
    reply = starter_client.chat.completions.create(
        model=starter_model_id(starter_client),
        messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=100,
        temperature=0,
    )
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert conforms(arguments, WEATHER_TOOL["function"]["parameters"])
    assert "paris" in arguments["city"].lower()

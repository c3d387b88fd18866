"""Anthropic's Messages API (/v1/messages), driven by the official ``anthropic`` SDK against a
real uvicorn: create, stream, tools round trip, count_tokens, errors and keys.

The tiny model emits random tokens, so tests check shapes, bookkeeping and constraints (a
forced tool call's input must match its schema), never wording.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from conftest import isolated_settings, run_server

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("anthropic"))
    with run_server(settings) as url:
        yield url


def make_client(url: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(api_url: str) -> anthropic.Anthropic:
    return make_client(api_url)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def valid_weather(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"city", "unit"}
        and isinstance(value["city"], str)
        and value["unit"] in ("celsius", "fahrenheit")
    )


def test_message_shape_and_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="tiny", max_tokens=12, messages=user("Hello"), system="Be brief."
    )
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "tiny"
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert message.stop_sequence is None
    assert message.usage.output_tokens == 12 or message.stop_reason == "end_turn"
    counted = client.messages.count_tokens(model="tiny", messages=user("Hello"), system="Be brief.")
    assert message.usage.input_tokens == counted.input_tokens > 0


def test_system_turns_and_blocks_all_reach_the_prompt(client: anthropic.Anthropic) -> None:
    def count(**kwargs: Any) -> int:
        return client.messages.count_tokens(model="tiny", **kwargs).input_tokens

    plain = count(messages=user("Hi"))
    assert count(messages=user("Hi"), system="Answer in French.") > plain
    # A system prompt as text blocks reads like the string.
    assert count(messages=user("Hi"), system=[{"type": "text", "text": "Answer in French."}]) == (
        count(messages=user("Hi"), system="Answer in French.")
    )
    blocks = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert count(messages=blocks) == plain
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me more."},
    ]
    assert count(messages=turns) > plain
    assert count(messages=user("Hi"), tools=[WEATHER]) > plain


def test_sampling_options_and_stop_sequences(client: anthropic.Anthropic) -> None:
    def greedy(**kwargs: Any) -> Any:
        # Sampling fields go in extra_body: the newest SDK no longer offers them, older ones
        # (and other clients) still send them.
        sampling = {"temperature": 0, "top_p": 0.5, "top_k": 5}
        return client.messages.create(
            model="tiny", max_tokens=24, messages=user("Go"), extra_body=sampling, **kwargs
        )

    text = greedy().content[0].text
    stop = next(c for c in text[2:] if c != "\ufffd")  # a character the reply goes on to write
    cut = greedy(stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence"
    assert cut.stop_sequence == stop
    assert text.startswith(cut.content[0].text) if cut.content else True
    assert stop not in (cut.content[0].text if cut.content else "")


@pytest.mark.parametrize("attempt", [1, 2])  # two random samples
def test_structured_output_follows_the_schema(client: anthropic.Anthropic, attempt: int) -> None:
    schema = WEATHER["input_schema"]
    message = client.messages.create(
        model="tiny",
        max_tokens=200,
        messages=user("Weather as JSON"),
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert message.stop_reason == "end_turn"
    assert valid_weather(json.loads(message.content[0].text))


def test_stream_event_sequence(api_url: str) -> None:
    body = {"model": "tiny", "max_tokens": 6, "stream": True, "messages": user("Hi")}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
    with httpx.stream("POST", f"{api_url}/v1/messages", json=body, headers=headers) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names  # every event is named after its type
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = data[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    delta = data[-2]
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn")
    assert delta["usage"]["output_tokens"] == 6 or delta["delta"]["stop_reason"] == "end_turn"


def test_sdk_stream_accumulates_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="tiny", max_tokens=10, messages=user("Hi")) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(texts)
    assert final.usage.input_tokens > 0
    events = client.messages.create(model="tiny", max_tokens=3, messages=user("Hi"), stream=True)
    assert [e.type for e in events][-1] == "message_stop"


@pytest.mark.parametrize("seed_text", ["Weather in Oslo?", "And in Rome?"])
def test_tools_round_trip(client: anthropic.Anthropic, seed_text: str) -> None:
    message = client.messages.create(
        model="tiny",
        max_tokens=300,
        messages=user(seed_text),
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert valid_weather(call.input)
    assert not [b for b in message.content if b.type == "text"]
    history = [
        *user(seed_text),
        {"role": "assistant", "content": message.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"},
                {"type": "text", "text": "Thanks, summarize."},
            ],
        },
    ]
    answer = client.messages.create(model="tiny", max_tokens=5, messages=history, tools=[WEATHER])
    assert answer.stop_reason in ("max_tokens", "end_turn", "tool_use")
    assert answer.usage.input_tokens > message.usage.input_tokens


def test_streamed_tool_use(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="tiny",
        max_tokens=300,
        messages=user("Weather?"),
        tools=[WEATHER],
        tool_choice={"type": "any"},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]
    assert final.stop_reason == "tool_use"
    [call] = final.content
    assert call.type == "tool_use" and valid_weather(call.input)


def test_cut_off_forced_tool_call_has_no_raw_json(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="tiny",
        max_tokens=3,
        messages=user("Weather?"),
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "max_tokens"
    assert message.content == []


def test_errors_have_anthropics_shape(client: anthropic.Anthropic, api_url: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=5, messages=user("x"))
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(
            model="tiny",
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
        )
    assert image.value.body["error"]["type"] == "invalid_request_error"
    assert "'image'" in image.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="tiny", max_tokens=5, messages=user("x"), extra_body={"temperature": 1.5}
        )
    with pytest.raises(anthropic.BadRequestError) as prefill:
        client.messages.create(
            model="tiny",
            max_tokens=5,
            messages=[*user("x"), {"role": "assistant", "content": "Sure,"}],
        )
    assert "prefill" in prefill.value.message
    with pytest.raises(anthropic.BadRequestError) as hosted:
        client.messages.create(
            model="tiny",
            max_tokens=5,
            messages=user("x"),
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "web_search_20250305" in hosted.value.message
    # max_tokens is required, as in Anthropic's API (the SDK would not send the request).
    raw = httpx.post(f"{api_url}/v1/messages", json={"model": "tiny", "messages": user("x")})
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in raw.json()["error"]["message"]
    # The server keeps serving.
    assert client.messages.create(model="tiny", max_tokens=2, messages=user("x")).content


def test_x_api_key_is_the_servers_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, api_key="s3cret")
    with run_server(settings) as url:
        good = make_client(url, "s3cret")  # the SDK sends it as x-api-key
        assert good.messages.create(model="tiny", max_tokens=2, messages=user("x")).content
        assert good.messages.count_tokens(model="tiny", messages=user("x")).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError) as caught:
            make_client(url, "wrong").messages.create(
                model="tiny", max_tokens=2, messages=user("x")
            )
        assert caught.value.body["error"]["type"] == "authentication_error"

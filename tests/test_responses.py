"""OpenAI's Responses API (/v1/responses), driven by the official ``openai`` client against a
real uvicorn: plain, streamed, tools, JSON schema, previous_response_id and the bounded store.

The tiny model emits random tokens, so tests check shapes, bookkeeping and constraints, never
wording.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import isolated_settings, run_server

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,10}$"},
        "age": {"type": "integer"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def valid_weather(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"city", "unit"}
        and isinstance(value["city"], str)
        and value["unit"] in ("celsius", "fahrenheit")
    )


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("responses"))
    with run_server(settings) as url:
        yield url


def make_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return make_client(api_url)


def test_plain_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tiny", input="Hello", max_output_tokens=10)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant"
    assert response.output_text and item.content[0].type == "output_text"
    assert response.usage is not None and response.usage.input_tokens > 0
    if response.status == "incomplete":  # the tiny model (almost) never ends by itself
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 10
    else:
        assert response.status == "completed"
    told = client.responses.create(
        model="tiny", input="Hello", instructions="Be brief.", max_output_tokens=1
    )
    assert told.instructions == "Be brief."
    assert told.usage is not None and told.usage.input_tokens > response.usage.input_tokens


def test_item_input_reads_every_role(client: openai.OpenAI) -> None:
    items: Any = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello"}],
        },
        {"role": "user", "content": "And now?"},
    ]
    response = client.responses.create(model="tiny", input=items, max_output_tokens=2)
    short = client.responses.create(model="tiny", input="And now?", max_output_tokens=2)
    assert response.usage is not None and short.usage is not None
    assert response.usage.input_tokens > short.usage.input_tokens


def test_streamed_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(model="tiny", input="Hi", max_output_tokens=6, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas
    assert events[0].response.status == "in_progress"  # type: ignore[union-attr]
    # The streamed response is stored like any other.
    assert client.responses.retrieve(final.id).output_text == deltas


def test_forced_function_call_and_its_output(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="tiny",
        input="Weather in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=300,
    )
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert valid_weather(json.loads(call.arguments))
    assert response.status == "completed"
    answer = client.responses.create(
        model="tiny",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=4,
    )
    assert answer.previous_response_id == response.id
    assert answer.usage is not None and response.usage is not None
    # The continuation read the first turn, the call and its result.
    assert answer.usage.input_tokens > response.usage.input_tokens + response.usage.output_tokens


def test_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="tiny",
        input="Weather?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=300,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.output_text.delta" not in kinds
    [call] = final.output
    assert call.type == "function_call" and valid_weather(json.loads(call.arguments))


def test_cut_off_forced_call_is_incomplete_without_json(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="tiny",
        input="Weather?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=3,  # type: ignore[list-item]
    )
    assert response.status == "incomplete"
    assert response.output == [] and response.output_text == ""


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_format(client: openai.OpenAI, stream: bool) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "pet", "schema": PET, "strict": True}}
    if stream:
        with client.responses.stream(
            model="tiny", input="A pet", text=text, max_output_tokens=200
        ) as events:
            output = events.get_final_response().output_text
    else:
        output = client.responses.create(
            model="tiny", input="A pet", text=text, max_output_tokens=200
        ).output_text
    pet = json.loads(output)
    assert set(pet) == {"name", "age"} and isinstance(pet["age"], int)


def test_previous_response_id_carries_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="tiny", input="My name is Ada.", max_output_tokens=5)
    second = client.responses.create(
        model="tiny", input="What is it?", previous_response_id=first.id, max_output_tokens=5
    )
    alone = client.responses.create(model="tiny", input="What is it?", max_output_tokens=5)
    assert second.usage is not None and alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="tiny", input="x", previous_response_id="resp_nope")
    assert caught.value.body["param"] == "previous_response_id"


def test_retrieve_delete_and_store_false(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tiny", input="Keep me", max_output_tokens=3)
    fetched = client.responses.retrieve(response.id)
    assert fetched.id == response.id and fetched.output_text == response.output_text
    deleted = client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    unstored = client.responses.create(model="tiny", input="x", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_input_items_list_a_responses_own_input(client: openai.OpenAI) -> None:
    first = client.responses.create(model="tiny", input="Hello there", max_output_tokens=2)
    [item] = client.responses.input_items.list(first.id).data
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert [part.text for part in item.content] == ["Hello there"]  # type: ignore[union-attr]
    turns = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "three"},
        {"role": "user", "content": "four"},
    ]
    second = client.responses.create(
        model="tiny", input=turns, previous_response_id=first.id, max_output_tokens=2
    )
    newest_first = client.responses.input_items.list(second.id).data
    # Only this response's own input, newest first (OpenAI's default order).
    assert [i.type for i in newest_first] == [
        "message", "function_call_output", "function_call", "message", "message"
    ]  # fmt: skip
    assert newest_first[1].output == "three"  # type: ignore[union-attr]
    assert newest_first[2].call_id == "call_1" and newest_first[2].name == "f"  # type: ignore[union-attr]
    oldest = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.id for i in oldest.data] == [i.id for i in reversed(newest_first)][:2]
    assert oldest.has_more is True
    rest = client.responses.input_items.list(second.id, order="asc", after=oldest.data[-1].id)
    assert [i.id for i in rest.data] == [i.id for i in reversed(newest_first)][2:]
    assert rest.has_more is False
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, after="msg_nope")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, limit=0)
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(second.id)


def test_store_drops_the_least_recently_used(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, responses_store_size=2)
    with run_server(settings) as url:
        client = make_client(url)
        ids = [
            client.responses.create(model="tiny", input=f"{i}", max_output_tokens=1).id
            for i in range(2)
        ]
        client.responses.retrieve(ids[0])  # used: ids[1] is now the oldest
        ids.append(client.responses.create(model="tiny", input="2", max_output_tokens=1).id)
        assert client.responses.retrieve(ids[0]).id == ids[0]
        assert client.responses.retrieve(ids[2]).id == ids[2]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[1])


def test_bad_input_is_a_clear_bad_request(client: openai.OpenAI, api_url: str) -> None:
    image: Any = [
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png,x"}]}
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="tiny", input=image)
    assert "input_image" in caught.value.message
    with pytest.raises(openai.BadRequestError) as hosted:
        client.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])
    assert "web_search" in hosted.value.message
    body = httpx.post(f"{api_url}/v1/responses", json={"model": "tiny"}, timeout=30).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "input"
    assert client.responses.create(model="tiny", input="still here", max_output_tokens=1).id

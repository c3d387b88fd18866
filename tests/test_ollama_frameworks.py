"""Frameworks that speak Ollama's API, against a real server on Ollama's own port and under
``/ollama``: LangChain's ``ChatOllama`` (langchain-ollama) and litellm's ``ollama_chat``
provider. The tiny model's words are random; shapes, counts and constraints are checked."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import isolated_settings
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from ollama_helpers import Ports, run_with_ollama_port
from pydantic import BaseModel, Field
from test_ollama import TIME_CALL_SCHEMA

# litellm fetches its price list from the internet at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm


@pytest.fixture(scope="module")
def ports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("ollama-frameworks"))
    with run_with_ollama_port(settings) as running:
        yield running


@pytest.fixture(params=["listener", "prefix"])
def base(request: pytest.FixtureRequest, ports: Ports) -> str:
    return ports.ollama_url if request.param == "listener" else ports.prefixed


@tool
def get_time() -> str:
    """The current time."""
    return "12:00"


class Weather(BaseModel):
    city: str = Field(max_length=12)
    sunny: bool


# --- LangChain ----------------------------------------------------------------------------------


def test_chat_ollama_invoke_and_stream(base: str) -> None:
    llm = ChatOllama(model="tiny", base_url=base, num_predict=4, temperature=0)
    reply = llm.invoke("Hello")
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.usage_metadata is not None
    assert 1 <= reply.usage_metadata["output_tokens"] <= 4
    assert reply.response_metadata["done_reason"] in ("length", "stop")
    chunks = list(llm.stream("Hello"))
    assert chunks and all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert "".join(str(chunk.content) for chunk in chunks) == reply.content


def test_chat_ollama_bind_tools(base: str) -> None:
    # The format makes the random model write a call; with the tool bound, it is one.
    llm = ChatOllama(
        model="tiny", base_url=base, num_predict=120, temperature=0, format=TIME_CALL_SCHEMA
    )
    reply = llm.bind_tools([get_time]).invoke("What time is it?")
    assert isinstance(reply, AIMessage)
    [call] = reply.tool_calls
    assert (call["name"], call["args"]) == ("get_time", {})
    plain = ChatOllama(model="tiny", base_url=base, num_predict=4, temperature=0)
    assert isinstance(plain.bind_tools([get_time]).invoke("Hi"), AIMessage)


def test_chat_ollama_with_structured_output(base: str) -> None:
    llm = ChatOllama(model="tiny", base_url=base, num_predict=120, seed=3)
    weather = llm.with_structured_output(Weather).invoke("Weather in Paris?")
    assert isinstance(weather, Weather)
    as_json = llm.with_structured_output(None, method="json_mode").invoke("JSON please")
    assert isinstance(as_json, dict)


# --- litellm ------------------------------------------------------------------------------------


def test_litellm_ollama_chat(base: str) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    reply: Any = litellm.completion(
        model="ollama_chat/tiny", api_base=base, messages=messages, max_tokens=4, temperature=0
    )
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 1 <= reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 1
    stream: Any = litellm.completion(
        model="ollama_chat/tiny",
        api_base=base,
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == choice.message.content


def test_litellm_ollama_chat_json(base: str) -> None:
    reply: Any = litellm.completion(
        model="ollama_chat/tiny",
        api_base=base,
        messages=[{"role": "user", "content": "JSON"}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_litellm_ollama_chat_tool_calls(base: str) -> None:
    time_tool = {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    }
    reply: Any = litellm.completion(
        model="ollama_chat/tiny",
        api_base=base,
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[time_tool],
        max_tokens=120,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "call", "schema": TIME_CALL_SCHEMA},
        },
    )
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})

"""Ollama's API, driven by the official ``ollama`` Python client against a real server, both on
Ollama's own port (``serve --ollama``) and under ``/ollama`` on the main port.

The tiny model writes random tokens: tests check shapes, counts and constraints (a grammar
makes even random tokens valid JSON), never wording. Greedy decoding (temperature 0) makes its
output repeatable, so streamed and whole answers can be compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from conftest import TINY_ID, isolated_settings
from ollama_helpers import Ports, run_with_ollama_port

from shimmy.api.ollama.names import human_number

GREEDY = {"temperature": 0, "num_predict": 4}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time",
        "parameters": {"type": "object", "properties": {}},
    },
}
# A reply shaped like a call of get_time: with tools offered, it is read as one.
TIME_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_time"},
        "arguments": {"type": "object", "properties": {}},
    },
    "required": ["name", "arguments"],
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
}


@pytest.fixture(scope="module")
def ports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    """One server for the tests that leave nothing behind (a loaded model at most)."""
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("ollama"))
    with run_with_ollama_port(settings) as running:
        yield running


@pytest.fixture(params=["listener", "prefix"])
def base(request: pytest.FixtureRequest, ports: Ports) -> str:
    """Where Ollama's clients are pointed: its own port, or /ollama on the main port."""
    return ports.ollama_url if request.param == "listener" else ports.prefixed


@pytest.fixture
def client(base: str) -> ollama.Client:
    return ollama.Client(host=base, timeout=120)


def chat_user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_ollama_is_running(base: str) -> None:
    assert httpx.get(f"{base}/").text == "Ollama is running"
    assert httpx.head(f"{base}/").status_code == 200
    assert httpx.get(f"{base}/api/version").json()["version"].count(".") == 2


def test_list_and_show(client: ollama.Client, tiny_model_path: Path) -> None:
    [model] = client.list().models
    assert model.model == "tiny:latest"
    assert model.size == tiny_model_path.stat().st_size
    assert model.details is not None
    assert (model.details.format, model.details.family) == ("gguf", "llama")
    assert model.details.quantization_level == "F32"
    assert model.modified_at is not None and model.modified_at.tzinfo is not None
    shown = client.show("tiny")
    assert shown == client.show("tiny:latest")
    assert shown.details == model.details
    assert shown.modelinfo is not None
    # The context the server really serves (ctx_size 1024), which clients size prompts by.
    assert shown.modelinfo["llama.context_length"] == 1024
    assert "num_ctx 1024" in (shown.parameters or "")
    assert shown.capabilities is not None and "completion" in shown.capabilities


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model="tiny", prompt="Hello", options=GREEDY)
    assert reply.done is True
    assert reply.model == "tiny"
    assert isinstance(reply.response, str)
    assert reply.done_reason in ("length", "stop")
    assert reply.eval_count is not None and 1 <= reply.eval_count <= 4
    assert reply.done_reason == "stop" or reply.eval_count == 4
    assert reply.prompt_eval_count is not None and reply.prompt_eval_count > 1
    durations = [reply.load_duration, reply.prompt_eval_duration, reply.eval_duration]
    assert all(isinstance(d, int) and d >= 0 for d in durations)
    assert reply.total_duration is not None and reply.total_duration >= sum(durations)
    assert reply.context and all(isinstance(token, int) for token in reply.context)
    created = datetime.fromisoformat(str(reply.created_at).replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - created) < timedelta(hours=1)


def test_generate_streams_the_same_text(client: ollama.Client) -> None:
    whole = client.generate(model="tiny", prompt="Stream", options=GREEDY)
    chunks = list(client.generate(model="tiny", prompt="Stream", options=GREEDY, stream=True))
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(chunk.response for chunk in chunks) == whole.response
    last = chunks[-1]
    assert last.response == ""
    assert (last.eval_count, last.done_reason) == (whole.eval_count, whole.done_reason)
    assert last.context == whole.context


def test_streaming_is_the_default(base: str) -> None:
    body = {"model": "tiny", "prompt": "x", "options": GREEDY}
    with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines()]
    assert lines[-1]["done"] is True and not any(line["done"] for line in lines[:-1])


def test_raw_prompts_skip_the_template_and_return_no_context(client: ollama.Client) -> None:
    templated = client.generate(model="tiny", prompt="abc", options=GREEDY)
    raw = client.generate(model="tiny", prompt="abc", raw=True, options=GREEDY)
    assert raw.context is None
    # The bytes a, b, c and the BOS token: nothing else was put around the prompt.
    assert raw.prompt_eval_count == 4
    assert templated.prompt_eval_count is not None and templated.prompt_eval_count > 4
    with pytest.raises(ollama.ResponseError, match="raw mode does not support") as caught:
        client.generate(model="tiny", prompt="abc", raw=True, system="s", options=GREEDY)
    assert caught.value.status_code == 400


def test_context_continues_the_conversation(client: ollama.Client) -> None:
    first = client.generate(model="tiny", prompt="One", options=GREEDY)
    assert first.context
    second = client.generate(model="tiny", prompt="Two", context=first.context, options=GREEDY)
    assert second.context is not None
    assert list(second.context[: len(first.context)]) == list(first.context)
    assert second.prompt_eval_count is not None
    assert second.prompt_eval_count > len(first.context)
    with pytest.raises(ollama.ResponseError, match="outside the vocabulary") as caught:
        client.generate(model="tiny", prompt="x", context=[10**9], options=GREEDY)
    assert caught.value.status_code == 400


def test_a_request_template_is_run(client: ollama.Client) -> None:
    template = "{{ if .System }}{{ .System }}|{{ end }}{{ .Prompt }}|{{ .Response }}ignored"
    with_system = client.generate(
        model="tiny", prompt="P", system="S", template=template, options=GREEDY
    )
    without = client.generate(model="tiny", prompt="P", template=template, options=GREEDY)
    # BOS + "S|P|" against BOS + "P|": the byte-level tiny vocabulary counts characters.
    assert (with_system.prompt_eval_count, without.prompt_eval_count) == (5, 3)
    with pytest.raises(ollama.ResponseError, match=r"range \.Messages") as caught:
        client.generate(model="tiny", prompt="P", template="{{ range .Messages }}{{ end }}")
    assert caught.value.status_code == 400


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(model="tiny", messages=chat_user("Hi"), options=GREEDY)
    assert reply.message.role == "assistant"
    assert isinstance(reply.message.content, str)
    assert reply.done is True and reply.done_reason in ("length", "stop")
    assert reply.eval_count is not None and reply.eval_count <= 4
    chunks = list(client.chat(model="tiny", messages=chat_user("Hi"), options=GREEDY, stream=True))
    assert chunks[-1].done is True
    assert "".join(chunk.message.content or "" for chunk in chunks) == reply.message.content


def test_chat_with_history_and_tool_results(client: ollama.Client) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}],
        },
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
    ]
    reply = client.chat(model="tiny", messages=messages, tools=[TIME_TOOL], options=GREEDY)
    assert reply.done is True


def test_format_json_and_schemas(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 120}
    reply = client.chat(model="tiny", messages=chat_user("JSON!"), format="json", options=options)
    assert isinstance(json.loads(reply.message.content or ""), dict)
    for seed in (1, 2):
        shaped = client.chat(
            model="tiny",
            messages=chat_user("Weather?"),
            format=CITY_SCHEMA,
            options={"num_predict": 120, "seed": seed},
        )
        value = json.loads(shaped.message.content or "")
        assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)
        assert len(value["city"]) <= 12
    made = client.generate(model="tiny", prompt="JSON", format="json", options=options)
    assert isinstance(json.loads(made.response), dict)


def test_tool_calls(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 120}
    reply = client.chat(
        model="tiny",
        messages=chat_user("What time is it?"),
        tools=[TIME_TOOL],
        format=TIME_CALL_SCHEMA,
        options=options,
    )
    [call] = reply.message.tool_calls or []
    assert (call.function.name, dict(call.function.arguments)) == ("get_time", {})
    assert reply.message.content == ""
    chunks = list(
        client.chat(
            model="tiny",
            messages=chat_user("What time is it?"),
            tools=[TIME_TOOL],
            format=TIME_CALL_SCHEMA,
            options=options,
            stream=True,
        )
    )
    streamed = [c for chunk in chunks for c in chunk.message.tool_calls or []]
    assert [c.function.name for c in streamed] == ["get_time"]
    assert chunks[-1].done is True


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="tiny", input=["a", "b"])
    assert len(result.embeddings) == 2
    assert all(len(vector) == 64 for vector in result.embeddings)
    assert sum(x * x for x in result.embeddings[0]) == pytest.approx(1.0)
    assert result.prompt_eval_count is not None and result.prompt_eval_count >= 2
    short = client.embed(model="tiny", input="a", dimensions=8).embeddings[0]
    assert len(short) == 8 and sum(x * x for x in short) == pytest.approx(1.0)
    old = client.embeddings(model="tiny", prompt="a").embedding
    assert list(old) == pytest.approx(list(result.embeddings[0]))
    with pytest.raises(ollama.ResponseError, match="64 dimensions") as caught:
        client.embed(model="tiny", input="a", dimensions=1000)
    assert caught.value.status_code == 400


def test_ps_and_keep_alive(client: ollama.Client) -> None:
    client.generate(model="tiny", prompt="x", options=GREEDY, keep_alive="10m")
    [running] = client.ps().models
    assert running.model == "tiny:latest"
    assert running.context_length == 1024
    assert running.size is not None and running.size > 0
    assert running.expires_at is not None
    left = running.expires_at - datetime.now(UTC)
    assert timedelta(minutes=8) < left <= timedelta(minutes=10)
    client.generate(model="tiny", prompt="x", options=GREEDY, keep_alive=-1)
    [forever] = client.ps().models
    assert forever.expires_at is not None
    assert forever.expires_at - datetime.now(UTC) > timedelta(days=3650)
    client.generate(model="tiny", prompt="x", options=GREEDY, keep_alive="5m")


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ({"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "think": True}, 400, "does not support thinking"),
        ({"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "does not support images"),
        ({"model": "tiny", "prompt": "x", "suffix": "}"}, 400, "cannot fill in the middle"),
        ({"model": "tiny", "prompt": "x" * 50, "options": {"num_ctx": 16}}, 400, "num_ctx"),
        ({"model": "tiny", "prompt": "x", "format": {"type": "nonsense"}}, 400, "format"),
    ],
)
def test_bad_requests_get_ollama_errors(
    base: str, call: dict[str, Any], status: int, message: str
) -> None:
    response = httpx.post(f"{base}/api/generate", json={**call, "stream": False}, timeout=60)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and message in body["error"]
    # The server keeps serving.
    ok = httpx.post(
        f"{base}/api/generate",
        json={"model": "tiny", "prompt": "x", "stream": False, "options": GREEDY},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["done"] is True


def test_think_false_and_the_client_error_type(client: ollama.Client) -> None:
    reply = client.chat(model="tiny", messages=chat_user("x"), think=False, options=GREEDY)
    assert reply.done is True
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope:7b", messages=chat_user("x"))
    assert caught.value.status_code == 404 and "not found" in str(caught.value.error)


def test_num_ctx_bounds_the_reply(client: ollama.Client) -> None:
    raw = client.generate(
        model="tiny", prompt="abc", raw=True, options={"num_ctx": 8, "num_predict": 100}
    )
    # 4 prompt tokens in a context of 8 leave room for 4.
    assert (raw.prompt_eval_count, raw.eval_count, raw.done_reason) == (4, 4, "length")


def test_unknown_paths_answer_in_ollama_s_format(base: str) -> None:
    response = httpx.get(f"{base}/api/nothing-here")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


# --- model lifecycle (a server of its own) ------------------------------------------------------


@pytest.fixture
def own_ports(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Ports]:
    with run_with_ollama_port(isolated_settings(tiny_model_dir, tmp_path)) as running:
        yield running


def test_load_and_unload_without_a_prompt(own_ports: Ports) -> None:
    client = ollama.Client(host=own_ports.ollama_url)
    assert client.ps().models == []
    loaded = client.generate(model="tiny")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert [m.model for m in client.ps().models] == ["tiny:latest"]
    unloaded = client.chat(model="tiny", messages=[], keep_alive=0)
    assert (unloaded.done_reason, unloaded.message.content) == ("unload", "")
    assert client.ps().models == []
    again = client.chat(model="tiny", messages=[])
    assert again.done_reason == "load"


def test_copy_and_delete(own_ports: Ports) -> None:
    client = ollama.Client(host=own_ports.prefixed)
    assert client.copy("tiny", "tiny-copy").status == "success"
    assert sorted(m.model or "" for m in client.list().models) == [
        "tiny-copy:latest",
        "tiny:latest",
    ]
    assert client.chat(model="tiny-copy", messages=chat_user("x"), options=GREEDY).done
    with pytest.raises(ollama.ResponseError) as exists:
        client.copy("tiny", "tiny-copy:latest")
    assert exists.value.status_code == 409
    assert client.delete("tiny-copy:latest").status == "success"
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("tiny-copy")
    assert gone.value.status_code == 404
    # The tiny model is the user's file, not shimmy's own: it is never deleted.
    with pytest.raises(ollama.ResponseError) as refused:
        client.delete(TINY_ID)
    assert refused.value.status_code == 403
    assert client.show("tiny").details is not None


def test_aliases_and_their_latest_tag(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.tiny]\naliases = ["small"]\n', encoding="utf-8")
    settings = isolated_settings(tiny_model_dir, tmp_path, config=config)
    with run_with_ollama_port(settings) as running:
        client = ollama.Client(host=running.ollama_url)
        for name in ("small", "small:latest", "library/tiny:latest"):
            assert client.show(name).details == client.show("tiny").details, name
            reply = client.generate(model=name, prompt="x", options=GREEDY)
            assert reply.model == name  # as Ollama, the name the client used
        with pytest.raises(ollama.ResponseError) as caught:
            client.show("small:7b")
        assert caught.value.status_code == 404


def test_the_native_api_points_ollama_clients_to_theirs(own_ports: Ports) -> None:
    native = ollama.Client(host=own_ports.url)
    with pytest.raises(ollama.ResponseError, match="/ollama") as caught:
        native.generate(model="tiny", prompt="x")
    assert caught.value.status_code == 400
    assert own_ports.ollama_url.removeprefix("http://") in str(caught.value.error)
    plain = httpx.post(
        f"{own_ports.url}/api/generate", json={"prompt": "x", "options": {"num_predict": 2}}
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == "invalid_request"
    assert "'options' is a field of Ollama's API" in plain.json()["error"]["details"]
    with pytest.raises(ollama.ResponseError, match="Ollama's API is served at"):
        native.pull("hf.co/someone/model")
    # shimmy's own clients are not affected.
    fine = httpx.post(f"{own_ports.url}/api/generate", json={"prompt": "x", "max_tokens": 2})
    assert fine.status_code == 200 and "choices" in fine.json()


def test_human_numbers_follow_ollama() -> None:
    assert [human_number(n) for n in (8_030_261_248, 7_000_000_000, 268_098_176, 116)] == [
        "8.0B",
        "7B",
        "268.10M",
        "116",
    ]

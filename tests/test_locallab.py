"""The LocalLab drop-in, driven by LocalLab's official Python client (``locallab-client``, sync
and async) and by plain HTTP following LocalLab's API documentation.

Greedy decoding (``do_sample: false`` or ``temperature: 0``) makes the tiny model's random
output repeatable, so streamed and whole answers can be compared.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings
from locallab_client import LocalLabClient, SyncLocalLabClient
from tiny_gguf import write_tiny_gguf

from shimmy.api.locallab.routes import carry_trailing_whitespace
from shimmy.settings import Settings

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
]


@pytest.fixture
def lab(tiny_server: str) -> Iterator[SyncLocalLabClient]:
    client = SyncLocalLabClient(tiny_server, timeout=60)
    yield client
    client.close()


@pytest.fixture
def http(tiny_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server, timeout=60) as session:
        yield session


def as_client_streams(text: str) -> str:
    """What LocalLab's client reassembles from a text stream: line breaks arrive escaped and
    whitespace at the very end is lost (the client strips every line)."""
    return text.rstrip().replace("\r", "\\r").replace("\n", "\\n")


# --- the official client ------------------------------------------------------------------------
def test_model_management_with_the_client(lab: SyncLocalLabClient) -> None:
    assert lab.health_check() is True
    [model] = lab.list_models()
    assert model["id"] == "tiny"
    assert model["is_loaded"] is False
    assert model["can_load"] is True
    with pytest.raises(Exception, match="No model is currently loaded"):
        lab.get_current_model()

    assert lab.load_model("tiny") is True
    current = lab.get_current_model()
    assert current["id"] == "tiny"
    assert current["is_loaded"] is True
    assert current["loading_progress"] == 1.0
    info = lab.get_system_info()
    assert info["active_model"] == "tiny"
    assert isinstance(info["cpu_usage"], float)
    assert 0 < info["memory_usage"] <= 100
    assert isinstance(info["request_count"], int) and info["request_count"] >= 5
    assert info["uptime"] >= 0

    assert lab.unload_model() is True
    with pytest.raises(Exception, match="No model is currently loaded"):
        lab.get_current_model()
    assert lab.list_models()[0]["is_loaded"] is False


def test_generate_and_stream_generate_agree(lab: SyncLocalLabClient) -> None:
    prompt = "Once upon a time"
    text = lab.generate(prompt, max_length=40, do_sample=False)
    assert isinstance(text, str) and text
    # Inner whitespace (the tiny model emits control characters Python counts as whitespace)
    # is what the client's line stripping would lose without carrying it forward.
    assert any(character.isspace() for character in text.rstrip())
    assert lab.generate(prompt, max_length=40, do_sample=False) == text
    streamed = list(lab.stream_generate(prompt, max_length=40, do_sample=False))
    assert len(streamed) > 1
    assert "".join(streamed) == as_client_streams(text)


def test_batch_generate_with_the_client(lab: SyncLocalLabClient) -> None:
    prompts = ["one", "two two", "three three three"]
    result = lab.batch_generate(prompts, max_length=5, temperature=0.0)
    answers = result["responses"]
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert result["usage"]["completion_tokens"] <= 15
    singles = [lab.generate(prompt, max_length=5, temperature=0.0) for prompt in prompts]
    assert answers == singles


def test_chat_and_stream_chat_with_the_async_client(tiny_server: str) -> None:
    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        client = LocalLabClient(tiny_server)
        try:
            whole = await client.chat(MESSAGES, max_length=8, temperature=0.0)
            chunks = [
                chunk async for chunk in client.stream_chat(MESSAGES, max_length=8, temperature=0.0)
            ]
        finally:
            await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    [choice] = whole["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert whole["usage"]["completion_tokens"] <= 8
    assert all(chunk["role"] == "assistant" for chunk in chunks)
    assert "".join(chunk["content"] for chunk in chunks) == choice["message"]["content"]
    assert chunks[-1]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


# --- plain HTTP, as LocalLab's API documentation describes it ------------------------------------
def test_generate_response_shape(http: httpx.Client) -> None:
    response = http.post("/generate", json={"prompt": "Hello", "max_length": 7, "top_k": 80})
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data["response"], str)
    assert data["text"] == data["response"]
    assert data["model"] == "tiny"
    usage = data["usage"]
    assert usage["completion_tokens"] <= 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_defaults_and_aliases(http: httpx.Client) -> None:
    body = {"prompt": "Hello", "do_sample": False, "temperature": 1.5, "repetition_penalty": 1.0}
    first = http.post("/generate", json={**body, "max_length": 6}).json()
    again = http.post("/generate", json={**body, "max_tokens": 6, "model_id": None}).json()
    assert first["usage"]["completion_tokens"] <= 6
    assert again["response"] == first["response"]  # do_sample false is greedy, whatever the temp


def test_generate_stream_is_sse(http: httpx.Client) -> None:
    with http.stream(
        "POST", "/generate", json={"prompt": "Hi", "max_length": 12, "stream": True}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    events = [block.removeprefix("data: ") for block in blocks[:-1]]
    assert all(block.startswith("data: ") for block in blocks[:-1])
    assert events[-1] == "[DONE]"
    assert len(events) >= 2
    assert all("\n" not in event for event in events)


def test_chat_stream_is_sse_and_json_lines(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_length": 5, "stream": True, "temperature": 0.0}
    with http.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        raw = response.read().decode("utf-8")
    lines = [line for line in raw.split("\n") if line]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    sse = [payload if payload == "[DONE]" else json.loads(payload) for payload in data]
    bare = [json.loads(line) for line in lines if not line.startswith("data: ")]
    assert sse[-1] == bare[-1] == "[DONE]"
    assert sse == bare
    assert sse[-2]["finish_reason"] in ("stop", "length")
    whole = http.post("/chat", json={**body, "stream": False}).json()
    text = "".join(chunk["content"] for chunk in sse[:-1])
    assert text == whole["choices"][0]["message"]["content"]


def test_batch_response_shape(http: httpx.Client) -> None:
    response = http.post("/generate/batch", json={"prompts": ["a", "b", "c"], "max_length": 3})
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["responses"]) == 3
    assert all(isinstance(text, str) for text in data["responses"])
    assert data["usage"]["completion_tokens"] <= 9
    assert data["usage"]["total_tokens"] == (
        data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/generate", {"prompt": "x", "max_length": "10"}, 400, "invalid_request"),
        ("/generate", {"max_length": 3}, 400, "invalid_request"),
        ("/generate", {"prompt": "x", "top_p": 2}, 400, "invalid_request"),
        ("/generate", {"prompt": "x", "model_id": "missing"}, 404, "model_not_found"),
        ("/generate", {"prompt": "a " * 2000, "stream": True}, 400, "context_length_exceeded"),
        ("/chat", {"messages": []}, 400, "invalid_request"),
        ("/chat", {"messages": [{"role": "user"}]}, 400, "invalid_request"),
        ("/generate/batch", {"prompts": []}, 400, "invalid_request"),
        ("/models/load", {}, 400, "invalid_request"),
        ("/models/load", {"model_id": "missing"}, 404, "model_not_found"),
    ],
)
def test_errors(http: httpx.Client, path: str, body: Any, status: int, code: str) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_health(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "healthy"}


# --- the current model ---------------------------------------------------------------------------
def test_current_model_is_the_one_loaded_last(
    tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    write_tiny_gguf(folder / "alpha.gguf")
    write_tiny_gguf(folder / "beta.gguf")
    url = server_factory(isolated_settings(folder, tmp_path, max_loaded_models=2))
    with httpx.Client(base_url=url, timeout=60) as http:

        def model_of_generate(**extra: Any) -> str:
            response = http.post("/generate", json={"prompt": "x", "max_length": 2, **extra})
            assert response.status_code == 200, response.text
            model: str = response.json()["model"]
            return model

        assert model_of_generate() == "alpha"  # nothing loaded: the default model
        assert http.post("/models/load", json={"model_id": "beta"}).json()["status"] == "success"
        assert model_of_generate() == "beta"
        assert model_of_generate(model_id="alpha") == "alpha"
        assert model_of_generate() == "beta"  # a request naming a model does not switch
        assert http.get("/models/current").json()["id"] == "beta"
        listing = http.get("/models/available").json()
        assert listing["current_model"] == "beta"
        assert {m["id"]: m["is_loaded"] for m in listing["models"]} == {
            "alpha": True,
            "beta": True,
        }

        unloaded = http.post("/models/unload").json()
        assert unloaded["model_id"] == "beta" and unloaded["unloaded"] is True
        # Without a chosen model, the most recently used loaded one is current.
        assert http.get("/models/current").json()["id"] == "alpha"


def test_max_time_ends_the_generation(long_server: Callable[..., str]) -> None:
    url = long_server(parallel=4)
    body = {"prompt": "go", "max_length": LONG_CONTEXT - 100, "max_time": 0.2}
    data = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert data["finish_reason"] == "cancelled"
    assert data["usage"]["completion_tokens"] < LONG_CONTEXT - 100
    assert isinstance(data["response"], str)  # whatever was generated in time


def test_trailing_whitespace_moves_to_the_next_piece() -> None:
    pieces = ["Hello ", " ", "world\n", "again", "  "]
    sent, held = [], ""
    for piece in pieces:
        visible, held = carry_trailing_whitespace(held, piece)
        sent.append(visible)
    assert sent == ["Hello", "", "  world", "\nagain", ""]
    assert held == "  "
    assert "".join(sent) + held == "".join(pieces)

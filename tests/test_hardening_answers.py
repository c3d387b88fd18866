"""No lost answers: a request without max_tokens ends at a documented default, a generation past
the server's deadline ends as "length" with its text, and a model file whose header describes
no possible model is refused as model_unusable before llama.cpp allocates anything for it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings
from tiny_gguf import write_tiny_gguf

from shimmy.serving.defaults import DEFAULTS, OPEN_ENDED_MAX_TOKENS, Dialect
from shimmy.settings import Settings

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}]}


def test_the_open_ended_dialects_default_to_2048_tokens() -> None:
    assert Settings().open_max_tokens == OPEN_ENDED_MAX_TOKENS == 2048
    assert DEFAULTS[Dialect.OPENAI_CHAT].max_tokens is None  # i.e. open_max_tokens
    assert DEFAULTS[Dialect.LOCALLAB].max_tokens is None


# The default itself, made small so that the test runs fast on a slow machine: the context
# leaves room for far more, so only the default can end these answers.
OPEN_MAX = 24


@pytest.mark.parametrize(
    ("path", "body", "count"),
    [
        ("/v1/chat/completions", CHAT, lambda a: a["usage"]["completion_tokens"]),
        ("/generate", {"prompt": "Tell me a story"}, lambda a: a["usage"]["completion_tokens"]),
    ],
    ids=["openai-chat", "locallab"],
)
def test_a_request_without_max_tokens_ends_at_the_default(
    tiny_model_dir: Path,
    tmp_path: Path,
    server_factory: Callable[..., str],
    path: str,
    body: dict[str, Any],
    count: Callable[[dict[str, Any]], int],
) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, open_max_tokens=OPEN_MAX, threads=1)
    url = server_factory(settings)
    answer = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert count(answer.json()) == OPEN_MAX


def test_the_deadline_ends_a_generation_as_length_with_its_text(
    long_server: Callable[..., str],
) -> None:
    # Generating a whole long context takes far longer than the deadline.
    url = long_server(threads=1, request_timeout=2.0)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": LONG_CONTEXT}
    answer = httpx.post(f"{url}/api/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    produced = answer.json()["usage"]["completion_tokens"]
    assert 0 < produced < LONG_CONTEXT
    assert choice["text"]


def test_the_deadline_ends_a_stream_with_its_final_event(
    long_server: Callable[..., str],
) -> None:
    url = long_server(threads=1, request_timeout=2.0)
    body = {**CHAT, "max_tokens": LONG_CONTEXT, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text


IMPOSSIBLE = {
    # What a naive loader sizes buffers by, or divides by, or loops over.
    "ctx-huge": {"context_length": 0xFFFFFFFF},
    "kv-heads-0": {"head_count_kv": 0},
    "kv-heads-3": {"head_count_kv": 3},  # 4 query heads cannot share 3 KV heads
    "blocks-0": {"block_count": 0},  # llama.cpp aborts the whole process on this one
}


@pytest.fixture(scope="module")
def impossible_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("impossible")
    write_tiny_gguf(folder / "tiny.gguf")
    for name, header in IMPOSSIBLE.items():
        write_tiny_gguf(folder / f"{name}.gguf", **header)
    return folder


def test_impossible_headers_are_model_unusable_and_the_server_lives_on(
    impossible_models: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    url = server_factory(isolated_settings(impossible_models, tmp_path, threads=1))
    with httpx.Client(base_url=url, timeout=60) as http:
        listed = {model["id"]: model for model in http.get("/api/models").json()["models"]}
        for name in IMPOSSIBLE:
            assert listed[name]["usable"] is False, listed[name]
            answer = http.post("/api/generate", json={"model": name, "prompt": "hi"})
            assert answer.status_code == 422, (name, answer.text)
            assert answer.json()["error"]["code"] == "model_unusable"
            loading = http.post(f"/api/models/{name}/load")
            assert loading.status_code == 422, (name, loading.text)
        assert http.get("/api/models/loaded").json()["models"] == []
        good = http.post("/api/generate", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert good.status_code == 200

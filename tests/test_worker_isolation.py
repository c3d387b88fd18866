"""A model that crashes llama.cpp ends its own requests only: through the real server.

Every test runs ``shimmy serve`` as a subprocess (whose default is a worker process per model)
with the healthy tiny models and the corpus of tests/hostile_gguf.py, and checks what a client
sees: the bad model's clean error in the contract's format, another model's stream finishing,
/api/health answering, and the same server process throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from hostile_gguf import CRASHERS, Crasher, write_crashers
from serve_helpers import ServedProcess, serve_env, served
from tiny_gguf import write_tiny_gguf
from websockets.sync.client import connect

# Long enough that a stream is still running while the test does its damage: the tiny model
# needs seconds for this many tokens, the damage takes milliseconds.
LONG = 6000


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("isolation-models")
    write_tiny_gguf(folder / "tiny.gguf")
    write_tiny_gguf(folder / "tiny2.gguf", seed=77, name="tiny2")
    write_crashers(folder)
    return folder


def isolation_env(models: Path, tmp: Path, **extra: str) -> dict[str, str]:
    values = {
        "SHIMMY_MODEL_PATHS": str(models),
        "SHIMMY_CTX_SIZE": "8192",
        "SHIMMY_MAX_LOADED_MODELS": "4",
        "SHIMMY_KEEP_ALIVE": "-1",
        "SHIMMY_CRASH_LIMIT": "1000",
        **extra,
    }
    return serve_env(tmp, **values)


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    with served([], isolation_env(models, tmp_path_factory.mktemp("isolation"))) as process:
        yield process


def loaded(url: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{url}/api/models/loaded", timeout=30).json()
    return {model["id"]: model for model in body["models"]}


def listed(url: str, model_id: str) -> dict[str, Any]:
    models = httpx.get(f"{url}/api/models", timeout=30).json()["models"]
    return next(model for model in models if model["id"] == model_id)


def sse_payloads(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


@contextlib.contextmanager
def healthy_stream(url: str, model: str = "tiny") -> Iterator[Iterator[Any]]:
    """An OpenAI completion stream of ``model``, already past its first token."""
    body = {"model": model, "prompt": "Once", "max_tokens": LONG, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        payloads = sse_payloads(response.iter_lines())
        first = next(payloads)
        assert first["choices"][0]["text"] is not None
        yield payloads


def assert_finishes(payloads: Iterator[Any]) -> None:
    rest = list(payloads)
    assert rest[-1] == "[DONE]", rest[-3:]
    assert rest[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def assert_server_unharmed(server: ServedProcess, healthy_pid: int) -> None:
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/api/health", timeout=30).status_code == 200
    assert loaded(server.url)["tiny"]["worker_pid"] == healthy_pid


def generate(url: str, model: str, prompt: str) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 4}
    return httpx.post(f"{url}/api/generate", json=body, timeout=120)


def assert_crashed(response: httpx.Response, crasher: Crasher) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "model_crashed"
    assert crasher.says in error["details"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("crasher", CRASHERS, ids=lambda c: f"{c.stage}-{c.name}")
def test_a_crashing_model_ends_only_its_own_request(
    server: ServedProcess, crasher: Crasher
) -> None:
    with healthy_stream(server.url) as payloads:
        healthy_pid = loaded(server.url)["tiny"]["worker_pid"]
        if crasher.stage == "tokenize":  # it loads and answers until it meets its input
            assert generate(server.url, crasher.name, "Hello").status_code == 200
        assert_crashed(generate(server.url, crasher.name, crasher.prompt), crasher)
        assert_finishes(payloads)
    assert_server_unharmed(server, healthy_pid)
    failure = listed(server.url, crasher.name)["failure"]
    assert crasher.says in failure["reason"]
    assert "was killed by SIGABRT" in failure["reason"]
    assert crasher.name not in loaded(server.url)
    failed = httpx.get(f"{server.url}/api/models/loaded", timeout=30).json()["failed"]
    assert crasher.name in {model["id"] for model in failed}
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert f'shimmy_worker_crashes_total{{model="{crasher.name}"}}' in metrics
    if crasher.stage == "tokenize":  # other input still works: the model loads again
        assert generate(server.url, crasher.name, "Hello").status_code == 200
        assert "failure" not in listed(server.url, crasher.name)


def test_killing_a_worker_mid_stream_ends_its_streams_only(server: ServedProcess) -> None:
    url = server.url
    with healthy_stream(url, "tiny2") as other, healthy_stream(url) as victim:
        models = loaded(url)
        os.kill(models["tiny"]["worker_pid"], signal.SIGKILL)
        # The stream's first token came before the kill (healthy_stream read it); more may
        # have, depending on how far the worker got.
        *tokens, crashed, done = list(victim)
        assert all("choices" in chunk for chunk in tokens)
        # OpenAI's error event after the tokens already sent; no finish_reason was sent
        assert crashed["error"]["code"] == "model_crashed" and done == "[DONE]"
        assert "SIGKILL" in crashed["error"]["message"]
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in tokens)
        assert_finishes(other)
    assert loaded(url)["tiny2"]["worker_pid"] == models["tiny2"]["worker_pid"]
    assert generate(url, "tiny", "again").status_code == 200  # the next request reloads it
    again = loaded(url)["tiny"]
    assert again["worker_pid"] != models["tiny"]["worker_pid"]
    assert again["load_count"] == models["tiny"]["load_count"] + 1


def test_a_websocket_client_gets_an_error_frame_when_the_worker_dies(
    server: ServedProcess,
) -> None:
    ws_url = server.url.replace("http://", "ws://") + "/ws/generate"
    with connect(ws_url, open_timeout=30) as ws:
        ws.send(json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": LONG}))
        first = json.loads(ws.recv(timeout=60))
        assert "token" in first, first
        os.kill(loaded(server.url)["tiny"]["worker_pid"], signal.SIGKILL)
        while "token" in (frame := json.loads(ws.recv(timeout=60))):
            pass
        assert frame["error"]["code"] == "model_crashed", frame
        # The connection survives its model's crash: the next request reloads it.
        ws.send(json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 3}))
        while "token" in (frame := json.loads(ws.recv(timeout=60))):
            pass
        assert frame.get("done") is True, frame


def test_a_model_that_keeps_crashing_becomes_unusable(models: Path, tmp_path: Path) -> None:
    crasher = CRASHERS[0]
    env = isolation_env(models, tmp_path, SHIMMY_CRASH_LIMIT="2")
    with served([], env) as server:
        assert_crashed(generate(server.url, crasher.name, "Hello"), crasher)
        assert_crashed(generate(server.url, crasher.name, "Hello"), crasher)
        refused = generate(server.url, crasher.name, "Hello")  # no third worker is started
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "model_unusable"
        assert "crashed 2 times" in refused.json()["error"]["details"]
        entry = listed(server.url, crasher.name)
        assert entry["usable"] is False and crasher.says in entry["error"]
        assert generate(server.url, "tiny", "fine").status_code == 200


def test_workers_never_outlive_the_server(models: Path, tmp_path: Path) -> None:
    for ending in (signal.SIGTERM, signal.SIGKILL):
        with served([], isolation_env(models, tmp_path)) as server:
            assert generate(server.url, "tiny", "hi").status_code == 200
            worker = psutil.Process(loaded(server.url)["tiny"]["worker_pid"])
            assert worker.ppid() == server.process.pid
            server.process.send_signal(ending)
            server.process.wait(timeout=60)
            worker.wait(timeout=60)  # raises TimeoutExpired if it were left running
            assert not worker.is_running()


def test_in_process_mode_is_still_there(models: Path, tmp_path: Path) -> None:
    with served(["--in-process"], isolation_env(models, tmp_path)) as server:
        assert generate(server.url, "tiny", "hi").status_code == 200
        assert loaded(server.url)["tiny"]["worker_pid"] is None

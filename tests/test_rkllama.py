"""RKLLama's REST API under ``/rkllama``, driven by the curl examples of its documentation (seed
003), run with the real ``curl`` against a real server. Only the base URL and model names
change: ``http://localhost:8080`` becomes the server's ``/rkllama``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from conftest import isolated_settings, run_server

from shimmy.models import pull as pull_module

# The examples as the documentation writes them (one per endpoint).
SEED_EXAMPLES = {
    "models": "curl -X GET http://localhost:8080/models",
    "load_model": """curl -X POST http://localhost:8080/load_model \\
-H "Content-Type: application/json" \\
-d '{"model_name": "model1.rkllm"}'""",
    "unload_model": "curl -X POST http://localhost:8080/unload_model",
    "current_model": "curl -X GET http://localhost:8080/current_model",
    "generate": """curl -X POST http://localhost:8080/generate \\
-H "Content-Type: application/json" \\
-d '{"messages": "Hello, how are you?", "stream": false}'""",
    "pull": """curl -X POST http://localhost:8080/pull \\
-H "Content-Type: application/json" \\
-d '{"model": "hf/username/repo/file.rkllm"}'""",
    "rm": """curl -X DELETE http://localhost:8080/rm \\
-H "Content-Type: application/json" \\
-d '{"model": "model1.rkllm"}'""",
    "welcome": "curl -X GET http://localhost:8080/",
}
SEED_BASE = "http://localhost:8080"
REPO = "someone/tiny-GGUF"

# CI must run these: there a missing curl fails them instead of skipping them.
pytestmark = pytest.mark.skipif(
    (shutil.which("curl") is None or shutil.which("bash") is None)
    and os.environ.get("CI") != "true",
    reason="needs curl and bash",
)


@pytest.fixture
def base(tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    # RKLLama requests name no length: a small cap keeps the tiny model's answers short.
    settings = isolated_settings(
        tiny_model_dir, tmp_path, max_tokens_cap=6, allow_private_pull=True
    )
    with run_server(settings) as url:
        yield f"{url}/rkllama"


def curl(base: str, example: str, **replace: str) -> tuple[int, str]:
    """Run a documented example against ``base``; ``replace`` swaps text in it (model names).
    Returns the status and the body."""
    command = example.replace(SEED_BASE, base)
    for old, new in replace.items():
        command = command.replace(old, new)
    # Run by a shell, as written (line continuations included), with the status appended.
    command += " --silent --show-error --write-out '\\n%{http_code}'"
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def as_json(answer: tuple[int, str]) -> tuple[int, Any]:
    return answer[0], json.loads(answer[1])


def test_the_documented_examples_without_a_model(base: str) -> None:
    assert as_json(curl(base, SEED_EXAMPLES["welcome"])) == (
        200,
        {"message": "Welcome to RK-LLama!", "github": "https://github.com/notpunhnox/rkllama"},
    )
    assert as_json(curl(base, SEED_EXAMPLES["models"])) == (200, {"models": ["tiny"]})
    none = {"error": "No model is currently loaded."}
    assert as_json(curl(base, SEED_EXAMPLES["current_model"])) == (404, none)
    assert as_json(curl(base, SEED_EXAMPLES["generate"])) == (400, none)
    assert as_json(curl(base, SEED_EXAMPLES["unload_model"])) == (400, none)
    assert as_json(curl(base, SEED_EXAMPLES["load_model"])) == (
        400,
        {"error": "Model model1.rkllm not found in the /models directory."},
    )
    assert as_json(curl(base, SEED_EXAMPLES["rm"])) == (
        404,
        {"error": "The model: model1.rkllm cannot be found."},
    )


def test_load_generate_and_unload(base: str) -> None:
    load = SEED_EXAMPLES["load_model"]
    assert as_json(curl(base, load, **{"model1.rkllm": "tiny.gguf"})) == (
        200,
        {"message": "Model tiny loaded successfully."},
    )
    assert as_json(curl(base, load, **{"model1.rkllm": "tiny"})) == (
        400,
        {"error": "A model is already loaded. Please unload it first."},
    )
    assert as_json(curl(base, SEED_EXAMPLES["current_model"])) == (200, {"model_name": "tiny"})

    status, answer = as_json(curl(base, SEED_EXAMPLES["generate"]))
    assert status == 200
    assert (answer["id"], answer["object"]) == ("rkllm_chat", "rkllm_chat")
    [choice] = answer["choices"]
    assert choice["role"] == "assistant" and isinstance(choice["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 6

    # Streamed: one completion object per chunk, each followed by a blank line; a chat list
    # is rendered with the model's template.
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": True})
    status, text = curl(
        base,
        SEED_EXAMPLES["generate"],
        **{'{"messages": "Hello, how are you?", "stream": false}': chat},
    )
    assert status == 200
    chunks = [json.loads(part) for part in text.split("\n\n") if part.strip()]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] >= len(chunks) - 1

    assert as_json(curl(base, SEED_EXAMPLES["unload_model"])) == (
        200,
        {"message": "Model unloaded successfully."},
    )
    assert as_json(curl(base, SEED_EXAMPLES["current_model"]))[0] == 404


def test_pull_and_remove(
    base: str, mirror: Any, monkeypatch: pytest.MonkeyPatch, tiny_model_bytes: bytes
) -> None:
    monkeypatch.setattr(pull_module, "RETRY_DELAY", 0.0)
    # The documented example names an .rkllm file: not a model shimmy can serve.
    status, text = curl(base, SEED_EXAMPLES["pull"])
    assert status == 400 and text.startswith("Error during download: ")
    assert "not a .gguf file" in text

    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mirror.state.hf_files[(REPO, "tiny-Q8_0.gguf")] = tiny_model_bytes
    status, text = curl(
        base, SEED_EXAMPLES["pull"], **{"hf/username/repo/file.rkllm": f"hf/{REPO}/tiny-Q8_0.gguf"}
    )
    lines = text.splitlines()
    size = len(tiny_model_bytes) / (1024 * 1024)
    assert status == 200
    assert lines[0] == f"Downloading tiny-Q8_0.gguf ({size:.2f} MB)..."
    percents = [int(line.removesuffix("%")) for line in lines[1:]]
    assert percents == sorted(percents) and percents[-1] == 100
    assert as_json(curl(base, SEED_EXAMPLES["models"])) == (200, {"models": ["tiny", "tiny-q8-0"]})

    assert as_json(curl(base, SEED_EXAMPLES["rm"], **{"model1.rkllm": "tiny-Q8_0.gguf"})) == (
        200,
        {"message": "The model has been successfully deleted."},
    )
    assert as_json(curl(base, SEED_EXAMPLES["models"])) == (200, {"models": ["tiny"]})
    # The user's own file is never deleted through shimmy.
    status, refused = as_json(curl(base, SEED_EXAMPLES["rm"], **{"model1.rkllm": "tiny"}))
    assert status == 403 and "not in shimmy's models folder" in refused["error"]

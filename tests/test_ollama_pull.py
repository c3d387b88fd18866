"""Ollama's ``/api/pull`` with the official client, from a loopback server playing a plain
mirror and the Hugging Face Hub (``test_pull.MirrorServer``; the Hub's file listing is one
more file it serves)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import ollama
import pytest
from conftest import isolated_settings
from ollama_helpers import Ports, run_with_ollama_port

from shimmy.models import pull as pull_module
from shimmy.models.pull_repo import parse_repo_name, pick_file

REPO = "someone/tiny-GGUF"
FILES = ["tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "mmproj-tiny-Q4_K_M.gguf", "README.md"]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "RETRY_DELAY", 0.0)


@pytest.fixture
def hub(mirror: Any, monkeypatch: pytest.MonkeyPatch, tiny_model_bytes: bytes) -> Any:
    """The mirror as the Hugging Face endpoint, with REPO's files and its file listing."""
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listing = [{"type": "file", "path": name, "size": 1, "oid": "0" * 40} for name in FILES]
    mirror.state.files[f"/api/models/{REPO}/tree/main"] = json.dumps(listing).encode()
    for name in FILES:
        mirror.state.hf_files[(REPO, name)] = tiny_model_bytes
    return mirror


@pytest.fixture
def ports(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Ports]:
    with run_with_ollama_port(
        isolated_settings(tiny_model_dir, tmp_path, allow_private_pull=True)
    ) as running:
        yield running


def test_pull_from_a_url_streams_ollama_progress(
    ports: Ports, mirror: Any, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/Pulled_Q8.gguf"] = tiny_model_bytes
    client = ollama.Client(host=ports.ollama_url)
    events = list(client.pull(f"{mirror.url}/files/Pulled_Q8.gguf", stream=True))
    statuses = [event.status for event in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    downloading = [event for event in events if event.status == "pulling Pulled_Q8.gguf"]
    assert downloading and downloading[-1].completed == downloading[-1].total
    assert downloading[-1].total == len(tiny_model_bytes)
    listed = {model.model: model for model in client.list().models}
    # A pulled file's digest is known at once: the pull checked it.
    assert listed["pulled-q8:latest"].digest == hashlib.sha256(tiny_model_bytes).hexdigest()
    # Pulling it again is quick and still a success.
    assert client.pull(f"{mirror.url}/files/Pulled_Q8.gguf").status == "success"
    assert client.generate(model="pulled-q8", prompt="x", options={"num_predict": 2}).done


def test_pull_errors(ports: Ports, mirror: Any) -> None:
    client = ollama.Client(host=ports.prefixed)
    with pytest.raises(ollama.ResponseError, match="Ollama's model library") as library:
        client.pull("llama3.2")
    assert library.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="was not found") as missing:
        client.pull(f"{mirror.url}/files/missing.gguf")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="was not found"):
        list(client.pull(f"{mirror.url}/files/missing.gguf", stream=True))
    assert client.list().models[0].model == "tiny:latest"


def test_pull_a_hub_repository_by_quantization(ports: Ports, hub: Any) -> None:
    client = ollama.Client(host=ports.ollama_url)
    assert client.pull(f"hf.co/{REPO}:Q8_0").status == "success"
    assert client.pull(f"hf.co/{REPO}").status == "success"  # Q4_K_M, never the projector
    names = sorted(model.model or "" for model in client.list().models)
    assert names == ["tiny-q4-k-m:latest", "tiny-q8-0:latest", "tiny:latest"]
    # The name it was pulled as works from then on, as in Ollama.
    assert client.show(f"hf.co/{REPO}:q8_0").details == client.show("tiny-q8-0").details
    reply = client.chat(
        model=f"hf.co/{REPO}:latest",
        messages=[{"role": "user", "content": "x"}],
        options={"num_predict": 2},
    )
    assert reply.done
    with pytest.raises(ollama.ResponseError, match="Q4_K_M, Q8_0") as missing:
        client.pull(f"hf.co/{REPO}:Q2_K")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="not found") as unknown:
        client.pull("hf.co/someone/nothing")
    assert unknown.value.status_code == 404


def test_hub_names_and_the_file_they_pick() -> None:
    assert parse_repo_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:IQ3_M") is not None
    name = parse_repo_name("https://huggingface.co/a/b:latest")
    assert name is not None and (name.repo_id, name.quant) == ("a/b", None)
    assert parse_repo_name("llama3.2:1b") is None
    files = [
        "x-Q8_0.gguf",
        "sub/x-Q4_K_M.gguf",
        "x-Q4_K_M-00002-of-00002.gguf",
        "x-Q4_K_M-00001-of-00002.gguf",
        "mmproj-x-Q4_K_M.gguf",
    ]
    assert pick_file(files, None) == "x-Q4_K_M-00001-of-00002.gguf"
    assert pick_file(files, "q8_0") == "x-Q8_0.gguf"
    assert pick_file(files, "Q5_K_M") is None
    assert pick_file(["only-F16.gguf", "notes.txt"], None) == "only-F16.gguf"
    # "Q4_K" names no file of "Q4_K_M": a quantization is matched whole.
    assert pick_file(["x-Q4_K_M.gguf"], "Q4_K") is None

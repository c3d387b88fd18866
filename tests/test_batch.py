"""POST /api/generate/batch on a real server with the tiny model.

The tiny model's F32 kernels give the same logits whether a sequence is decoded alone or next to
others, so with a seed a batch answer must equal the single /api/generate answer, prompt by
prompt; that also proves the answers come back in the order of the prompts.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings
from prometheus_client.parser import text_string_to_metric_families

from shimmy.settings import Settings

PROMPTS = ["a", "the cat", "in the beginning there was", "x y z"]


def batch(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/api/generate/batch", json={"model": "tiny", **body})


def test_batch_answers_each_prompt_in_order(client: httpx.Client) -> None:
    response = batch(client, prompts=PROMPTS, max_tokens=6, seed=7, temperature=0.9)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "tiny"
    assert data["id"].startswith("batch-")
    assert isinstance(data["created"], int)
    answers = data["responses"]
    assert [answer["index"] for answer in answers] == list(range(len(PROMPTS)))
    for answer in answers:
        assert isinstance(answer["text"], str)
        assert answer["finish_reason"] in ("stop", "length")
        usage = answer["usage"]
        assert 1 <= usage["completion_tokens"] <= 6
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert data["usage"][key] == sum(answer["usage"][key] for answer in answers)

    for prompt, answer in zip(PROMPTS, answers, strict=True):
        single = client.post(
            "/api/generate",
            json={
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": 6,
                "seed": 7,
                "temperature": 0.9,
            },
        ).json()
        assert answer["text"] == single["choices"][0]["text"]
        assert answer["usage"] == single["usage"]


def test_batch_takes_the_generate_options(client: httpx.Client) -> None:
    data = batch(client, prompts=["one", "two"], max_tokens=3, temperature=0, stop=["\x00"]).json()
    assert all(answer["usage"]["completion_tokens"] <= 3 for answer in data["responses"])
    again = batch(client, prompts=["one", "two"], max_tokens=3, temperature=0, stop="\x00").json()
    assert [a["text"] for a in again["responses"]] == [a["text"] for a in data["responses"]]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["x"] * 65}, "prompts"),
        ({"prompts": ["ok", ""]}, "prompts.1"),
        ({"prompts": ["ok", 3]}, "prompts.1"),
        ({"prompts": "just one"}, "prompts"),
        ({}, "prompts"),
        ({"prompts": ["x"], "prompt": "y"}, "prompt"),
        ({"prompts": ["x"], "messages": [{"role": "user", "content": "y"}]}, "messages"),
        ({"prompts": ["x"], "stream": True}, "stream"),
        ({"prompts": ["x"], "max_tokens": "5"}, "max_tokens"),
        ({"prompts": ["x"], "temperature": 3}, "temperature"),
    ],
)
def test_invalid_batches_are_400(client: httpx.Client, body: dict[str, Any], fragment: str) -> None:
    response = client.post("/api/generate/batch", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert fragment in error["details"]


def test_body_that_is_not_an_object_is_400(client: httpx.Client) -> None:
    response = client.post("/api/generate/batch", json=["a", "b"])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.post("/api/generate/batch", json={"model": "nope", "prompts": ["a"]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_one_prompt_too_long_fails_the_batch_and_names_it(client: httpx.Client) -> None:
    too_long = "a " * 2000  # the tiny server's context holds 1024 tokens
    response = batch(client, prompts=["fine", too_long, "also fine"], max_tokens=4)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["details"].startswith("prompt 1:")


def test_more_prompts_than_the_model_can_take_is_400(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, parallel=2, max_queue=1))
    response = httpx.post(
        f"{url}/api/generate/batch",
        json={"model": "tiny", "prompts": ["a", "b", "c", "d"], "max_tokens": 2},
        timeout=60,
    )
    assert response.status_code == 400
    assert "at most 3 prompts" in response.json()["error"]["details"]
    fits = httpx.post(
        f"{url}/api/generate/batch",
        json={"model": "tiny", "prompts": ["a", "b", "c"], "max_tokens": 2},
        timeout=60,
    )
    assert fits.status_code == 200
    assert len(fits.json()["responses"]) == 3


def _busy(url: str) -> int:
    busy: int = httpx.get(f"{url}/api/health", timeout=30).json()["slots"]["busy"]
    return busy


def _cancelled(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "shimmy_engine_requests_finished":
            return sum(s.value for s in family.samples if s.labels.get("outcome") == "cancelled")
    raise AssertionError("no shimmy_engine_requests_finished in /metrics")


def test_client_disconnect_cancels_every_generation(long_server: Callable[..., str]) -> None:
    url = long_server(parallel=2)
    body = json.dumps({"model": "tiny", "prompts": ["go", "on"], "max_tokens": LONG_CONTEXT - 100})
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        raw.sendall(
            (
                f"POST /api/generate/batch HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        # Both prompts started together: they were queued as one.
        assert any(_busy(url) == 2 for _ in range(200))
    assert any(_busy(url) == 0 for _ in range(400))
    assert _cancelled(url) == 2

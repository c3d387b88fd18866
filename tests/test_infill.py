"""llama.cpp's ``/infill`` as its clients read it: the final object, the stream, the fields
llama.vscode sends (``n_predict`` 0 warm-ups, ``samplers``, ``n_indent``,
``t_max_predict_ms``, ``response_fields``) and llama.cpp's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import isolated_settings, run_server
from fim_helpers import recording_factory

from shimmy.engine.types import EarlyStop, GenerationRequest
from shimmy.registry import ModelRegistry

# What llama.vscode sends for a completion (its defaults), and for a cache warm-up.
VSCODE = {
    "model": "coder",
    "input_prefix": "def add(a, b):\n",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}],
    "prompt": "    ret",
    "n_predict": 16,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "n_indent": 4,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
}
WARM_UP = {
    **VSCODE,
    "input_prefix": "",
    "input_suffix": "",
    "prompt": "",
    "n_predict": 0,
    "samplers": [],
    "t_max_predict_ms": 1,
}
TIMINGS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}  # fmt: skip


@pytest.fixture(scope="module")
def recorded() -> list[GenerationRequest]:
    return []


@pytest.fixture(scope="module")
def url(
    fim_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, recorded: list[Any]
) -> Iterator[str]:
    settings = isolated_settings(fim_model_dir, tmp_path_factory.mktemp("infill"), parallel=2)
    registry = ModelRegistry(settings, engine_factory=recording_factory(recorded))
    with run_server(settings, registry) as base:
        yield base


def infill(url: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{url}/infill", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_the_final_object_has_llamacpps_fields(url: str, recorded: list[Any]) -> None:
    result = infill(url, VSCODE)
    assert result["stop"] is True and result["index"] == 0 and result["model"] == "coder"
    assert isinstance(result["content"], str)
    assert result["tokens_predicted"] <= 16
    assert result["stop_type"] in ("eos", "limit")
    assert result["has_new_line"] == ("\n" in result["content"])
    assert set(result["timings"]) == TIMINGS
    assert result["timings"]["predicted_n"] == result["tokens_predicted"]
    timings = result["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == result["tokens_evaluated"]
    settings = result["generation_settings"]
    assert settings["samplers"] == ["top_k", "top_p", "infill"] and settings["n_indent"] == 4
    # The options reached the engine as what they mean.
    request = recorded[-1]
    assert request.max_tokens == 16
    assert request.sampling.chain == ("top_k", "top_p", "infill")
    assert request.sampling.top_k == 40 and request.sampling.top_p == 0.99
    assert request.early_stop == EarlyStop(min_indent=4, time_budget=1.0)


def test_a_warm_up_reads_the_prompt_and_generates_nothing(url: str) -> None:
    warm = infill(url, {**WARM_UP, "input_extra": [{"text": "WARM = True\n" * 20}]})
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    assert warm["stop_type"] == "limit"
    # The completion that follows finds the extra context already decoded.
    body = {**VSCODE, "input_extra": [{"text": "WARM = True\n" * 20}]}
    assert infill(url, body)["timings"]["cache_n"] > 20


def test_response_fields_pick_fields_by_path(url: str) -> None:
    fields = ["content", "timings/prompt_n", "tokens_cached", "no/such"]
    result = infill(url, {**VSCODE, "response_fields": fields})
    assert set(result) == {"content", "timings/prompt_n", "tokens_cached"}
    assert isinstance(result["timings/prompt_n"], int)


def test_a_stop_word_is_reported(url: str) -> None:
    # The random model writes random bytes: with every letter a stop word, one soon comes up.
    stops = [chr(c) for c in range(ord("a"), ord("p"))]
    body = {**VSCODE, "n_predict": 400, "n_indent": 0, "stop": stops, "seed": 3}
    body |= {"samplers": ["top_k", "top_p"], "t_max_predict_ms": 0}
    result = infill(url, body)
    assert result["stop_type"] == "word"
    assert result["stopping_word"] in stops
    assert not any(s in result["content"] for s in stops)


def test_streaming_sends_pieces_then_the_final_object_without_done(url: str) -> None:
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "POST", f"{url}/infill", json={**VSCODE, "stream": True, "n_indent": 0}, timeout=60
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line:
                assert line.startswith("data: ") and line != "data: [DONE]"
                events.append(json.loads(line.removeprefix("data: ")))
    *pieces, final = events
    assert all(p["stop"] is False and set(p) >= {"content", "index", "id_slot"} for p in pieces)
    assert final["stop"] is True and set(final["timings"]) == TIMINGS
    assert final["tokens_predicted"] >= len(pieces)


def test_errors_have_llamacpps_shape(url: str) -> None:
    answer = httpx.post(f"{url}/infill", json={**WARM_UP, "model": "nope"}, timeout=60)
    assert answer.status_code == 404
    assert answer.json()["error"] == {
        "code": 404,
        "type": "not_found_error",
        "message": answer.json()["error"]["message"],
    }
    answer = httpx.post(f"{url}/infill", content=b"{not json", timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 400


def test_answers_match_the_published_schema(url: str) -> None:
    document = httpx.get(f"{url}/openapi.json", timeout=30).json()
    responses = document["paths"]["/infill"]["post"]["responses"]
    checks = [
        (VSCODE, "200"),
        ({**VSCODE, "response_fields": ["content"]}, "200"),
        ({**VSCODE, "model": "tiny"}, "400"),
        ({**VSCODE, "model": "nope"}, "404"),
    ]
    for body, status in checks:
        answer = httpx.post(f"{url}/infill", json=body, timeout=60)
        assert str(answer.status_code) == status, answer.text
        schema = responses[status]["content"]["application/json"]["schema"]
        jsonschema.validate(
            answer.json(),
            {**schema, "components": document["components"]},
            cls=jsonschema.Draft202012Validator,
        )

"""llama.cpp's server API as its clients read it, on a real server with the tiny model:
``/completion`` (prompts of text, ids or both, lists of prompts, the stream, ``n_probs``,
grammars), ``/tokenize``, ``/detokenize``, ``/apply-template``, ``/props``, ``/slots``, and
OpenAI's routes without ``/v1``, with llama.cpp's error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings, run_server
from openai import OpenAI

TIMINGS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}  # fmt: skip
GREEDY = {"temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("llamacpp"), parallel=2)
    with run_server(settings) as base:
        yield base


def post(url: str, path: str, body: dict[str, Any], status: int = 200) -> Any:
    answer = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    return answer.json()


def events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert not any("[DONE]" in line for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_completion_answers_llamacpps_final_object(url: str) -> None:
    result = post(url, "/completion", {"prompt": "ab", "n_predict": 5, "return_tokens": True})
    assert result["stop"] is True and result["model"] == "tiny"
    assert result["tokens_predicted"] == 5 == result["timings"]["predicted_n"]
    assert len(result["tokens"]) == 5 and all(isinstance(t, int) for t in result["tokens"])
    assert result["stop_type"] == "limit" and result["truncated"] is False
    assert set(result["timings"]) == TIMINGS
    assert result["generation_settings"]["n_predict"] == 5
    assert (
        result["tokens_evaluated"] == result["timings"]["prompt_n"] + result["timings"]["cache_n"]
    )
    # Without return_tokens, llama.cpp leaves the ids out.
    assert post(url, "/completion", {"prompt": "ab", "n_predict": 2})["tokens"] == []


def test_token_ids_tokenize_back_to_the_content(url: str) -> None:
    body = {"prompt": "hello", "n_predict": 6, "return_tokens": True, **GREEDY}
    result = post(url, "/completion", body)
    text = post(url, "/detokenize", {"tokens": result["tokens"]})["content"]
    assert text == result["content"]


def test_prompts_of_ids_text_and_both_are_one_sequence(url: str) -> None:
    ids = post(url, "/tokenize", {"content": "hello world", "add_special": True})["tokens"]
    as_text = post(url, "/completion", {"prompt": "hello world", "n_predict": 4, **GREEDY})
    as_ids = post(url, "/completion", {"prompt": ids, "n_predict": 4, **GREEDY})
    assert as_ids["content"] == as_text["content"]
    assert as_ids["tokens_evaluated"] == len(ids)
    mixed = post(url, "/completion", {"prompt": [ids[0], "hello world"], "n_predict": 4, **GREEDY})
    assert mixed["content"] == as_text["content"]
    wrapped = {"prompt": {"prompt_string": "hello world"}, "n_predict": 4, **GREEDY}
    assert post(url, "/completion", wrapped)["content"] == as_text["content"]


def test_a_list_of_prompts_answers_a_list(url: str) -> None:
    ids = post(url, "/tokenize", {"content": "hey", "add_special": True})["tokens"]
    results = post(url, "/completion", {"prompt": [ids, "hey"], "n_predict": 3, **GREEDY})
    assert isinstance(results, list) and [r["index"] for r in results] == [0, 1]
    assert results[0]["content"] == results[1]["content"]


def test_the_stream_sends_content_with_its_token_ids_then_timings(url: str) -> None:
    body = {"prompt": "ab", "n_predict": 6, "stream": True, **GREEDY}
    chunks = events(url, body)
    *partials, final = chunks
    assert partials and all(p["stop"] is False for p in partials)
    assert sum(len(p["tokens"]) for p in partials) == 6
    assert final["stop"] is True and final["stop_type"] == "limit"
    assert final["tokens_predicted"] == 6 and set(final["timings"]) == TIMINGS
    assert "generation_settings" in final
    whole = post(url, "/completion", {**body, "stream": False})
    assert "".join(p["content"] for p in partials) == whole["content"]


def test_n_probs_gives_completion_probabilities_with_ids(url: str) -> None:
    body = {"prompt": "ab", "n_predict": 3, "n_probs": 4, **GREEDY}
    probs = post(url, "/completion", body)["completion_probabilities"]
    assert len(probs) == 3
    for token in probs:
        assert token["logprob"] <= 0 and isinstance(token["id"], int) and token["id"] >= 0
        assert token["bytes"] == list(token["token"].encode())
        assert 1 <= len(token["top_logprobs"]) <= 4
        # Greedy: the token chosen is the likeliest one.
        assert token["top_logprobs"][0]["id"] == token["id"]
    post_sampling = post(url, "/completion", {**body, "post_sampling_probs": True})
    for token in post_sampling["completion_probabilities"]:
        assert 0 < token["prob"] <= 1 and all(0 < p["prob"] <= 1 for p in token["top_probs"])
    streamed = [c for c in events(url, {**body, "stream": True}) if not c["stop"]]
    assert sum(len(c["completion_probabilities"]) for c in streamed) == 3


def test_a_grammar_and_a_json_schema_constrain_the_text(url: str) -> None:
    grammar = 'root ::= "yes" | "no"'
    result = post(url, "/completion", {"prompt": "ok?", "grammar": grammar, "n_predict": 8})
    assert result["content"] in ("yes", "no")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {"prompt": "json:", "json_schema": schema, "n_predict": 40, **GREEDY}
    result = post(url, "/completion", body)
    if result["stop_type"] == "eos":
        assert isinstance(json.loads(result["content"])["a"], int)


def test_stop_strings_and_response_fields(url: str) -> None:
    body = {"prompt": "ab", "n_predict": 20, **GREEDY}
    first = post(url, "/completion", body)["content"]
    stop = first[3:5]
    assert stop
    stopped = post(url, "/completion", {**body, "stop": [stop]})
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == stop
    assert stop not in stopped["content"]
    fields = ["content", "generation_settings/n_predict", "timings/predicted_n"]
    chosen = post(url, "/completions", {**body, "n_predict": 3, "response_fields": fields})
    assert set(chosen) == set(fields) and chosen["generation_settings/n_predict"] == 3


def test_tokenize_with_pieces_and_detokenize(url: str) -> None:
    content = "hi there"
    plain = post(url, "/tokenize", {"content": content})["tokens"]
    special = post(url, "/tokenize", {"content": content, "add_special": True})["tokens"]
    assert len(special) >= len(plain) and all(isinstance(t, int) for t in plain)
    pieces = post(url, "/tokenize", {"content": content, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert "".join(p["piece"] for p in pieces) == content
    assert post(url, "/detokenize", {"tokens": plain})["content"] == content


def test_apply_template_renders_the_chat_prompt(url: str) -> None:
    messages = [{"role": "user", "content": "What is today?"}]
    prompt = post(url, "/apply-template", {"messages": messages})["prompt"]
    assert "What is today?" in prompt
    bare = post(url, "/apply-template", {"messages": messages, "add_generation_prompt": False})
    assert prompt.startswith(bare["prompt"]) and len(prompt) > len(bare["prompt"])


def test_props_and_slots_describe_the_model(url: str) -> None:
    props = httpx.get(f"{url}/props", timeout=60).json()
    assert props["total_slots"] == 2 and props["model_path"].endswith(".gguf")
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == 1024 and settings["params"]["temperature"] == 0.8
    slots = httpx.get(f"{url}/slots", timeout=60).json()
    assert [s["id"] for s in slots] == [0, 1]
    assert all(s["n_ctx"] == 1024 and s["is_processing"] is False for s in slots)
    assert all("prompt" not in s and "params" not in s for s in slots)


def test_openai_routes_without_v1(url: str) -> None:
    client = OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    vectors = client.embeddings.create(model="tiny", input=["a", "b"])
    assert len(vectors.data) == 2


def test_errors_have_llamacpps_shape(url: str) -> None:
    for path, body in (
        ("/completion", {"prompt": 5}),
        ("/completion", {"prompt": "x", "n_predict": -2}),
        ("/completion", {"prompt": {"prompt_string": "x", "multimodal_data": ["AAAA"]}}),
        ("/completion", {"prompt": ["a", "b"], "stream": True}),
        ("/detokenize", {"tokens": [-1]}),
        ("/detokenize", {"tokens": [1, 10**6]}),  # llama.cpp itself would abort on it
        ("/completion", {"prompt": [10**6], "n_predict": 1}),
        ("/chat/completions", {"messages": []}),
    ):
        error = post(url, path, body, status=400)["error"]
        assert error["code"] == 400 and error["type"] == "invalid_request_error", path
        assert error["message"]
    missing = post(url, "/completion", {"prompt": "x", "model": "nope"}, status=404)["error"]
    assert missing["code"] == 404 and missing["type"] == "not_found_error"


def test_a_prompt_longer_than_the_context_is_refused(url: str) -> None:
    error = post(url, "/completion", {"prompt": "ab " * 2000, "n_predict": 1}, status=400)
    assert error["error"]["code"] == 400
    assert error["error"]["type"] == "exceed_context_size_error"
    assert error["error"]["n_ctx"] == 1024 and error["error"]["n_prompt_tokens"] > 1024


def test_a_configured_seed_makes_answers_repeat(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Any
) -> None:
    """llama-server's ``--seed``: the model's ``sampling.seed`` for every request without one."""
    config = tmp_path / "shimmy.toml"
    config.write_text("[models.tiny.sampling]\nseed = 42\ntemperature = 1.0\n", encoding="utf-8")
    base = server_factory(isolated_settings(tiny_model_dir, tmp_path, config=config))
    assert (
        httpx.get(f"{base}/props", timeout=60).json()["default_generation_settings"]["params"][
            "seed"
        ]
        == 42
    )
    body = {"prompt": "ab", "n_predict": 12, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    first = post(base, "/completion", body)
    assert first["generation_settings"]["seed"] == 42
    assert post(base, "/completion", body)["content"] == first["content"]
    others = {post(base, "/completion", {**body, "seed": s})["content"] for s in range(4)}
    assert len(others) > 1  # a request's own seed still wins

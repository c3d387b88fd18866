"""``logit_bias`` and ``ignore_eos`` on llama.cpp's ``/completion`` and OpenAI's routes, on a
real server with the tiny model, whose end-of-text token is never likely on its own: a bias
of +100 makes it certain, which shows both that biases reach the sampler and that
``ignore_eos`` overrules them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import isolated_settings, run_server
from openai import OpenAI
from tiny_gguf import EOS, vocabulary

EOS_ID = vocabulary()[0].index(EOS)
GREEDY = {"temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("bias"), parallel=2)
    with run_server(settings) as base:
        yield base


def complete(url: str, status: int = 200, **body: Any) -> Any:
    answer = httpx.post(f"{url}/completion", json={"prompt": "ab", **GREEDY, **body}, timeout=60)
    assert answer.status_code == status, answer.text
    return answer.json()


def test_banned_tokens_never_come(url: str) -> None:
    plain = complete(url, n_predict=8, return_tokens=True)["tokens"]
    banned = sorted(set(plain))
    for form in ([[t, False] for t in banned], {str(t): -100 for t in banned}):
        tokens = complete(url, n_predict=8, return_tokens=True, logit_bias=form)["tokens"]
        assert len(tokens) == 8 and not set(tokens) & set(banned), form


def test_a_text_key_biases_its_tokens(url: str) -> None:
    plain = complete(url, n_predict=32, return_tokens=True)["tokens"]
    pieces = {t: _piece(url, t) for t in plain}
    token = next(t for t, piece in pieces.items() if piece.isascii() and piece.isprintable())
    again = complete(url, n_predict=32, return_tokens=True, logit_bias=[[pieces[token], -100]])
    assert token not in again["tokens"]
    assert {"bias": -100.0, "token": token} in again["generation_settings"]["logit_bias"]


def _piece(url: str, token: int) -> str:
    answer = httpx.post(f"{url}/detokenize", json={"tokens": [token]}, timeout=60)
    return str(answer.json()["content"])


def test_a_positive_bias_ends_at_end_of_text_unless_ignore_eos(url: str) -> None:
    ended = complete(url, n_predict=8, logit_bias={str(EOS_ID): 100})
    assert ended["stop_type"] == "eos" and ended["tokens_predicted"] <= 1
    kept = complete(url, n_predict=8, logit_bias={str(EOS_ID): 100}, ignore_eos=True)
    assert kept["stop_type"] == "limit" and kept["tokens_predicted"] == 8
    settings = kept["generation_settings"]
    assert settings["ignore_eos"] is True
    # A banned token's bias is -inf, which JSON writes as null (as llama.cpp does).
    assert {"bias": None, "token": EOS_ID} in settings["logit_bias"]
    assert complete(url, n_predict=2)["generation_settings"]["logit_bias"] == []


def test_openai_clients_send_logit_bias(url: str) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    ended = client.completions.create(
        model="tiny", prompt="ab", max_tokens=8, temperature=0, logit_bias={str(EOS_ID): 100}
    )
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].text == ""
    kept = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        logit_bias={str(EOS_ID): 100},
        extra_body={"ignore_eos": True},
    )
    assert kept.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "bias",
    [{"999999": -1}, [[1]], [[True, 1]], {"5": "much"}, [["", 1]], [[5, 1e400]]],
    ids=["outside-vocab", "not-a-pair", "bool-key", "text-bias", "empty-text", "infinite"],
)
def test_bad_biases_are_refused_in_each_dialect(url: str, bias: Any) -> None:
    raw = httpx.post(
        f"{url}/completion",
        content=f'{{"prompt": "ab", "n_predict": 2, "logit_bias": {_json(bias)}}}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["type"] == "invalid_request_error"
    if "Infinity" in json.dumps(bias):
        return  # the openai client cannot send it (its JSON refuses non-finite numbers)
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="ab", max_tokens=2, logit_bias=bias)
    assert refused.value.param == "logit_bias" or "logit_bias" in str(refused.value)
    assert complete(url, n_predict=2)["tokens_predicted"] == 2  # still serving


def _json(value: Any) -> str:
    return json.dumps(value).replace("Infinity", "1e400")

"""Fill in the middle on every route that takes a suffix, on real llama.cpp.

The server's engines record the token ids they are given; each test compares them with the
layout written out by hand from llama.cpp's own tokenization of each piece and the FIM token
ids the GGUF was written with (tiny_gguf.FIM_TOKENS). A model without FIM tokens must be
refused with a 400 on every one of those routes, in that route's error format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import isolated_settings, run_server, ws_receive, ws_url
from fim_helpers import llama_tokens, recording_factory
from tiny_gguf import fim_token_ids
from websockets.sync.client import connect

from shimmy.engine.types import FimTokens, GenerationRequest
from shimmy.registry import ModelRegistry
from shimmy.serving.fim import FimPieces, layout

CODER = fim_token_ids("repo")
BASIC = fim_token_ids("basic")
BOS = 261  # tiny_gguf: 256 bytes, 5 merges, then BOS

PREFIX = "def add(a, b):\n    return "
PROMPT = "a +"
SUFFIX = "\n\nprint(add(1, 2))\n"
# Code may spell out a special token: it must stay text.
TRICKY_PREFIX = "x = '<|tiny_fim_mid|>'\n"


@pytest.fixture(scope="module")
def recorded() -> list[GenerationRequest]:
    return []


@pytest.fixture(scope="module")
def fim_url(
    fim_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, recorded: list[Any]
) -> Iterator[str]:
    settings = isolated_settings(fim_model_dir, tmp_path_factory.mktemp("fim"), parallel=2)
    registry = ModelRegistry(settings, engine_factory=recording_factory(recorded))
    with run_server(settings, registry) as url:
        yield url


@pytest.fixture
def last_prompt(recorded: list[GenerationRequest]) -> Callable[[], list[int]]:
    recorded.clear()

    def last() -> list[int]:
        prompt = recorded[-1].prompt
        assert isinstance(prompt, list), "a FIM prompt reaches the engine as token ids"
        return prompt

    return last


def tok(fim_model_dir: Path, model: str, text: str) -> list[int]:
    return llama_tokens(fim_model_dir / f"{model}.gguf", text)


def coder_layout(
    dir_: Path, prefix: str, suffix: str, prompt: str = "", extra: tuple[tuple[str, str], ...] = ()
) -> list[int]:
    """llama.cpp's repository-level layout, BOS first."""
    ids = [BOS, CODER["rep"], *tok(dir_, "coder", "myproject\n")]
    for filename, text in extra:
        ids += [CODER["sep"], *tok(dir_, "coder", filename + "\n"), *tok(dir_, "coder", text)]
    ids += [CODER["sep"], *tok(dir_, "coder", "filename\n")]
    ids += [CODER["pre"], *tok(dir_, "coder", prefix), *tok(dir_, "coder", prompt)]
    return [*ids, CODER["suf"], *tok(dir_, "coder", suffix), CODER["mid"]]


def test_infill_layout_with_extra_files(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    extra = (("util.py", "def sub(a, b):\n    return a - b\n"), ("README", "adds numbers"))
    body = {
        "model": "coder",
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "prompt": PROMPT,
        "input_extra": [{"filename": f, "text": t} for f, t in extra],
        "n_predict": 4,
    }
    answer = httpx.post(f"{fim_url}/infill", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    expected = coder_layout(fim_model_dir, PREFIX, SUFFIX, PROMPT, extra)
    assert last_prompt() == expected
    assert answer.json()["tokens_evaluated"] == len(expected)
    assert answer.json()["truncated"] is False


def test_infill_layout_without_file_separators_uses_snippet_lines(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    body = {
        "model": "basic",
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": [{"text": "CONTEXT = 1\n"}],
        "n_predict": 2,
    }
    assert httpx.post(f"{fim_url}/infill", json=body, timeout=60).status_code == 200

    def t(text: str) -> list[int]:
        return tok(fim_model_dir, "basic", text)

    snippet = t("\n\n--- snippet ---\n\n")
    assert last_prompt() == [
        BOS,
        *snippet,
        *t("CONTEXT = 1\n"),
        BASIC["pre"],
        *t(PREFIX),
        BASIC["suf"],
        *t(SUFFIX),
        BASIC["mid"],
    ]


def test_openai_completions_suffix_layout(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    client = openai.OpenAI(base_url=f"{fim_url}/v1", api_key="x", max_retries=0, timeout=60)
    done = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=3)
    expected = coder_layout(fim_model_dir, PREFIX, SUFFIX)
    assert last_prompt() == expected
    assert done.usage is not None and done.usage.prompt_tokens == len(expected)


def test_openai_streamed_suffix_layout(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    client = openai.OpenAI(base_url=f"{fim_url}/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(
        model="coder", prompt=TRICKY_PREFIX, suffix=SUFFIX, max_tokens=3, stream=True
    )
    assert [chunk.choices[0].finish_reason for chunk in stream][-1] == "length"
    expected = coder_layout(fim_model_dir, TRICKY_PREFIX, SUFFIX)
    assert last_prompt() == expected
    assert CODER["mid"] not in expected[:-1]  # the spelled-out token stayed text


def test_empty_openai_suffix_is_a_plain_continuation(
    fim_url: str, recorded: list[GenerationRequest], last_prompt: Callable[[], list[int]]
) -> None:
    client = openai.OpenAI(base_url=f"{fim_url}/v1", api_key="x", max_retries=0, timeout=60)
    client.completions.create(model="tiny", prompt=PREFIX, suffix="", max_tokens=2)
    assert recorded[-1].prompt == PREFIX  # nothing after the cursor: the text as sent


def test_native_generate_layout_prefix_or_prompt(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    extra = [{"filename": "a.py", "text": "A = 1\n"}]
    for field in ("prefix", "prompt"):
        body = {"model": "coder", field: PREFIX, "suffix": SUFFIX, "extra": extra}
        answer = httpx.post(f"{fim_url}/api/generate", json={**body, "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert last_prompt() == coder_layout(
            fim_model_dir, PREFIX, SUFFIX, extra=(("a.py", "A = 1\n"),)
        )


def test_websocket_prefix_suffix_layout(
    fim_url: str, fim_model_dir: Path, last_prompt: Callable[[], list[int]]
) -> None:
    with connect(ws_url(fim_url), open_timeout=30) as ws:
        ws.send(json.dumps({"model": "coder", "prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 2}))
        while "done" not in (frame := ws_receive(ws)):
            assert "token" in frame, frame
    assert last_prompt() == coder_layout(fim_model_dir, PREFIX, SUFFIX)
    assert frame["usage"]["prompt_tokens"] == len(coder_layout(fim_model_dir, PREFIX, SUFFIX))


# --- a model without FIM tokens --------------------------------------------------------------


def test_openai_suffix_on_a_model_without_fim_is_a_400(fim_url: str) -> None:
    client = openai.OpenAI(base_url=f"{fim_url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="x = ", suffix="\n", max_tokens=2)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "fim_unsupported" and error["param"] == "suffix"
    assert "cannot fill in the middle" in error["message"]


def test_infill_on_a_model_without_fim_is_a_400_in_llamacpp_shape(fim_url: str) -> None:
    body = {"model": "tiny", "input_prefix": "a", "input_suffix": "b"}
    answer = httpx.post(f"{fim_url}/infill", json=body, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert "cannot fill in the middle" in error["message"]


@pytest.mark.parametrize("field", ["prefix", "prompt"])
def test_native_suffix_on_a_model_without_fim_is_a_400(fim_url: str, field: str) -> None:
    body = {"model": "tiny", field: "a", "suffix": "b"}
    answer = httpx.post(f"{fim_url}/api/generate", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "fim_unsupported"


def test_websocket_suffix_on_a_model_without_fim_is_an_error_frame(fim_url: str) -> None:
    with connect(ws_url(fim_url), open_timeout=30) as ws:
        ws.send(json.dumps({"model": "tiny", "prompt": "a", "suffix": "b"}))
        error = ws_receive(ws)
        assert error["error"]["code"] == "fim_unsupported"
        assert "cannot fill in the middle" in error["error"]["message"]
        ws.send(json.dumps({"model": "tiny", "prompt": "still serving", "max_tokens": 2}))
        while "done" not in (frame := ws_receive(ws)):
            assert "token" in frame
        assert frame["finish_reason"] in ("length", "stop")


def test_bad_infill_input_is_a_400_and_the_server_keeps_serving(fim_url: str) -> None:
    for body in (
        {"model": "coder", "input_prefix": "a"},  # no input_suffix
        {"model": "coder", "input_prefix": "a", "input_suffix": "b", "input_extra": [{}]},
        {"model": "coder", "input_prefix": "a", "input_suffix": "b", "samplers": ["bogus"]},
        {"model": "coder", "input_prefix": 1, "input_suffix": "b"},
    ):
        answer = httpx.post(f"{fim_url}/infill", json=body, timeout=60)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["type"] == "invalid_request_error"
    ok = {"model": "coder", "input_prefix": "a", "input_suffix": "b", "n_predict": 1}
    assert httpx.post(f"{fim_url}/infill", json=ok, timeout=60).status_code == 200


# --- the layout's truncation, without a model ------------------------------------------------

TOKENS = FimTokens(pre=1001, suf=1002, mid=1003, rep=1004, sep=1005, bos=1000)


def pieces(prefix: int, suffix: int, extra: int = 0) -> FimPieces:
    return FimPieces(
        prefix=list(range(prefix)),
        prompt=[],
        suffix=list(range(5000, 5000 + suffix)),
        extra=[([7], list(range(9000, 9000 + extra)))] if extra else [],
        repo_name=[8],
        current_file=[9],
        snippet=[6],
    )


def test_parts_that_fit_are_kept_whole() -> None:
    prompt = layout(TOKENS, pieces(10, 5), context=1000, max_tokens=100)
    assert not prompt.truncated
    assert prompt.tokens == [
        1000, 1004, 8, 1005, 9, 1001, *range(10), 1002, *range(5000, 5005), 1003,
    ]  # fmt: skip


def test_a_long_prefix_keeps_its_end_and_a_stable_start() -> None:
    context, max_tokens = 1000, 100
    starts = set()
    for length in range(2000, 2040):  # typing: the prefix grows at its end
        prompt = layout(TOKENS, pieces(length, 5), context=context, max_tokens=max_tokens)
        assert prompt.truncated and len(prompt.tokens) < context - max_tokens
        kept = prompt.tokens[prompt.tokens.index(1001) + 1 : prompt.tokens.index(1002)]
        assert kept[-1] == length - 1  # the text just before the cursor is always there
        starts.add(kept[0])
    # The start moves by whole blocks, not with every keystroke: the cache stays valid.
    assert len(starts) <= 2


def test_a_long_suffix_keeps_its_start_and_extra_files_their_end() -> None:
    prompt = layout(TOKENS, pieces(10, 5000, extra=5000), context=1000, max_tokens=100)
    ids = prompt.tokens
    suffix = ids[ids.index(1002) + 1 : -1]
    assert prompt.truncated and suffix[0] == 5000 and len(suffix) < 5000
    assert 9000 + 4999 in ids and 9000 not in ids  # the extra text's end, nearest the file

"""What the OpenAI API gained beyond one choice of one text prompt: ``n``, ``best_of``,
``echo`` with prompt logprobs, token-id prompts and embedding inputs (LangChain's default),
``dimensions``, and a forced tool call cut off by ``max_tokens``. Driven by the official
``openai`` client (and LangChain's ``OpenAIEmbeddings``) against a real server.
"""

from __future__ import annotations

import importlib.resources
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import isolated_settings, run_server
from prometheus_client.parser import text_string_to_metric_families
from tiny_gguf import vocabulary

from shimmy.api.openai.token_ids import CL100K_FILE

TOKENS, _ = vocabulary()
BOS = TOKENS.index("<s>")
# The tiny vocabulary is byte-level: token id b is the byte b.
HI = [BOS, ord("H"), ord("i")]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,12}$"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def api_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = isolated_settings(tiny_model_dir, tmp_path_factory.mktemp("openai-gaps"))
    with run_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- n and best_of ----------------------------------------------------------------------------


def forks(api_url: str) -> float:
    """How many sequences so far copied a sibling's prompt KV (``shimmy_prompt_forks``)."""
    metrics = httpx.get(f"{api_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(metrics):
        if family.name == "shimmy_prompt_forks":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return 0.0


def test_n_chat_choices_are_independent_and_reproducible(
    client: openai.OpenAI, api_url: str
) -> None:
    def ask() -> Any:
        return client.chat.completions.create(
            model="tiny", messages=user("Three, please"), n=3, max_tokens=8, seed=7
        )

    before = forks(api_url)
    reply = ask()
    # The prompt was decoded once: the other two choices copied its KV.
    assert forks(api_url) - before == 2
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) >= 2  # each choice samples with a seed of its own
    assert all(c.finish_reason in ("length", "stop") for c in reply.choices)
    assert reply.usage is not None
    # The tiny model (almost) never ends a reply; "stop" is accepted to stay honest about it.
    assert reply.usage.completion_tokens == 24 or any(
        c.finish_reason == "stop" for c in reply.choices
    )
    assert [c.message.content for c in ask().choices] == texts


def test_n_text_completions_per_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny", prompt=["one", "two"], n=3, max_tokens=16, seed=3, logprobs=0
    )
    assert [c.index for c in reply.choices] == list(range(6))

    def sample(choice: Any) -> tuple[Any, ...]:
        # Invalid UTF-8 of different bytes reads the same (U+FFFD); the logprobs tell apart.
        return (choice.text, *choice.logprobs.token_logprobs)

    # Were the seeds shared, the choices of a prompt would be the same; as they are not,
    # only a peaked distribution makes two agree now and then.
    assert len({sample(c) for c in reply.choices[:3]}) >= 2
    assert len({sample(c) for c in reply.choices[3:]}) >= 2
    single = client.completions.create(model="tiny", prompt="one", max_tokens=4, seed=3)
    assert reply.usage is not None and single.usage is not None
    # The prompts are counted once each; every choice's tokens are counted.
    assert reply.usage.prompt_tokens == 2 * single.usage.prompt_tokens
    assert reply.usage.completion_tokens == 96 or any(
        c.finish_reason == "stop" for c in reply.choices
    )


def _mean_logprob(choice: Any) -> float:
    values = choice.logprobs.token_logprobs
    return sum(values) / len(values)


def test_best_of_returns_the_likeliest_candidate(client: openai.OpenAI) -> None:
    every = client.completions.create(
        model="tiny", prompt="Pick", n=4, max_tokens=6, seed=21, logprobs=0
    )
    likeliest = max(every.choices, key=_mean_logprob)
    best = client.completions.create(model="tiny", prompt="Pick", best_of=4, max_tokens=6, seed=21)
    [choice] = best.choices
    assert choice.text == likeliest.text
    assert choice.logprobs is None  # scored to rank them, not asked for
    assert best.usage is not None
    assert best.usage.completion_tokens == 24 or any(
        c.finish_reason == "stop" for c in every.choices
    )


# --- echo and prompt logprobs -----------------------------------------------------------------


def test_echo_scores_every_prompt_token(client: openai.OpenAI) -> None:
    # What lm-evaluation-harness's loglikelihood asks: the prompt echoed and scored.
    reply = client.completions.create(model="tiny", prompt=HI, echo=True, logprobs=2, max_tokens=0)
    [choice] = reply.choices
    assert choice.text == "Hi"
    assert choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens == ["", "H", "i"]  # BOS has no text
    assert logprobs.token_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == [0, 0, 1]
    assert reply.usage is not None and reply.usage.completion_tokens == 0


def test_a_prompt_tokens_score_is_the_models_prediction_of_it(client: openai.OpenAI) -> None:
    """The score of the last prompt token equals the logprob the model gave that token when
    it was the next one to generate: the scores sit at the right positions."""
    ahead = client.completions.create(
        model="tiny", prompt=HI, max_tokens=1, logprobs=20, temperature=0
    )
    logprobs = ahead.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    top = logprobs.top_logprobs[0]
    text, predicted = next((t, lp) for t, lp in top.items() if len(t) == 1 and t.isalnum())
    scored = client.completions.create(
        model="tiny", prompt=[*HI, ord(text)], echo=True, logprobs=0, max_tokens=0
    )
    scores = scored.choices[0].logprobs
    assert scores is not None and scores.token_logprobs is not None
    last = scores.token_logprobs[-1]
    assert last is not None and math.isclose(last, predicted, abs_tol=1e-3)


def test_echo_with_a_completion_joins_both(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny", prompt="Echo me", echo=True, logprobs=0, max_tokens=3
    )
    [choice] = reply.choices
    assert choice.text.startswith("Echo me")
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and reply.usage is not None
    assert len(logprobs.tokens) == reply.usage.prompt_tokens + 3
    assert logprobs.text_offset is not None and logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = client.completions.create(
        model="tiny", prompt="Echo me", echo=True, max_tokens=3, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed).startswith("Echo me")


# --- token-id prompts ---------------------------------------------------------------------------


def test_token_id_prompts(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt=[HI, HI[:2]], max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens == 5
    assert len(reply.choices) == 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=[1, 2, 10**6], max_tokens=2)
    assert "vocabulary" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[[1, "x"]], max_tokens=2)  # type: ignore[list-item]
    assert client.completions.create(model="tiny", prompt=HI, max_tokens=1).choices


# --- a forced tool call cut off ---------------------------------------------------------------


def test_cut_off_forced_tool_call_is_length_without_json(client: openai.OpenAI) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="tiny", messages=user("w"), tools=[WEATHER_TOOL], tool_choice=forced, max_tokens=3
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None
    assert not choice.message.tool_calls
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("w"),
        tools=[WEATHER_TOOL],
        tool_choice=forced,
        max_tokens=3,
        stream=True,
    )
    chunks = list(stream)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


# --- embeddings ---------------------------------------------------------------------------------


def test_dimensions_must_be_the_models(client: openai.OpenAI) -> None:
    assert len(client.embeddings.create(model="tiny", input="x", dimensions=64).data[0].embedding)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny", input="x", dimensions=32)
    assert caught.value.body["param"] == "dimensions"
    assert "64" in caught.value.message


@pytest.fixture
def tiktoken_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's cl100k data for the client, without a download: its cache holds the file
    under the name tiktoken gives it (a digest of where it would be downloaded from)."""
    source = importlib.resources.files("tiktoken_ext").joinpath(CL100K_FILE)
    with importlib.resources.as_file(source) as path:
        shutil.copy(path, tmp_path / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


@pytest.mark.usefixtures("tiktoken_offline")
def test_langchain_openai_embeddings_with_default_settings(
    client: openai.OpenAI, api_url: str
) -> None:
    from langchain_openai import OpenAIEmbeddings

    # Defaults: LangChain tokenizes with tiktoken and sends cl100k token ids.
    embeddings = OpenAIEmbeddings(model="tiny", base_url=f"{api_url}/v1", api_key="unused")
    docs = ["The first document.", "Ein zweites Dokument, naïve café."]
    vectors = embeddings.embed_documents(docs)
    query = embeddings.embed_query(docs[0])
    direct = client.embeddings.create(model="tiny", input=docs, encoding_format="float")
    for got, want in zip(vectors, direct.data, strict=True):
        np.testing.assert_allclose(got, want.embedding, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(query, direct.data[0].embedding, rtol=1e-4, atol=1e-6)


def test_model_token_ids_embed_like_their_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, embedding_token_ids="model")
    with run_server(settings) as url:
        local = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ids = local.embeddings.create(model="tiny", input=[HI], encoding_format="float")
        text = local.embeddings.create(model="tiny", input="Hi", encoding_format="float")
        np.testing.assert_allclose(ids.data[0].embedding, text.data[0].embedding, rtol=1e-5)
        with pytest.raises(openai.BadRequestError) as caught:
            local.embeddings.create(model="tiny", input=[[15339, 1917]])
        assert "vocabulary" in caught.value.message

"""The native REST API (/api/generate, /api/models, /api/health) on a real uvicorn.

The tiny model emits random bytes, so these tests check shapes, UTF-8 integrity, determinism and
bookkeeping, never wording. Wording-level checks run on the starter model (marked ``starter``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT

from shimmy.settings import Settings


def generate(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/api/generate", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def sse_events(response: httpx.Response) -> list[Any]:
    """Parse a finished SSE body into its ``data`` payloads ([DONE] kept as the string)."""
    raw = response.read().decode("utf-8")  # strict: any invalid UTF-8 fails the test
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_generate(url: str, **body: Any) -> tuple[httpx.Response, list[Any]]:
    with httpx.stream(
        "POST", f"{url}/api/generate", json={"model": "tiny", "stream": True, **body}, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        return response, sse_events(response)


def health(url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/api/health", timeout=30).json()
    return data


def wait_until_idle(url: str, polls: int = 200) -> bool:
    """Poll /api/health (each poll a real request, no sleeps) until no slot is busy."""
    return any(health(url)["slots"]["busy"] == 0 for _ in range(polls))


@pytest.fixture
def open_stream() -> Iterator[Callable[[str, dict[str, Any]], httpx.Response]]:
    """Open a streaming /api/generate whose first event has been read; closed after the test."""
    clients: list[httpx.Client] = []
    line_iterators: list[Iterator[str]] = []

    def start(url: str, body: dict[str, Any]) -> httpx.Response:
        client = httpx.Client(timeout=60)
        clients.append(client)
        request = client.build_request("POST", f"{url}/api/generate", json=body)
        response = client.send(request, stream=True)
        assert response.status_code == 200
        lines = response.iter_lines()
        # Keep the iterator referenced: when it is garbage-collected, httpx closes the response.
        line_iterators.append(lines)
        assert next(lines).startswith('data: {"choices"')
        return response

    yield start
    for client in clients:
        client.close()


# --- /api/health and /api/models ------------------------------------------------------------
def test_health_reports_status_memory_version_and_slots(tiny_server: str) -> None:
    data = health(tiny_server)
    assert data["status"] == "healthy"
    assert data["models_loaded"] == 0
    assert data["memory_usage"].endswith(("MB", "GB"))
    assert float(data["memory_usage"][:-2]) > 0
    assert isinstance(data["version"], str) and data["version"]
    assert data["uptime_seconds"] >= 0
    assert data["slots"] == {"busy": 0, "total": 0, "queued": 0}

    generate(tiny_server, prompt="hi", max_tokens=2)
    data = health(tiny_server)
    assert data["models_loaded"] == 1
    assert data["slots"] == {"busy": 0, "total": 4, "queued": 0}


def test_models_lists_tiny_as_default_and_tracks_loading(tiny_server: str) -> None:
    data = httpx.get(f"{tiny_server}/api/models").json()
    assert data["default"] == "tiny"
    [model] = data["models"]
    assert model["id"] == "tiny"
    assert model["architecture"] == "llama"
    assert model["context_length"] == 4096
    assert model["size_bytes"] > 0
    assert model["loaded"] is False

    generate(tiny_server, prompt="hi", max_tokens=1)
    [model] = httpx.get(f"{tiny_server}/api/models").json()["models"]
    assert model["loaded"] is True


# --- /api/generate ------------------------------------------------------------------------------
def test_generate_returns_the_contract_shape(tiny_server: str) -> None:
    data = generate(tiny_server, prompt="Hello", max_tokens=8, temperature=0)
    assert data["id"].startswith("gen-") and len(data["id"]) > 8
    assert data["model"] == "tiny"
    assert isinstance(data["created"], int) and data["created"] > 1_600_000_000
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_default_model_is_used_when_none_is_named(tiny_server: str) -> None:
    for body in (
        {"prompt": "x", "max_tokens": 2},
        {"model": "default", "prompt": "x", "max_tokens": 2},
    ):
        response = httpx.post(f"{tiny_server}/api/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "tiny"


def test_max_tokens_ends_with_length(tiny_server: str) -> None:
    data = generate(tiny_server, prompt="count", max_tokens=17, temperature=0)
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 17


def test_max_tokens_is_clamped_to_the_server_cap(
    tiny_settings: Settings, server_factory: Callable[[Settings], str]
) -> None:
    url = server_factory(tiny_settings.model_copy(update={"max_tokens_cap": 5}))
    data = generate(url, prompt="count", max_tokens=500, temperature=0)
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5


def test_greedy_generation_is_deterministic(tiny_server: str) -> None:
    first = generate(tiny_server, prompt="Once upon a time", max_tokens=40, temperature=0)
    second = generate(tiny_server, prompt="Once upon a time", max_tokens=40, temperature=0)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"] != ""


def test_stream_is_well_formed_utf8_and_matches_non_stream_for_a_seed(tiny_server: str) -> None:
    body = {"prompt": "Tell me", "max_tokens": 120, "temperature": 1.0, "seed": 1234}
    response, events = stream_generate(tiny_server, **body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"

    assert events[-1] == "[DONE]"
    final = events[-2]
    pieces = events[:-2]
    assert pieces, "expected at least one text event"
    for event in pieces:
        [choice] = event["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] is None
        assert isinstance(choice["text"], str) and choice["text"]
        choice["text"].encode("utf-8")  # no lone surrogates: whole characters only
    assert final["choices"] == [{"text": "", "index": 0, "finish_reason": "length"}]
    assert final["usage"]["completion_tokens"] == 120

    streamed = "".join(event["choices"][0]["text"] for event in pieces)
    whole = generate(tiny_server, **body)
    assert whole["choices"][0]["text"] == streamed
    assert whole["usage"] == final["usage"]


def test_stop_string_cuts_the_text_before_it(tiny_server: str) -> None:
    body = {"prompt": "The stop test", "max_tokens": 80, "temperature": 0}
    full = generate(tiny_server, **body)["choices"][0]["text"]
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    assert len(stop) == 3
    expected = full[: full.index(stop)]

    data = generate(tiny_server, **body, stop=[stop])
    assert data["choices"][0]["text"] == expected
    assert data["choices"][0]["finish_reason"] == "stop"

    _, events = stream_generate(tiny_server, **body, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_messages_and_system_are_rendered_into_the_prompt(tiny_server: str) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    plain = generate(tiny_server, messages=messages, max_tokens=3)
    with_system = generate(
        tiny_server, messages=messages, system="You are a careful assistant.", max_tokens=3
    )
    parts = generate(
        tiny_server,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        max_tokens=3,
    )
    assert plain["usage"]["prompt_tokens"] > 3  # the template adds its own markup
    assert with_system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert parts["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_repeat_penalty_is_an_alias_of_repetition_penalty(tiny_server: str) -> None:
    body = {"prompt": "x", "max_tokens": 12, "temperature": 0}
    a = generate(tiny_server, **body, repetition_penalty=1.5)
    b = generate(tiny_server, **body, repeat_penalty=1.5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    bad = httpx.post(f"{tiny_server}/api/generate", json={**body, "repeat_penalty": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["details"].startswith("repeat_penalty:")


def test_unknown_fields_are_ignored(tiny_server: str) -> None:
    # Not Ollama's fields, though: those get a 400 pointing to Ollama's API (test_ollama.py).
    data = generate(tiny_server, prompt="x", max_tokens=2, user="me", keep_alive=5)
    assert data["usage"]["completion_tokens"] <= 2


def test_errors_before_the_first_event_are_plain_json(tiny_server: str) -> None:
    response = httpx.post(
        f"{tiny_server}/api/generate",
        json={"model": "tiny", "prompt": "a b " * 1000, "stream": True},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "context_length_exceeded"


# --- cancellation and back-pressure ---------------------------------------------------------
def test_client_disconnect_cancels_the_generation(
    long_server: Callable[..., str],
    open_stream: Callable[[str, dict[str, Any]], httpx.Response],
) -> None:
    url = long_server()
    body = {"model": "tiny", "prompt": "go", "max_tokens": LONG_CONTEXT - 100, "stream": True}
    response = open_stream(url, body)
    assert health(url)["slots"]["busy"] == 1  # still generating: far from max_tokens
    response.close()
    assert wait_until_idle(url)


def test_client_disconnect_cancels_a_non_streaming_generation(
    long_server: Callable[..., str],
) -> None:
    url = long_server()
    body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": LONG_CONTEXT - 100})
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        raw.sendall(
            (
                f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        assert any(health(url)["slots"]["busy"] == 1 for _ in range(200))
    assert wait_until_idle(url)


def test_full_queue_is_503_with_retry_after(
    long_server: Callable[..., str],
    open_stream: Callable[[str, dict[str, Any]], httpx.Response],
) -> None:
    url = long_server(max_queue=0)
    open_stream(
        url, {"model": "tiny", "prompt": "go", "max_tokens": LONG_CONTEXT - 100, "stream": True}
    )
    for stream in (False, True):
        response = httpx.post(
            f"{url}/api/generate",
            json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": stream},
            timeout=60,
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "server_busy"
        assert int(response.headers["retry-after"]) >= 1


# --- the real starter model ---------------------------------------------------------------------
@pytest.mark.starter
def test_starter_chat_answers(starter_server: str) -> None:
    response = httpx.post(
        f"{starter_server}/api/generate",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 40,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["choices"][0]["text"].strip()
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] > 0


@pytest.mark.starter
def test_starter_streams_sse(starter_server: str) -> None:
    with httpx.stream(
        "POST",
        f"{starter_server}/api/generate",
        json={"prompt": "Write a short sentence about the sea.", "max_tokens": 30, "stream": True},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-2]["usage"]["completion_tokens"] > 0
    assert "".join(e["choices"][0]["text"] for e in events[:-2]).strip()

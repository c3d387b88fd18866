"""Keystroke latency on real llama.cpp: successive completions reuse the cached prefix, and a
new completion from the same client replaces the one still running instead of waiting."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings, run_server
from fim_helpers import common_prefix, recording_factory
from tiny_gguf import fim_token_ids, write_tiny_gguf

from shimmy.engine.types import GenerationRequest
from shimmy.registry import ModelRegistry

# About 400 tokens of code; the cursor sits in the middle and the user types there.
FILE = "".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n" for i in range(16))
CURSOR = len(FILE) // 2
TYPED = "result = compute(values, scale=2)"


@pytest.fixture(scope="module")
def recorded() -> list[GenerationRequest]:
    return []


@pytest.fixture
def serve(
    fim_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    recorded: list[GenerationRequest],
) -> Iterator[Callable[..., str]]:
    """Start servers on the FIM models whose engines record their requests."""
    with contextlib.ExitStack() as stack:

        def start(model_dir: Path = fim_model_dir, **overrides: Any) -> str:
            tmp = tmp_path_factory.mktemp("latency")
            settings = isolated_settings(model_dir, tmp, **{"ctx_size": 2048, **overrides})
            registry = ModelRegistry(settings, engine_factory=recording_factory(recorded))
            return stack.enter_context(run_server(settings, registry))

        yield start


def keystroke(url: str, typed: str, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "coder",
        "input_prefix": FILE[:CURSOR] + typed,
        "input_suffix": FILE[CURSOR:],
        "n_predict": 4,
        **extra,
    }
    answer = httpx.post(f"{url}/infill", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def prompt_of(request: GenerationRequest) -> list[int]:
    assert isinstance(request.prompt, list)
    return request.prompt


def test_each_keystroke_reuses_the_cached_text_before_the_cursor(
    serve: Callable[..., str], recorded: list[GenerationRequest]
) -> None:
    url = serve(parallel=2)
    recorded.clear()
    results = [keystroke(url, TYPED[:n]) for n in range(0, len(TYPED) + 1, 6)]
    prompts = [prompt_of(r) for r in recorded]
    assert len(prompts) == len(results)
    suf = fim_token_ids("repo")["suf"]
    for before, now, result in zip(prompts, prompts[1:], results[1:], strict=False):
        timings = result["timings"]
        # Exactly what the two prompts share was reused...
        assert timings["cache_n"] == common_prefix(before, now)
        # ...which is everything up to the previous cursor but its last token or two (typing
        # may merge them into new ones): only the typed text, the suffix and the FIM markers
        # were decoded again.
        assert timings["cache_n"] >= before.index(suf) - 2
        assert timings["prompt_n"] == len(now) - timings["cache_n"]
        assert timings["prompt_n"] <= len(now) - before.index(suf) + 2


def test_without_the_prefix_cache_every_keystroke_decodes_everything(
    serve: Callable[..., str], recorded: list[GenerationRequest]
) -> None:
    url = serve(parallel=2, prefix_cache=False)
    recorded.clear()
    for n in (0, 3, 6):
        timings = keystroke(url, TYPED[:n])["timings"]
        assert timings["cache_n"] == 0
        assert timings["prompt_n"] == len(prompt_of(recorded[-1]))


@pytest.fixture(scope="module")
def long_fim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("long-fim")
    write_tiny_gguf(folder / "coder.gguf", fim="repo", name="coder", context_length=LONG_CONTEXT)
    return folder


def busy_slots(url: str) -> int:
    busy: int = httpx.get(f"{url}/api/health", timeout=30).json()["slots"]["busy"]
    return busy


def test_a_new_completion_from_the_same_client_replaces_the_running_one(
    serve: Callable[..., str], long_fim_dir: Path, recorded: list[GenerationRequest]
) -> None:
    # One slot and no queue: a second request can only run once the first has let go.
    url = serve(long_fim_dir, ctx_size=LONG_CONTEXT, parallel=1, max_queue=0,
                max_tokens_cap=LONG_CONTEXT)  # fmt: skip
    recorded.clear()
    editor = {"X-Client-Id": "editor-window-1"}
    long = {
        "model": "coder",
        "input_prefix": FILE[:CURSOR],
        "input_suffix": FILE[CURSOR:],
        "n_predict": LONG_CONTEXT - 2000,
        "stream": True,
    }
    events: list[dict[str, Any]] = []
    first_event = threading.Event()

    def read_stream() -> None:  # the editor keeps reading its stream, as clients do
        with httpx.stream("POST", f"{url}/infill", json=long, headers=editor, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(json.loads(line.removeprefix("data: ")))
                    first_event.set()
        first_event.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    try:
        assert first_event.wait(60) and events and events[0]["stop"] is False
        next_key = {**long, "input_prefix": FILE[:CURSOR] + "x", "n_predict": 3, "stream": False}
        # The control: another client finds the one slot taken.
        refused = httpx.post(f"{url}/infill", json=next_key, timeout=60)
        assert refused.status_code == 503
        # The same client's next keystroke replaces its stale completion.
        answer = httpx.post(f"{url}/infill", json=next_key, headers=editor, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        reader.join(60)
    replaced = events[-1]
    assert replaced["stop"] is True and replaced["stop_type"] == "none"
    assert replaced["tokens_predicted"] < long["n_predict"]  # type: ignore[operator]
    # It took over the replaced one's slot and cache: the text before the cursor was reused.
    old, new = prompt_of(recorded[0]), prompt_of(recorded[-1])
    assert answer.json()["timings"]["cache_n"] == common_prefix(old, new) > len(new) // 3
    assert busy_slots(url) == 0

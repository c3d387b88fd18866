"""The engine seam: real routes served by a scripted FakeEngine, no llama.cpp involved."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import isolated_settings
from test_metrics import scrape, value

from shimmy.engine.fake import FakeEngine
from shimmy.engine.types import GenerationRequest
from shimmy.registry import ModelRegistry


def test_routes_answer_from_the_engine_the_registry_makes(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path)
    seen: list[GenerationRequest] = []

    def script(request: GenerationRequest) -> list[str]:
        seen.append(request)
        return ["Hello", ",", " world", "!"]

    factory = functools.partial(FakeEngine, script=script)
    url = server_factory(settings, ModelRegistry(settings, engine_factory=factory))
    with httpx.Client(base_url=url, timeout=30) as client:
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200, chat.text
        choice = chat.json()["choices"][0]
        assert choice["message"]["content"] == "Hello, world!"
        assert choice["finish_reason"] == "stop"
        assert chat.json()["usage"]["completion_tokens"] == 4
        assert isinstance(seen[0].prompt, str) and "hi" in seen[0].prompt

        cut = client.post("/api/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert cut.status_code == 200, cut.text
        assert cut.json()["choices"][0]["text"] == "Hello,"
        assert cut.json()["choices"][0]["finish_reason"] == "length"

        # Both generations reached the app's metrics through the registry's hooks.
        assert value(scrape(client), "shimmy_completion_tokens_total", model="tiny") == 6

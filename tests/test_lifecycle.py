"""Model lifecycle through the real HTTP API: several models, LRU, keep_alive, load/unload,
loading once, config file, pull and delete."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings
from test_pull import MirrorServer
from tiny_gguf import write_tiny_gguf

from shimmy.engine.local import LocalEngine
from shimmy.engine.protocol import EngineHooks
from shimmy.engine.types import GenerationRequest
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.registry import ModelRegistry
from shimmy.settings import Settings

ServerFactory = Callable[..., str]
POLLS = 400


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("three-models")
    for seed, name in enumerate(["alpha", "beta", "gamma"]):
        write_tiny_gguf(folder / f"{name}.gguf", seed=seed, name=name)
    return folder


def generate(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 3, **extra}
    return httpx.post(f"{url}/api/generate", json=body, timeout=60)


def loaded(url: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{url}/api/models/loaded", timeout=30)
    assert response.status_code == 200
    return {m["id"]: m for m in response.json()["models"]}


def wait_until(condition: Callable[[], bool]) -> bool:
    """Poll a condition over HTTP a bounded number of times (keep_alive is wall-clock based)."""
    for _ in range(POLLS):
        if condition():
            return True
        threading.Event().wait(0.02)
    return condition()


def test_two_models_are_served_at_once(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path, max_loaded_models=3))
    assert generate(url, "alpha").status_code == 200
    assert generate(url, "beta").status_code == 200
    assert set(loaded(url)) == {"alpha", "beta"}
    models = {m["id"]: m for m in httpx.get(f"{url}/api/models").json()["models"]}
    assert models["alpha"]["loaded"] and models["beta"]["loaded"]
    assert not models["gamma"]["loaded"]


def test_least_recently_used_model_is_evicted(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path, max_loaded_models=2))
    generate(url, "alpha")
    generate(url, "beta")
    generate(url, "alpha")  # beta is now the least recently used
    assert generate(url, "gamma").status_code == 200
    assert set(loaded(url)) == {"alpha", "gamma"}


def test_keep_alive_zero_unloads_after_the_request(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path, keep_alive=-1))
    assert generate(url, "alpha").status_code == 200
    assert generate(url, "beta", keep_alive=0).status_code == 200
    assert wait_until(lambda: "beta" not in loaded(url))
    assert "alpha" in loaded(url)  # keep_alive -1: never unloaded


def test_default_keep_alive_expires_idle_models(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path, keep_alive=0.3))
    assert generate(url, "alpha").status_code == 200
    info = loaded(url)["alpha"]
    assert info["keep_alive"] == 0.3
    assert wait_until(lambda: not loaded(url))


def test_keep_alive_accepts_durations_and_rejects_garbage(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    assert generate(url, "alpha", keep_alive="10m").status_code == 200
    assert loaded(url)["alpha"]["keep_alive"] == 600
    bad = generate(url, "alpha", keep_alive="soon")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"


def test_load_and_unload_endpoints(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    first = httpx.post(f"{url}/api/models/gamma/load", timeout=60)
    assert first.status_code == 200
    assert first.json()["loaded"] and not first.json()["already_loaded"]
    again = httpx.post(f"{url}/api/models/gamma/load", json={"keep_alive": -1}, timeout=60)
    assert again.json()["already_loaded"]
    assert loaded(url)["gamma"]["keep_alive"] == -1
    gone = httpx.post(f"{url}/api/models/gamma/unload", timeout=60)
    assert gone.json() == {"id": "gamma", "unloaded": True}
    assert loaded(url) == {}
    assert httpx.post(f"{url}/api/models/gamma/unload").json()["unloaded"] is False
    missing = httpx.post(f"{url}/api/models/nope/load")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_concurrent_first_requests_load_the_model_once(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{url}/api/generate", json={"model": "beta", "prompt": str(i)})
                for i in range(12)
            )
        )
    assert all(r.status_code == 200 for r in responses)
    assert loaded(url)["beta"]["load_count"] == 1


class GatedFactory:
    """Builds real engines, but only once the test opens the gate: keeps a load in progress."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(
        self, entry: ModelEntry, settings: Settings, options: ModelOptions, *, hooks: EngineHooks
    ) -> LocalEngine:
        self.gate.wait(30)
        return LocalEngine(entry, settings, options, hooks=hooks)


async def test_requests_wait_for_a_loading_model_or_get_503_if_asked(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    settings = isolated_settings(three_models, tmp_path)
    factory = GatedFactory()
    url = server_factory(settings, ModelRegistry(settings, engine_factory=factory))
    async with httpx.AsyncClient(timeout=60) as client:
        waiting = asyncio.create_task(
            client.post(f"{url}/api/generate", json={"model": "alpha", "prompt": "w"})
        )
        for _ in range(POLLS):  # until the load has started
            if (await client.get(f"{url}/api/models/loaded")).json()["loading"]:
                break
        impatient = await client.post(
            f"{url}/api/generate",
            json={"model": "alpha", "prompt": "x"},
            headers={"X-Shimmy-Wait": "false"},
        )
        assert impatient.status_code == 503
        assert impatient.json()["error"]["code"] == "model_loading"
        assert int(impatient.headers["Retry-After"]) >= 1
        other = await client.post(f"{url}/api/models/discover")  # not blocked meanwhile
        assert other.status_code == 200
        factory.gate.set()
        assert (await waiting).status_code == 200


def test_config_file_sets_aliases_context_and_sampling_defaults(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    config = tmp_path / "shimmy.toml"
    config.write_text(
        '[models.alpha]\naliases = ["first"]\nctx_size = 256\n'
        "[models.alpha.sampling]\ntemperature = 0.0\nmax_tokens = 7\n",
        encoding="utf-8",
    )
    url = server_factory(isolated_settings(three_models, tmp_path, config=config))
    response = generate(url, "first", max_tokens=None)
    assert response.status_code == 400  # explicit null is still validated
    body = {"model": "first", "prompt": "defaults"}
    a = httpx.post(f"{url}/api/generate", json=body, timeout=60).json()
    b = httpx.post(f"{url}/api/generate", json=body, timeout=60).json()
    assert a["model"] == "alpha"
    assert a["usage"]["completion_tokens"] == 7  # the configured max_tokens
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # temperature 0: greedy
    assert loaded(url)["alpha"]["context_length"] == 256
    too_long = httpx.post(
        f"{url}/api/generate", json={"model": "first", "prompt": "x" * 400}, timeout=60
    )
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_bad_config_file_stops_startup_with_a_clear_error(tmp_path: Path) -> None:
    from shimmy.models.config import ConfigError, load_config

    config = tmp_path / "bad.toml"
    config.write_text("[models.alpha]\nctx_sise = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ctx_sise"):
        load_config(config)


def test_pull_streams_progress_then_the_model_is_served_and_can_be_removed(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory, mirror: MirrorServer
) -> None:
    data = write_tiny_gguf(tmp_path / "src.gguf", seed=42).read_bytes()
    mirror.state.files["/files/pulled-model.gguf"] = data
    # The mirror is on loopback, which pulls may reach only when allowed.
    settings = isolated_settings(three_models, tmp_path, allow_private_pull=True)
    url = server_factory(settings)
    source = f"{mirror.url}/files/pulled-model.gguf"
    with httpx.stream("POST", f"{url}/api/pull", json={"model": source}, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp.iter_lines() if line]
    assert events[0]["status"] == "downloading"
    assert events[-1]["status"] == "success"
    assert events[-1]["id"] == "pulled-model"
    assert (settings.models_dir / "pulled-model.gguf").read_bytes() == data
    assert generate(url, "pulled-model").status_code == 200

    removed = httpx.delete(f"{url}/api/models/pulled-model", timeout=60)
    assert removed.status_code == 200
    assert not (settings.models_dir / "pulled-model.gguf").exists()
    assert generate(url, "pulled-model").status_code == 404


def test_models_outside_the_models_folder_are_never_deleted(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    refused = httpx.delete(f"{url}/api/models/alpha", timeout=60)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert (three_models / "alpha.gguf").exists()


@pytest.mark.parametrize("hostile", ["..%2F..%2Fetc", "a%00b", "x" * 300, ".hidden", "A/../b"])
def test_hostile_ids_on_lifecycle_endpoints_are_refused(
    hostile: str, three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    for method, path in [
        ("POST", f"/api/models/{hostile}/load"),
        ("POST", f"/api/models/{hostile}/unload"),
        ("DELETE", f"/api/models/{hostile}"),
    ]:
        response = httpx.request(method, f"{url}{path}", timeout=30)
        assert response.status_code in (400, 404), (method, path, response.text)
        assert response.json()["error"]["code"] in (
            "invalid_request",
            "not_found",
            "model_not_found",
        )
    assert sorted(p.name for p in three_models.iterdir()) == [
        "alpha.gguf",
        "beta.gguf",
        "gamma.gguf",
    ]


def test_pull_of_an_invalid_source_is_a_400(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path))
    response = httpx.post(f"{url}/api/pull", json={"model": "ftp://x/y.gguf"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


async def test_load_progress_reaches_one_for_the_loading_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reports: list[tuple[str, float]] = []
    hooks = EngineHooks(
        on_load_progress=lambda model_id, fraction: reports.append((model_id, fraction))
    )
    registry = ModelRegistry(isolated_settings(tiny_model_dir, tmp_path), hooks=hooks)
    registry.discover()
    try:
        await registry.get_engine("tiny")
    finally:
        await registry.aclose()
    fractions = [fraction for _, fraction in reports]
    assert {model_id for model_id, _ in reports} == {"tiny"}
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


async def test_a_failing_progress_observer_does_not_fail_the_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def broken(model_id: str, fraction: float) -> None:
        raise RuntimeError("observer bug")

    hooks = EngineHooks(on_load_progress=broken)
    registry = ModelRegistry(isolated_settings(tiny_model_dir, tmp_path), hooks=hooks)
    registry.discover()
    try:
        engine = await registry.get_engine("tiny")
        _, finished = await engine.submit(GenerationRequest(prompt="Hi", max_tokens=2)).collect()
        assert finished.usage.completion_tokens >= 1
    finally:
        await registry.aclose()


def test_pull_without_stream_answers_with_the_error_status(
    three_models: Path, tmp_path: Path, server_factory: ServerFactory, mirror: MirrorServer
) -> None:
    url = server_factory(isolated_settings(three_models, tmp_path, allow_private_pull=True))
    source = f"{mirror.url}/files/absent.gguf"
    response = httpx.post(f"{url}/api/pull", json={"model": source, "stream": False}, timeout=30)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "not_found",
        "message": "The specified model was not found",
        "details": f"absent.gguf was not found at 127.0.0.1:{mirror.server_address[1]}",
    }

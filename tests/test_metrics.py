"""GET /metrics: Prometheus text from a real server, parsed with prometheus_client's parser."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.datastructures import State

from shimmy import __version__
from shimmy.api.metrics import Metrics
from shimmy.engine.types import Usage
from shimmy.registry import ModelRegistry
from shimmy.settings import Settings


def scrape(client: httpx.Client) -> dict[str, list[Sample]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, list[Sample]], sample_name: str, **labels: str) -> float:
    """The one sample called ``sample_name`` whose labels include ``labels``."""
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    matches = [
        sample.value
        for sample in families.get(family, [])
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    ]
    assert len(matches) == 1, (sample_name, labels, families.get(family))
    return matches[0]


def test_requests_are_counted_by_route_template_and_status(client: httpx.Client) -> None:
    client.get("/api/health")
    client.get("/api/health")
    client.get("/no/such/page")
    client.post("/api/models/tiny/load", json={})
    client.get("/v1/models")
    client.request("PROPFIND", "/api/health")  # a method outside the label set
    families = scrape(client)
    requests = "shimmy_http_requests_total"
    assert value(families, requests, endpoint="/api/health", method="GET", status="200") == 2
    assert value(families, requests, endpoint="unmatched", method="GET", status="404") == 1
    assert value(families, requests, endpoint="/api/models/{id:path}/load", status="200") == 1
    assert value(families, requests, endpoint="/v1/models", method="GET", status="200") == 1
    assert value(families, requests, endpoint="/api/health", method="other", status="405") == 1
    endpoints = {sample.labels["endpoint"] for sample in families["shimmy_http_requests"]}
    assert not any("tiny" in endpoint or "no/such" in endpoint for endpoint in endpoints)
    duration = "shimmy_http_request_duration_seconds_count"
    assert value(families, duration, endpoint="/api/health") == 3


def test_generation_metrics_move(client: httpx.Client) -> None:
    before = scrape(client)
    assert value(before, "shimmy_models_loaded") == 0
    assert value(before, "shimmy_models_available") == 1

    single = client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "max_tokens": 5})
    many = client.post(
        "/api/generate/batch", json={"model": "tiny", "prompts": ["a", "b c"], "max_tokens": 4}
    )
    assert single.status_code == many.status_code == 200
    completion = single.json()["usage"]["completion_tokens"]
    batch_usage: dict[str, Any] = many.json()["usage"]

    after = scrape(client)
    model = {"model": "tiny"}
    assert value(after, "shimmy_models_loaded") == 1
    assert value(after, "shimmy_model_loads_total", **model) == 1
    assert value(after, "shimmy_model_load_seconds", **model) > 0
    assert value(after, "shimmy_model_memory_bytes", **model) > 0
    assert value(after, "shimmy_slots", **model) == 4
    assert value(after, "shimmy_slots_busy", **model) == 0
    assert value(after, "shimmy_queue_depth", **model) == 0
    generated = value(after, "shimmy_engine_tokens_generated_total", **model)
    assert generated == completion + batch_usage["completion_tokens"]
    finished = sum(
        value(after, "shimmy_engine_requests_finished_total", outcome=outcome, **model)
        for outcome in ("stop", "length")
    )
    assert finished == 3

    # Every generation (the engine's on_finish hook) feeds the token counters and
    # the latency histograms.
    completion_total = value(after, "shimmy_completion_tokens_total", **model)
    assert batch_usage["completion_tokens"] <= completion_total <= generated
    prompt_total = value(after, "shimmy_prompt_tokens_total", **model)
    assert prompt_total >= batch_usage["prompt_tokens"]
    assert value(after, "shimmy_time_to_first_token_seconds_count", **model) >= 2
    assert value(after, "shimmy_time_to_first_token_seconds_sum", **model) > 0
    assert value(after, "shimmy_time_per_output_token_seconds_count", **model) >= 1
    assert value(after, "shimmy_uptime_seconds") > 0
    assert value(after, "shimmy_info", version=__version__) == 1


def test_openmetrics_is_negotiated(client: httpx.Client) -> None:
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_each_app_has_its_own_registry(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    first = server_factory(isolated_settings(tiny_model_dir, tmp_path / "one"))
    second = server_factory(isolated_settings(tiny_model_dir, tmp_path / "two"))
    for _ in range(3):
        httpx.get(f"{first}/api/health", timeout=30)
    with (
        httpx.Client(base_url=first, timeout=30) as one,
        httpx.Client(base_url=second, timeout=30) as two,
    ):
        mine, theirs = scrape(one), scrape(two)
    health = {"endpoint": "/api/health", "status": "200"}
    assert value(mine, "shimmy_http_requests_total", **health) == 3
    assert not any(
        sample.labels.get("endpoint") == "/api/health"
        for sample in theirs.get("shimmy_http_requests", [])
    )


def test_engine_hook_target_records_a_generation(tiny_settings: Settings) -> None:
    metrics = Metrics(ModelRegistry(tiny_settings), State())
    enqueued = time.monotonic() - 1.0
    metrics.engine_finished("m", Usage(5, 11, 2), enqueued, enqueued + 0.25)
    metrics.engine_finished("m", Usage(3, 0, 0), enqueued, None)  # ended before any token
    body, _ = metrics.exposition("")
    families = {
        family.name: family.samples for family in text_string_to_metric_families(body.decode())
    }
    assert value(families, "shimmy_prompt_tokens_total", model="m") == 8
    assert value(families, "shimmy_prompt_tokens_cached_total", model="m") == 2
    assert value(families, "shimmy_completion_tokens_total", model="m") == 11
    assert value(families, "shimmy_time_to_first_token_seconds_count", model="m") == 1
    ttft = value(families, "shimmy_time_to_first_token_seconds_sum", model="m")
    assert ttft == pytest.approx(0.25)
    assert value(families, "shimmy_time_per_output_token_seconds_count", model="m") == 1
    per_token = value(families, "shimmy_time_per_output_token_seconds_sum", model="m")
    assert 0.07 < per_token < 1  # about 0.75 s over 10 intervals, plus the test's own time

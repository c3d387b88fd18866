"""Prometheus metrics: ``GET /metrics``.

Each app has its own ``CollectorRegistry`` (several apps live in one test process, and the
global default registry would mix their numbers). Three sources feed it:

- ``MetricsMiddleware`` counts HTTP requests by route template (``/api/models/{id}/load``, not
  the raw path, so label values stay few) and status, and times them.
- ``EngineCollector`` reads the loaded engines at scrape time: slots, queue depth, load time,
  memory, and the engines' own counters (tokens generated, prefix-cache reuse, finishes).
- ``Metrics.record_generation`` takes one finished generation: tokens in and out, time to first
  token and time per output token. ``observe_stream`` calls it for handlers that wrap their
  engine streams; an engine-side hook can call it for every generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from shimmy import __version__
from shimmy.api.asgi import run_and_report
from shimmy.api.routing import api_route
from shimmy.engine.types import Usage

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.datastructures import State

    from shimmy.engine.protocol import Engine
    from shimmy.registry import ModelRegistry

UNMATCHED = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)

# Engine counters exposed as Prometheus counters: (engine key, metric name, help).
ENGINE_COUNTERS = (
    ("tokens_generated", "shimmy_engine_tokens_generated", "Tokens sampled by the engine"),
    ("decode_steps", "shimmy_engine_decode_steps", "llama_decode calls"),
    ("prefix_hits", "shimmy_prefix_cache_hits", "Requests that reused a cached prompt prefix"),
    (
        "prefix_tokens_reused",
        "shimmy_prefix_cache_tokens_reused",
        "Prompt tokens whose KV cache was reused instead of decoded",
    ),
    ("rejected_busy", "shimmy_engine_rejected_busy", "Requests refused because the queue was full"),
    (
        "prompt_cache_saves",
        "shimmy_prompt_cache_saves",
        "Evicted sequences whose KV was saved to host memory",
    ),
    (
        "prompt_cache_restores",
        "shimmy_prompt_cache_restores",
        "Requests that resumed a sequence from host memory",
    ),
    (
        "prompt_cache_tokens_restored",
        "shimmy_prompt_cache_tokens_restored",
        "Prompt tokens reused from sequences restored from host memory",
    ),
    (
        "prompt_forks",
        "shimmy_prompt_forks",
        "Sequences that copied a sibling's prompt KV instead of decoding it (n > 1)",
    ),
    ("draft_tokens", "shimmy_speculative_draft_tokens", "Draft tokens verified (n-gram lookup)"),
    (
        "draft_tokens_accepted",
        "shimmy_speculative_draft_tokens_accepted",
        "Draft tokens the model confirmed",
    ),
)
# Engine values exposed as Prometheus gauges: (engine key, metric name, help).
ENGINE_GAUGES = (
    ("prompt_cache_entries", "shimmy_prompt_cache_entries", "Sequences saved in host memory"),
    ("prompt_cache_bytes", "shimmy_prompt_cache_bytes", "Host memory the saved sequences use"),
    (
        "prompt_cache_limit_bytes",
        "shimmy_prompt_cache_limit_bytes",
        "Host memory the saved sequences may use (cache_ram)",
    ),
)
FINISH_OUTCOMES = ("stop", "length", "cancelled", "timed_out")


class EngineCollector(Collector):
    """Gauges and counters read from the registry and its loaded engines at scrape time."""

    def __init__(self, registry: ModelRegistry, app_state: State) -> None:
        self.registry = registry
        self.app_state = app_state

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("shimmy_info", "shimmy build", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        started_at = getattr(self.app_state, "started_at", None)
        if started_at is not None:
            yield GaugeMetricFamily(
                "shimmy_uptime_seconds",
                "Seconds since the server started",
                value=time.monotonic() - started_at,
            )
        yield GaugeMetricFamily(
            "shimmy_models_available", "Models discovered", value=len(self.registry.entries)
        )
        engines = self.registry.loaded_engines()
        yield GaugeMetricFamily("shimmy_models_loaded", "Models in memory", value=len(engines))
        loads = CounterMetricFamily(
            "shimmy_model_loads", "Times a model was loaded", labels=["model"]
        )
        for model_id, count in self.registry.load_counts.items():
            loads.add_metric([model_id], count)
        yield loads
        yield from self._engine_metrics(engines)

    def _engine_metrics(self, engines: list[Engine]) -> Iterator[Metric]:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=["model"])

        load_seconds = gauge("shimmy_model_load_seconds", "Seconds the model took to load")
        memory = gauge("shimmy_model_memory_bytes", "Estimated memory of weights and KV cache")
        slots = gauge("shimmy_slots", "Sequences the model decodes together")
        busy = gauge("shimmy_slots_busy", "Slots generating now")
        queued = gauge("shimmy_queue_depth", "Requests waiting for a slot")
        counters = {
            key: CounterMetricFamily(name, documentation, labels=["model"])
            for key, name, documentation in ENGINE_COUNTERS
        }
        gauges = {key: gauge(name, documentation) for key, name, documentation in ENGINE_GAUGES}
        finished = CounterMetricFamily(
            "shimmy_engine_requests_finished",
            "Generations ended, by how they ended",
            labels=["model", "outcome"],
        )
        for engine in engines:
            model = [engine.entry.id]
            stats: dict[str, Any] = engine.stats()
            load_seconds.add_metric(model, engine.load_seconds)
            memory.add_metric(model, engine.memory_bytes)
            slots.add_metric(model, stats.get("slots", 0))
            busy.add_metric(model, stats.get("busy", 0))
            queued.add_metric(model, stats.get("queued", 0))
            for key, family in counters.items():
                family.add_metric(model, stats.get(key, 0))
            for key, gauge_family in gauges.items():
                gauge_family.add_metric(model, stats.get(key, 0))
            for outcome in FINISH_OUTCOMES:
                finished.add_metric([*model, outcome], stats.get(f"requests_{outcome}", 0))
        yield from (load_seconds, memory, slots, busy, queued, *counters.values())
        yield from (*gauges.values(), finished)


class Metrics:
    """Everything ``/metrics`` shows for one app."""

    def __init__(self, registry: ModelRegistry, app_state: State) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "shimmy_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "shimmy_http_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["endpoint"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "shimmy_prompt_tokens",
            "Prompt tokens of finished generations",
            ["model"],
            registry=self.registry,
        )
        self.cached_prompt_tokens = Counter(
            "shimmy_prompt_tokens_cached",
            "Prompt tokens whose KV cache was reused",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "shimmy_completion_tokens",
            "Tokens generated by finished generations",
            ["model"],
            registry=self.registry,
        )
        self.worker_crashes = Counter(
            "shimmy_worker_crashes",
            "Model worker processes that died under their requests or while loading",
            ["model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "shimmy_time_to_first_token_seconds",
            "From submitting a generation to its first piece of text (queue wait included)",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "shimmy_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, one sample per generation",
            ["model"],
            buckets=PER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(registry, app_state))
        ProcessCollector(registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self.http_requests.labels(endpoint, method, str(status)).inc()
        self.http_seconds.labels(endpoint).observe(seconds)

    def record_generation(
        self,
        model: str,
        usage: Usage,
        *,
        submitted: float,
        first_token: float | None,
        finished: float,
    ) -> None:
        """One generation ended (``time.monotonic()`` timestamps). Thread-safe: an engine's
        worker thread may call it."""
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.cached_prompt_tokens.labels(model).inc(usage.cached_tokens)
        self.completion_tokens.labels(model).inc(usage.completion_tokens)
        if first_token is None:
            return
        self.time_to_first_token.labels(model).observe(max(0.0, first_token - submitted))
        if usage.completion_tokens > 1:
            per_token = (finished - first_token) / (usage.completion_tokens - 1)
            self.time_per_output_token.labels(model).observe(max(0.0, per_token))

    def engine_finished(
        self, model: str, usage: Usage, enqueued_at: float, first_token_at: float | None
    ) -> None:
        """Shape of an engine-side ``on_finish`` hook (called on the worker thread)."""
        self.record_generation(
            model,
            usage,
            submitted=enqueued_at,
            first_token=first_token_at,
            finished=time.monotonic(),
        )

    def engine_crashed(self, model: str, _reason: str) -> None:
        self.worker_crashes.labels(model).inc()

    def exposition(self, accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def metrics_for(app: Starlette) -> Metrics:
    """The app's ``Metrics``, created on first use (kept on ``app.state``)."""
    metrics: Metrics | None = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = Metrics(app.state.registry, app.state)
        app.state.metrics = metrics
    return metrics


def endpoint_label(scope: Scope, root_path: str) -> str:
    """The route template that served this request, mounts included (``/v1/models/{id}``).

    Starlette's router leaves the matched route in ``scope["route"]`` and, inside a ``Mount``,
    extends ``root_path`` by the mount's prefix; ``root_path`` is the value before routing.
    """
    route: BaseRoute | None = scope.get("route")
    if not isinstance(route, Route | WebSocketRoute):
        return UNMATCHED  # no route, or a Mount whose inner routes did not match
    prefix = str(scope.get("root_path", ""))[len(root_path) :]
    return prefix + route.path


class MetricsMiddleware:
    """Counts and times every HTTP request; pure ASGI so streamed responses are timed to their
    end. The count is taken just before the last byte is sent, so a scrape that follows a
    finished request always includes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = metrics_for(scope["app"])
        root_path = str(scope.get("root_path", ""))
        started = time.perf_counter()

        def record(status: int, _complete: bool) -> None:
            elapsed = time.perf_counter() - started
            metrics.observe_request(
                endpoint_label(scope, root_path), scope["method"], status, elapsed
            )

        await run_and_report(self.app, scope, receive, send, record)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = metrics_for(request.app).exposition(request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})


routes: list[BaseRoute] = [
    api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        summary="Prometheus metrics",
        texts=["text/plain", "application/openmetrics-text"],
        response_description="The text exposition format, or OpenMetrics when the Accept header "
        "asks for application/openmetrics-text",
        tags=["server"],
    )
]

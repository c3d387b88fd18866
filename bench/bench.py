"""Side-by-side benchmark: shimmy vs llama-cpp-python's server vs a direct llama-cpp-python loop.

Run with ``make bench`` (or ``.venv/bin/python bench/bench.py --help``). Requests go to one
server at a time, so on a small machine the servers do not steal each other's cores. See
bench/README.md for what each number means and how tokens are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

SHIMMY = "shimmy"
PEER = "llama-cpp-python server"
SHIMMY_NO_PREFIX = "shimmy --no-prefix-cache"
# shimmy serves each model from a worker process by default; this is the engine in the
# server's own process, to measure what the isolation costs.
SHIMMY_IN_PROCESS = "shimmy --in-process"
TARGET_ISOLATION_RATIO = 0.97
TARGET_ISOLATION_TTFT_S = 0.005
DIRECT = "direct llama-cpp-python loop"

# The targets.
TARGET_SINGLE_VS_DIRECT = 0.95
TARGET_AGGREGATE_VS_PEER = 2.0
TARGET_AGGREGATE_CLIENTS = 8
TARGET_PREFIX_SPEEDUP = 3.0

# A prompt the starter model continues for well over 128 tokens under greedy decoding, so the
# single-stream numbers are not cut short by an early end of text.
SINGLE_STREAM_PROMPT = "Once upon a time, in a small village by the sea,"

STORY_TOPICS = (
    "a lighthouse keeper who collects lost letters",
    "a baker who can taste the weather",
    "two rival clockmakers in the same street",
    "a girl who maps the tunnels under her city",
    "an old ship that refuses to sink",
    "a librarian who lends out memories",
    "a fox that learns to count",
    "a village where it never stops snowing",
    "a tailor who sews with moonlight",
    "a mountain guide who has never seen the summit",
    "a robot gardener in an abandoned greenhouse",
    "a painter whose colours fade every night",
    "a river that changes course every year",
    "a musician who plays for the wind",
    "a boy who trades stories for bread",
    "a train that only runs on Sundays",
)

CHAT_DISTRICTS = ("North Quay", "Old Market", "Lantern Hill", "Millbrook", "Saltmarsh", "Ferry End")
CHAT_ITEMS = (
    "stone bridge",
    "public library",
    "water tower",
    "fish market",
    "bell tower",
    "school house",
    "harbour wall",
    "tram depot",
)


@dataclass
class BenchConfig:
    model: Path
    tokens: int
    levels: list[int]
    threads: int
    ctx: int
    parallel: int
    reps: int
    chat_reps: int
    chat_turn1_tokens: int
    request_timeout: float
    startup_timeout: float
    time_budget: float
    skip_peer: bool
    quick: bool


@dataclass
class StreamResult:
    """What one streaming request saw, with ``time.perf_counter()`` timestamps."""

    t_start: float
    t_first: float | None = None
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    usage_tokens: int | None = None
    error: str | None = None
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_first is not None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def max_gap(self) -> float | None:
        times = self.chunk_times
        if len(times) < 2:
            return None
        return max(later - earlier for earlier, later in itertools.pairwise(times))


@dataclass
class LevelStats:
    clients: int
    ok: int
    tokens: int
    wall_s: float
    aggregate_tps: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    max_gap_s: float | None
    # Clients whose first token arrived before the first client finished: equal to ``clients``
    # when every stream progressed together, 1 for a server that serves requests one at a time.
    concurrent: int
    # The weaker check: every client got a first token before the last one finished.
    all_started_before_last_finished: bool
    # Cross-checks of ``tokens``: text chunks received, and the servers' own usage counts
    # (None unless every answer carried one).
    chunks: int = 0
    usage_tokens: int | None = None
    # Per client, in request order (None for a client that failed).
    ttft_per_client_s: list[float | None] = field(default_factory=list)
    max_gap_per_client_s: list[float | None] = field(default_factory=list)


@dataclass
class ChatStats:
    reps: int
    turn1_ttft_s: float | None
    turn2_ttft_s: float | None
    turn2_ttft_all_s: list[float]


@dataclass
class ServerReport:
    name: str
    single_tps_all: list[float] = field(default_factory=list)
    single_tps: float | None = None
    levels: list[LevelStats] = field(default_factory=list)
    chat: ChatStats | None = None
    error: str | None = None


@dataclass
class TargetResult:
    name: str
    status: str  # "PASS", "MISS" or "n/a"
    detail: str


@dataclass
class Report:
    started: str
    elapsed_s: float
    machine: dict[str, Any]
    versions: dict[str, str]
    config: dict[str, Any]
    direct_tps_all: list[float]
    direct_tps: float | None
    direct_error: str | None
    servers: dict[str, ServerReport]
    targets: list[TargetResult]
    skipped: list[str] = field(default_factory=list)


def isolation_table(report: Report) -> list[str]:
    """What a worker process per model costs: shimmy against its own engine in-process."""
    workers, alone = report.servers.get(SHIMMY), report.servers.get(SHIMMY_IN_PROCESS)
    if workers is None or alone is None:
        return []
    lines = [
        "",
        f"Isolation (targets: ≥ {TARGET_ISOLATION_RATIO}x, TTFT + ≤ "
        f"{TARGET_ISOLATION_TTFT_S * 1000:.0f} ms):",
        "",
        f"| metric | {SHIMMY} (worker process) | {SHIMMY_IN_PROCESS} | ratio / difference |",
        "|---|---:|---:|---:|",
        f"| single-stream decode tok/s | {fmt(workers.single_tps)} | {fmt(alone.single_tps)} | "
        f"{fmt(ratio(workers.single_tps, alone.single_tps), 3, 'x')} |",
    ]
    for clients in report.config.get("levels", []):
        ours, theirs = level_stats(workers, clients), level_stats(alone, clients)
        if ours is None or theirs is None:
            continue
        share = ratio(ours.aggregate_tps, theirs.aggregate_tps)
        lines.append(
            f"| aggregate tok/s @ {clients} | {fmt(ours.aggregate_tps)} | "
            f"{fmt(theirs.aggregate_tps)} | {fmt(share, 3, 'x')} |"
        )
        if ours.ttft_p50_s is not None and theirs.ttft_p50_s is not None:
            lines.append(
                f"| TTFT p50 s @ {clients} | {fmt(ours.ttft_p50_s, 4)} | "
                f"{fmt(theirs.ttft_p50_s, 4)} | "
                f"{(ours.ttft_p50_s - theirs.ttft_p50_s) * 1000:+.1f} ms |"
            )
    return lines


# --------------------------------------------------------------------------------------------
# Pure helpers (covered by tests/test_bench_smoke.py)
# --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def decode_rate(tokens: int, t_first: float | None, t_last: float | None) -> float | None:
    """Decode tokens/s between the first and the last token, so prompt processing is excluded.

    ``tokens`` tokens span ``tokens - 1`` intervals; the first token's wait is the prefill.
    """
    if t_first is None or t_last is None or tokens < 2 or t_last <= t_first:
        return None
    return (tokens - 1) / (t_last - t_first)


def sse_data(line: str) -> str | None:
    """The payload of one SSE ``data:`` line, or None for comments, other fields and blanks."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


def chunk_text(payload: dict[str, Any]) -> str:
    """The text an OpenAI completion or chat-completion chunk carries ('' for none)."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def chunk_usage_tokens(payload: dict[str, Any]) -> int | None:
    usage = payload.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None


def summarize_level(results: Sequence[StreamResult]) -> LevelStats:
    """Aggregate throughput, TTFT spread and starvation signs of one concurrency level."""
    good = [r for r in results if r.ok and r.t_end is not None]
    tokens = sum(r.tokens for r in good)
    starts = [r.t_start for r in results]
    ends = [r.t_end for r in good if r.t_end is not None]
    wall = (max(ends) - min(starts)) if ends and starts else 0.0
    ttfts = [r.ttft for r in good if r.ttft is not None]
    gaps = [g for g in (r.max_gap for r in good) if g is not None]
    firsts = [r.t_first for r in good if r.t_first is not None]
    first_finish = min(ends) if ends else None
    last_finish = max(ends) if ends else None
    concurrent = sum(1 for t in firsts if first_finish is not None and t < first_finish)
    # A client that failed to receive anything counts as starved.
    all_started = (
        len(firsts) == len(results)
        and last_finish is not None
        and all(t <= last_finish for t in firsts)
    )
    return LevelStats(
        clients=len(results),
        ok=len(good),
        tokens=tokens,
        wall_s=wall,
        aggregate_tps=tokens / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        max_gap_s=max(gaps) if gaps else None,
        concurrent=concurrent,
        all_started_before_last_finished=all_started,
        chunks=sum(len(r.chunk_times) for r in good),
        usage_tokens=(
            sum(r.usage_tokens or 0 for r in good)
            if good and all(r.usage_tokens is not None for r in good)
            else None
        ),
        ttft_per_client_s=[r.ttft if r.ok else None for r in results],
        max_gap_per_client_s=[r.max_gap if r.ok else None for r in results],
    )


def no_starvation(stats: LevelStats) -> bool:
    """Every client succeeded and all streams progressed together (none waited for another)."""
    return stats.ok == stats.clients and stats.concurrent == stats.clients


def level_stats(report: ServerReport | None, clients: int) -> LevelStats | None:
    if report is None:
        return None
    return next((s for s in report.levels if s.clients == clients), None)


def evaluate_targets(
    shimmy: ServerReport | None,
    peer: ServerReport | None,
    direct_tps: float | None,
    no_prefix_chat: ChatStats | None,
) -> list[TargetResult]:
    """PASS/MISS per target of the issue; ``n/a`` where a number is missing."""
    targets: list[TargetResult] = []

    single = ratio(shimmy.single_tps if shimmy else None, direct_tps)
    name = f"single stream through HTTP >= {TARGET_SINGLE_VS_DIRECT}x direct loop"
    if single is None:
        targets.append(TargetResult(name, "n/a", "missing shimmy or direct-loop number"))
    else:
        status = "PASS" if single >= TARGET_SINGLE_VS_DIRECT else "MISS"
        targets.append(TargetResult(name, status, f"{single:.2f}x"))

    clients = TARGET_AGGREGATE_CLIENTS
    name = (
        f"aggregate at {clients} clients >= {TARGET_AGGREGATE_VS_PEER}x llama-cpp-python server, "
        "no starvation"
    )
    ours, theirs = level_stats(shimmy, clients), level_stats(peer, clients)
    aggregate = ratio(
        ours.aggregate_tps if ours else None, theirs.aggregate_tps if theirs else None
    )
    if ours is None or aggregate is None:
        targets.append(TargetResult(name, "n/a", f"level {clients} not measured on both"))
    else:
        fair = no_starvation(ours)
        status = "PASS" if aggregate >= TARGET_AGGREGATE_VS_PEER and fair else "MISS"
        detail = (
            f"{aggregate:.2f}x, {ours.concurrent}/{ours.clients} streams concurrent, "
            f"{ours.ok}/{ours.clients} ok"
        )
        targets.append(TargetResult(name, status, detail))

    name = f"second-turn TTFT with prefix reuse >= {TARGET_PREFIX_SPEEDUP}x faster than without"
    with_reuse = shimmy.chat.turn2_ttft_s if shimmy and shimmy.chat else None
    without = no_prefix_chat.turn2_ttft_s if no_prefix_chat else None
    speedup = ratio(without, with_reuse)
    if speedup is None:
        targets.append(TargetResult(name, "n/a", "missing a chat measurement"))
    else:
        status = "PASS" if speedup >= TARGET_PREFIX_SPEEDUP else "MISS"
        targets.append(TargetResult(name, status, f"{speedup:.1f}x"))
    return targets


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def render_markdown(report: Report) -> str:
    """The human-readable result: machine, versions, tables and PASS/MISS lines."""
    shimmy = report.servers.get(SHIMMY)
    peer = report.servers.get(PEER)
    config = report.config
    machine = report.machine
    lines = [
        f"# shimmy benchmark ({report.started}, {report.elapsed_s:.0f} s)",
        "",
        f"- Machine: {machine.get('cpu')}, {machine.get('physical_cores')} physical / "
        f"{machine.get('logical_cores')} logical cores, {machine.get('ram_gib')} GiB RAM, "
        f"{machine.get('os')}; load average {machine.get('load_average_1m')} at the start",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"- Model: {config.get('model_name')} ({config.get('model_mib')} MiB); "
        f"threads {config.get('threads')}, context {config.get('ctx')} per sequence, "
        f"shimmy --parallel {config.get('parallel')}; {config.get('tokens')} tokens per "
        f"request, temperature 0{'; --quick' if config.get('quick') else ''}",
        "",
        f"| metric | {SHIMMY} | {PEER} | ratio |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, ours: float | None, theirs: float | None, digits: int = 1) -> str:
        return (
            f"| {label} | {fmt(ours, digits)} | {fmt(theirs, digits)} | "
            f"{fmt(ratio(ours, theirs), 2, 'x')} |"
        )

    lines.append(
        row(
            f"single-stream decode tok/s (median of {config.get('reps')})",
            shimmy.single_tps if shimmy else None,
            peer.single_tps if peer else None,
        )
    )
    for clients in config.get("levels", []):
        ours, theirs = level_stats(shimmy, clients), level_stats(peer, clients)
        lines.append(
            row(
                f"aggregate tok/s @ {clients} client{'' if clients == 1 else 's'}",
                ours.aggregate_tps if ours else None,
                theirs.aggregate_tps if theirs else None,
            )
        )
    ours_chat = shimmy.chat if shimmy else None
    peer_chat = peer.chat if peer else None
    no_prefix_report = report.servers.get(SHIMMY_NO_PREFIX)
    no_prefix = no_prefix_report.chat if no_prefix_report else None
    lines.append(
        row(
            "chat turn-2 TTFT s, prefix reuse on (lower is better)",
            ours_chat.turn2_ttft_s if ours_chat else None,
            peer_chat.turn2_ttft_s if peer_chat else None,
            3,
        )
    )
    without = no_prefix.turn2_ttft_s if no_prefix else None
    with_reuse = ours_chat.turn2_ttft_s if ours_chat else None
    lines.append(
        f"| chat turn-2 TTFT s, shimmy --no-prefix-cache | {fmt(without, 3)} | — | "
        f"{fmt(ratio(without, with_reuse), 1, 'x')} slower |"
    )
    lines.append(
        row(
            f"chat turn-1 TTFT s (cold, {config.get('chat_prompt_tokens')} prompt tokens)",
            ours_chat.turn1_ttft_s if ours_chat else None,
            peer_chat.turn1_ttft_s if peer_chat else None,
            3,
        )
    )
    lines += isolation_table(report)
    lines += [
        "",
        f"| {DIRECT} | decode tok/s | shimmy single-stream / direct |",
        "|---|---:|---:|",
        f"| median of {len(report.direct_tps_all)} | {fmt(report.direct_tps)} | "
        f"{fmt(ratio(shimmy.single_tps if shimmy else None, report.direct_tps), 2, 'x')} |",
        "",
        "Concurrency detail (TTFT and gaps in seconds; 'concurrent' = clients whose first token "
        "came before the first client finished):",
        "",
        "| clients | server | ok | tok/s | TTFT p50 | TTFT p95 | max inter-chunk gap | "
        "concurrent |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in config.get("levels", []):
        in_process = report.servers.get(SHIMMY_IN_PROCESS)
        for name, server in ((SHIMMY, shimmy), (PEER, peer), (SHIMMY_IN_PROCESS, in_process)):
            stats = level_stats(server, clients)
            if stats is None:
                continue
            lines.append(
                f"| {clients} | {name} | {stats.ok}/{stats.clients} | "
                f"{fmt(stats.aggregate_tps)} | {fmt(stats.ttft_p50_s, 3)} | "
                f"{fmt(stats.ttft_p95_s, 3)} | {fmt(stats.max_gap_s, 3)} | "
                f"{stats.concurrent}/{stats.clients} |"
            )
    errors = [(name, s.error) for name, s in report.servers.items() if s.error]
    if report.direct_error:
        errors.append((DIRECT, report.direct_error))
    if errors:
        lines += ["", "Errors:", ""] + [f"- {name}: {error}" for name, error in errors]
    if report.skipped:
        spent = f"Skipped (time budget of {config.get('time_budget_s')} s spent): "
        lines += ["", spent + ", ".join(report.skipped)]
    lines += ["", "Targets:", ""]
    lines += [f"- {t.status}: {t.name} ({t.detail})" for t in report.targets]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


def story_prompt(level: int, client: int) -> str:
    """A prompt unique to (level, client) from its first word, so no cache can share work."""
    topic = STORY_TOPICS[client % len(STORY_TOPICS)]
    return f"Tale {level}-{client}. This is the story of {topic}. It begins on a cold morning, when"


def chat_document(session: int) -> str:
    """A long, factual-looking reference text (roughly 600 tokens) for the chat test."""
    records = []
    for i in range(18):
        district = CHAT_DISTRICTS[i % len(CHAT_DISTRICTS)]
        item = CHAT_ITEMS[(i * 3) % len(CHAT_ITEMS)]
        records.append(
            f"Record {i + 1}: the {item} of {district} was rebuilt in {1890 + i * 4} "
            f"and today serves about {120 + i * 37} residents every week."
        )
    return f"Archive session {session}.\n" + "\n".join(records)


def chat_turn1(session: int) -> list[dict[str, str]]:
    system = (
        "You are a careful assistant for the town archive. Answer only from the records "
        "below, briefly and precisely.\n\n" + chat_document(session)
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "Which district has the oldest stone bridge?"},
    ]


# --------------------------------------------------------------------------------------------
# HTTP streaming
# --------------------------------------------------------------------------------------------


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    deadline_s: float,
    count_tokens: Callable[[str], int],
) -> StreamResult:
    """POST ``body`` with ``stream: true`` and record when each non-empty chunk arrived."""
    result = StreamResult(t_start=time.perf_counter())
    pieces: list[str] = []
    try:
        async with asyncio.timeout(deadline_s), client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread())[:300].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                data = sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = f"stream error: {json.dumps(payload['error'])[:300]}"
                    break
                usage = chunk_usage_tokens(payload)
                if usage is not None:
                    result.usage_tokens = usage
                text = chunk_text(payload)
                if text:
                    now = time.perf_counter()
                    if result.t_first is None:
                        result.t_first = now
                    result.chunk_times.append(now)
                    pieces.append(text)
    except TimeoutError:
        result.error = f"no complete answer within {deadline_s:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.t_end = result.chunk_times[-1] if result.chunk_times else time.perf_counter()
    result.text = "".join(pieces)
    result.tokens = count_tokens(result.text) if result.text else 0
    if result.error is None and result.t_first is None:
        result.error = "the stream carried no text"
    return result


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    # repeat_penalty is not OpenAI's but both servers read it; 1.0 turns it off so greedy
    # decoding is plain argmax on both. stream_options is ignored by servers that lack it.
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1234,
        "repeat_penalty": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = completion_body(model, "", max_tokens)
    del body["prompt"]
    body["messages"] = messages
    return body


class TimeBudget:
    """Bounds a whole run: once the budget is spent no new step starts; skipped steps are kept."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def allows(self, step: str) -> bool:
        if time.perf_counter() < self.deadline:
            return True
        self.skipped.append(step)
        log(f"time budget of {self.seconds:.0f} s spent: skipping {step}")
        return False


class Contender:
    """One running server under test: its HTTP client, its measurements, its first failure."""

    def __init__(
        self,
        report: ServerReport,
        base_url: str,
        model: str,
        config: BenchConfig,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.report = report
        self.model = model
        self.config = config
        self.count_tokens = count_tokens
        timeout = httpx.Timeout(config.request_timeout, connect=10.0)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        # trust_env=False: a proxy from the environment must never sit between us and loopback.
        self.client = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, trust_env=False
        )

    async def attempt(self, what: str, action: Callable[[], Awaitable[T]]) -> T | None:
        """Run one measurement; the first failure is recorded and ends this server's part."""
        if self.report.error is not None:
            return None
        try:
            return await action()
        except (RuntimeError, httpx.HTTPError, ValueError, OSError) as exc:
            self.report.error = f"{what}: {exc}"
            log(f"  {self.report.name} failed: {self.report.error}")
            return None

    async def completion(self, prompt: str, max_tokens: int) -> StreamResult:
        body = completion_body(self.model, prompt, max_tokens)
        return await stream_request(
            self.client, "/v1/completions", body, self.config.request_timeout, self.count_tokens
        )

    async def warm_up(self, levels: Sequence[int] = ()) -> None:
        """Pay one-time costs before measuring: loading the model (shimmy loads on first use)
        and the first decode of each batch size (llama.cpp sizes its buffers then), with one
        short round of requests at every concurrency level."""
        result = await self.completion("Hello,", 8)
        if not result.ok:
            raise RuntimeError(f"warm-up request failed: {result.error}")
        for clients in levels:
            prompts = [f"Warm-up {clients}-{i}: the weather today is" for i in range(clients)]
            results = await asyncio.gather(*(self.completion(p, 4) for p in prompts))
            failed = next((r for r in results if not r.ok), None)
            if failed is not None:
                raise RuntimeError(f"warm-up at {clients} clients failed: {failed.error}")

    async def single_stream(self) -> float | None:
        result = await self.completion(SINGLE_STREAM_PROMPT, self.config.tokens)
        if not result.ok:
            raise RuntimeError(f"single-stream request failed: {result.error}")
        return decode_rate(result.tokens, result.t_first, result.t_end)

    async def concurrency_level(self, clients: int) -> LevelStats:
        prompts = [story_prompt(clients, i) for i in range(clients)]
        results = await asyncio.gather(
            *(self.completion(prompt, self.config.tokens) for prompt in prompts)
        )
        return summarize_level(results)

    async def chat(self, session_offset: int) -> ChatStats:
        turn1_ttfts: list[float] = []
        turn2_ttfts: list[float] = []
        for rep in range(self.config.chat_reps):
            messages = chat_turn1(session_offset + rep)
            first = await stream_request(
                self.client,
                "/v1/chat/completions",
                chat_body(self.model, messages, self.config.chat_turn1_tokens),
                self.config.request_timeout,
                self.count_tokens,
            )
            if not first.ok or first.ttft is None:
                raise RuntimeError(f"chat turn 1 failed: {first.error}")
            turn1_ttfts.append(first.ttft)
            messages = [
                *messages,
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "And which one serves the most residents?"},
            ]
            second = await stream_request(
                self.client,
                "/v1/chat/completions",
                chat_body(self.model, messages, 16),
                self.config.request_timeout,
                self.count_tokens,
            )
            if not second.ok or second.ttft is None:
                raise RuntimeError(f"chat turn 2 failed: {second.error}")
            turn2_ttfts.append(second.ttft)
        return ChatStats(
            reps=self.config.chat_reps,
            turn1_ttft_s=median(turn1_ttfts),
            turn2_ttft_s=median(turn2_ttfts),
            turn2_ttft_all_s=turn2_ttfts,
        )


async def measure(contenders: Sequence[Contender], config: BenchConfig, budget: TimeBudget) -> None:
    """Every measurement, server after server at each step, so that load from elsewhere on the
    machine, which drifts over minutes, hits all of them alike. The cheap steps come first, so
    a spent time budget costs the largest concurrency levels, not the targets' numbers."""
    main = [c for c in contenders if c.report.name != SHIMMY_NO_PREFIX]
    log("warm-up")
    for contender in contenders:
        levels = config.levels if contender in main else ()
        await contender.attempt("warm-up", functools.partial(contender.warm_up, levels))
    log(f"single stream: {config.reps} x {config.tokens} tokens")
    for rep in range(config.reps):
        if not budget.allows(f"single stream repetition {rep + 1}"):
            break
        for contender in main:
            rate = await contender.attempt("single stream", contender.single_stream)
            if rate is not None:
                contender.report.single_tps_all.append(rate)
    for contender in main:
        contender.report.single_tps = median(contender.report.single_tps_all)
    log(f"chat second turn x{config.chat_reps}")
    if budget.allows("chat second turn"):
        for index, contender in enumerate(contenders):
            # Each server gets conversations of its own, so none can be answered from a cache.
            session = 100 * (index + 1)
            contender.report.chat = await contender.attempt(
                "chat", functools.partial(contender.chat, session)
            )
    for clients in config.levels:
        if not budget.allows(f"{clients} concurrent clients"):
            continue
        log(f"{clients} concurrent clients")
        for contender in main:
            stats = await contender.attempt(
                f"{clients} clients", functools.partial(contender.concurrency_level, clients)
            )
            if stats is not None:
                contender.report.levels.append(stats)


async def measure_and_close(
    contenders: Sequence[Contender], config: BenchConfig, budget: TimeBudget
) -> None:
    try:
        await measure(contenders, config, budget)
    finally:
        for contender in contenders:
            await contender.client.aclose()


# --------------------------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    process: subprocess.Popen[bytes], base_url: str, timeout_s: float, log_path: Path
) -> list[str]:
    """Poll ``/v1/models`` (a bounded number of times) until it answers; return the model ids."""
    interval = 0.5
    attempts = max(1, int(timeout_s / interval))
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        for _ in range(attempts):
            if process.poll() is not None:
                raise server_failure(f"exited with status {process.returncode}", log_path)
            with contextlib.suppress(httpx.HTTPError):
                response = client.get(f"{base_url}/v1/models")
                if response.status_code == 200:
                    return [m.get("id", "") for m in response.json().get("data", [])]
            time.sleep(interval)
    raise server_failure(f"not ready after {timeout_s:.0f} s", log_path)


def server_failure(what: str, log_path: Path) -> RuntimeError:
    """A one-line error naming the log's last line; the log's tail goes to stderr."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    for line in lines[-15:]:
        log(f"    | {line}")
    last = lines[-1] if lines else "(empty log)"
    return RuntimeError(f"server {what}: {last} (log: {log_path})")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Terminate, then kill if it has not exited after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


@contextlib.contextmanager
def server_process(
    argv: list[str], base_url: str, log_path: Path, timeout_s: float, cwd: Path
) -> Iterator[list[str]]:
    """Start a server, yield its model ids once it answers, and always stop it afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        # A session of its own: Ctrl-C reaches only the benchmark, whose finally stops the server.
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
        try:
            yield wait_until_ready(process, base_url, timeout_s, log_path)
        finally:
            stop_process(process)


def shimmy_argv(
    config: BenchConfig, port: int, *, prefix_cache: bool = True, in_process: bool = False
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "shimmy",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--model-dirs",
        str(config.model),
        "--no-user-caches",
        "--no-starter",
        "--threads",
        str(config.threads),
        "--threads-batch",
        str(config.threads),
        "--ctx-size",
        str(config.ctx),
        "--parallel",
        str(config.parallel),
    ]
    if in_process:
        argv.append("--in-process")
    if not prefix_cache:
        argv.append("--no-prefix-cache")
    return argv


def peer_argv(config: BenchConfig, port: int) -> list[str]:
    # interrupt_requests=False: by default the peer cuts a running stream short as soon as
    # another request waits, which would make its concurrent numbers meaningless.
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(config.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(config.threads),
        "--n_threads_batch",
        str(config.threads),
        "--n_ctx",
        str(config.ctx),
        "--verbose",
        "False",
        "--interrupt_requests",
        "False",
        # The server defaults to computing logits for every prompt token (only logprobs need
        # them); with Gemma 3's 262k vocabulary that makes its prefill many times slower.
        # Turned off, as in the direct loop, so the peer is measured at its best.
        "--logits_all",
        "False",
    ]


def model_id_for(path: Path, served: list[str]) -> str:
    """The id shimmy gives ``path`` (file stem, lowercased, '_' and ' ' as '-'), if served."""
    expected = path.stem.lower().replace("_", "-").replace(" ", "-")
    if expected in served or not served:
        return expected
    return served[0]


# --------------------------------------------------------------------------------------------
# Direct loop
# --------------------------------------------------------------------------------------------


def direct_loop(
    config: BenchConfig, count_tokens: Callable[[str], int], budget: TimeBudget
) -> list[float]:
    """Decode tokens/s of llama-cpp-python's own streaming loop, in this process, no HTTP."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(config.model),
        n_ctx=config.ctx,
        n_threads=config.threads,
        n_threads_batch=config.threads,
        verbose=False,
    )
    try:
        rates = []
        for rep in range(config.reps + 1):  # the first pass only warms up
            if rep > 0 and not budget.allows(f"{DIRECT} repetition {rep}"):
                break
            started = time.perf_counter()
            first: float | None = None
            last: float | None = None
            pieces = []
            stream = llm.create_completion(
                SINGLE_STREAM_PROMPT,
                max_tokens=8 if rep == 0 else config.tokens,
                temperature=0,
                repeat_penalty=1.0,
                seed=1234,
                stream=True,
            )
            for chunk in stream:
                text = chunk["choices"][0]["text"]  # type: ignore[index]
                if text:
                    last = time.perf_counter()
                    first = first if first is not None else last
                    pieces.append(text)
                if time.perf_counter() - started > config.request_timeout:
                    break  # the same hard deadline as an HTTP request
            if rep == 0:
                continue
            rate = decode_rate(count_tokens("".join(pieces)), first, last)
            if rate is not None:
                rates.append(rate)
        return rates
    finally:
        llm.close()
        del llm
        gc.collect()


def load_tokenizer(model: Path) -> Callable[[str], int]:
    """Count tokens of a text with the model's own vocabulary (weights are not loaded)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    return count


# --------------------------------------------------------------------------------------------
# Machine, versions, model
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def machine_facts() -> dict[str, Any]:
    import psutil

    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        # Other work on the machine skews every number; the load says how much there was.
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("shimmy", "llama-cpp-python", "httpx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def default_model() -> Path:
    from shimmy.errors import ShimmyError
    from shimmy.models.starter import ensure_starter_model
    from shimmy.settings import Settings

    try:
        path = ensure_starter_model(Settings())  # type: ignore[call-arg]
    except ShimmyError as exc:
        raise SystemExit(f"The starter model is unusable ({exc}); pass --model PATH") from None
    if path is None:
        raise SystemExit(
            "The starter model is not installed: run 'make install' or pass --model PATH"
        )
    return Path(path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_levels(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers, e.g. 1,2,4,8")
    return levels


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the starter model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 tokens, 1,4,8 clients")
    parser.add_argument("--levels", type=parse_levels, help="concurrent clients (1,2,4,8,16)")
    parser.add_argument("--tokens", type=int, help="tokens per request (128)")
    parser.add_argument("--threads", type=int, help="threads for every engine (physical cores)")
    parser.add_argument("--ctx", type=int, default=2048, help="context per sequence (2048)")
    parser.add_argument("--parallel", type=int, default=8, help="shimmy --parallel (8)")
    parser.add_argument("--reps", type=int, help="single-stream repetitions (3)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds (120)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=360.0,
        help="seconds after which no new step starts (360)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="skip llama-cpp-python server")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    model = args.model.resolve() if args.model else default_model()
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")
    return BenchConfig(
        model=model,
        tokens=args.tokens or (32 if quick else 128),
        levels=args.levels or ([1, 4, 8] if quick else [1, 2, 4, 8, 16]),
        threads=args.threads or physical_cores(),
        ctx=args.ctx,
        parallel=args.parallel,
        reps=args.reps or (1 if quick else 3),
        chat_reps=1 if quick else 3,
        chat_turn1_tokens=32,
        request_timeout=args.request_timeout,
        time_budget=args.time_budget,
        startup_timeout=180.0,
        skip_peer=bool(args.skip_peer),
        quick=quick,
    )


def guarded(name: str, action: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run one phase; a failure is reported and the other phases still run."""
    try:
        return action(), None
    except (RuntimeError, OSError, httpx.HTTPError, ValueError) as exc:
        log(f"  {name} failed: {exc}")
        return None, str(exc) or type(exc).__name__


def run(config: BenchConfig) -> Report:
    started = time.perf_counter()
    machine = machine_facts()
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    count_tokens = load_tokenizer(config.model)

    log(f"direct loop: {config.reps} x {config.tokens} tokens")
    budget = TimeBudget(config.time_budget)
    direct_rates, direct_error = guarded(DIRECT, lambda: direct_loop(config, count_tokens, budget))
    direct_rates = direct_rates or []

    servers: dict[str, ServerReport] = {}
    commands: list[tuple[str, Callable[[int], list[str]]]] = [
        (PEER, lambda port: peer_argv(config, port)),
        (SHIMMY, lambda port: shimmy_argv(config, port)),
        (SHIMMY_NO_PREFIX, lambda port: shimmy_argv(config, port, prefix_cache=False)),
        (SHIMMY_IN_PROCESS, lambda port: shimmy_argv(config, port, in_process=True)),
    ]
    if config.skip_peer:
        commands = commands[1:]
    # Idle servers use no CPU, so all of them run for the whole measurement; the ExitStack
    # stops every one that started, whatever happens.
    with contextlib.ExitStack() as stack:
        # cwd is an empty folder so shimmy does not also pick up a ./models of the caller.
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shimmy-bench-")))
        contenders = []
        for name, argv_for in commands:
            report = servers[name] = ServerReport(name=name)
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            log_path = RESULTS_DIR / "logs" / f"{name.replace(' ', '-')}.log"
            log(f"{name}: starting on port {port}")
            try:
                ids = stack.enter_context(
                    server_process(
                        argv_for(port), base_url, log_path, config.startup_timeout, scratch
                    )
                )
            except (RuntimeError, OSError) as exc:
                report.error = f"start: {exc}"
                log(f"  {name} failed: {report.error}")
                continue
            model = model_id_for(config.model, ids)
            contenders.append(Contender(report, base_url, model, config, count_tokens))
        asyncio.run(measure_and_close(contenders, config, budget))

    no_prefix = servers.get(SHIMMY_NO_PREFIX)
    return Report(
        started=stamp,
        elapsed_s=time.perf_counter() - started,
        machine=machine,
        versions=versions(),
        config={
            "model": str(config.model),
            "model_name": config.model.name,
            "model_mib": round(config.model.stat().st_size / 2**20),
            "tokens": config.tokens,
            "levels": config.levels,
            "threads": config.threads,
            "ctx": config.ctx,
            "parallel": config.parallel,
            "reps": config.reps,
            "chat_reps": config.chat_reps,
            "quick": config.quick,
            "time_budget_s": config.time_budget,
            "token_count": "completion text re-tokenized with the model's vocabulary",
            "chat_prompt_tokens": count_tokens("\n".join(m["content"] for m in chat_turn1(0))),
        },
        direct_tps_all=direct_rates,
        direct_tps=median(direct_rates),
        direct_error=direct_error,
        servers=servers,
        targets=evaluate_targets(
            servers.get(SHIMMY),
            servers.get(PEER),
            median(direct_rates),
            no_prefix.chat if no_prefix else None,
        ),
        skipped=budget.skipped,
    )


def save(report: Report, markdown: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(markdown)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(asdict(report), indent=2) + "\n")


def run_interruptibly(action: Callable[[], T]) -> T | None:
    """``action()``, or None after Ctrl-C. SIGTERM becomes an exception, so the finally
    blocks that stop the servers still run."""

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        return action()
    except KeyboardInterrupt:
        log("interrupted; all servers were stopped")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    config = build_config(parse_args(argv))
    report = run_interruptibly(functools.partial(run, config))
    if report is None:
        return 130
    markdown = render_markdown(report)
    save(report, markdown)
    print(markdown)
    log(f"saved {RESULTS_DIR / 'latest.md'} and latest.json")
    errors = [report.direct_error]
    errors += [server.error for server in report.servers.values()]
    return 1 if any(errors) else 0


if __name__ == "__main__":
    sys.exit(main())

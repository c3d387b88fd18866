"""Load test: many clients, mixed transports, clients that hang up; no 5xx, no leaks.

Starts ``python -m shimmy serve`` on a loopback port (the starter model when it is installed,
else the tiny random test model), warms it up, then sends ``--requests`` requests from
``--clients`` concurrent clients: native JSON and SSE, OpenAI chat JSON and SSE, and WebSocket,
with about ``--disconnect-rate`` of the streams dropped by the client after a few chunks.

It checks that no answer is a 5xx, that every response the client read to its end is whole
(final event, ``[DONE]`` or the done frame, usage that adds up), that every slot is free again
afterwards, and that the server's resident memory after an idle period is back within
``--rss-tolerance`` of what it was after warm-up. A short summary is printed; the exit status
is 0 only when every check passed.

    .venv/bin/python bench/loadtest.py                 # 200 requests, 32 clients
    .venv/bin/python bench/loadtest.py --tiny          # the tiny model, even if the starter exists
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import websockets

KINDS = ("native-json", "native-sse", "openai-json", "openai-sse", "ws")
STREAMING = {"native-sse", "openai-sse", "ws"}
PROMPTS = (
    "Write one sentence about the sea.",
    "List three colours.",
    "Once upon a time, in a small village,",
    "Explain what a lighthouse does.",
    "The quick brown fox",
    "Give a short greeting in French.",
)
LISTEN_LINE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
SERVER_LOG_LINES = 200


@dataclass
class Outcome:
    kind: str
    disconnect: bool
    status: int | None = None  # HTTP status (101 for an accepted WebSocket)
    whole: bool = False  # read to its end, and complete
    completion_tokens: int = 0
    seconds: float = 0.0
    problem: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)
    slots_after: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0


# --- the server ---------------------------------------------------------------------------------


def model_path(force_tiny: bool, tmp: Path) -> tuple[Path, str]:
    if not force_tiny:
        from shimmy.models.starter import ensure_starter_model
        from shimmy.settings import Settings

        with contextlib.suppress(Exception):
            starter = ensure_starter_model(Settings())
            if starter is not None:
                return starter, "starter"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp / "tiny.gguf"), "tiny"


@contextlib.contextmanager
def shimmy_server(model: Path, tmp: Path, args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """Run ``shimmy serve`` on a free loopback port; yield its URL and pid. Its log is kept in
    memory (the last lines) and printed if something goes wrong."""
    command = [
        sys.executable, "-m", "shimmy", "serve", "--bind", "127.0.0.1:0",
        "--model-dirs", str(model), "--models-dir", str(tmp / "own"),
        "--cache-dir", str(tmp / "cache"), "--no-user-caches", "--no-starter",
        "--ctx-size", str(args.ctx), "--parallel", str(args.parallel),
        "--max-queue", str(args.requests),
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log: collections.deque[str] = collections.deque(maxlen=SERVER_LOG_LINES)
    try:
        assert server.stderr is not None
        url = None
        while url is None:
            line = server.stderr.readline().decode(errors="replace")
            if not line:
                raise SystemExit("shimmy serve exited before listening:\n" + "".join(log))
            log.append(line)
            found = LISTEN_LINE.search(line)
            url = found.group(1) if found else None
        # Keep draining the log: a full pipe would block the server.
        threading.Thread(target=_drain, args=(server.stderr, log), daemon=True).start()
        yield url, server.pid
    except BaseException:
        print("".join(log), file=sys.stderr)
        raise
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _drain(stream: Any, log: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        log.append(raw.decode(errors="replace"))


# --- the clients --------------------------------------------------------------------------------


def usage_adds_up(usage: dict[str, Any], max_tokens: int) -> bool:
    return (
        usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        and 0 <= usage["completion_tokens"] <= max_tokens
        and usage["prompt_tokens"] >= 1
    )


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


async def post_json(
    http: httpx.AsyncClient, out: Outcome, path: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    """POST ``body``; the response's JSON, or None with the status and problem recorded."""
    response = await http.post(path, json=body)
    out.status = response.status_code
    if response.status_code != 200:
        out.problem = response.text[:200]
        return None
    data: dict[str, Any] = response.json()
    return data


async def native_json(http: httpx.AsyncClient, out: Outcome, max_tokens: int) -> None:
    body = {"prompt": random.choice(PROMPTS), "max_tokens": max_tokens}
    data = await post_json(http, out, "/api/generate", body)
    if data is None:
        return
    usage = data["usage"]
    out.completion_tokens = usage["completion_tokens"]
    choice = data["choices"][0]
    out.whole = choice["finish_reason"] in ("stop", "length") and usage_adds_up(usage, max_tokens)


async def openai_json(http: httpx.AsyncClient, out: Outcome, max_tokens: int) -> None:
    body = {
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": max_tokens,
    }
    data = await post_json(http, out, "/v1/chat/completions", body)
    if data is None:
        return
    usage = data["usage"]
    out.completion_tokens = usage["completion_tokens"]
    finish = data["choices"][0]["finish_reason"]
    out.whole = (
        data["object"] == "chat.completion"
        and finish in ("stop", "length")
        and usage_adds_up(usage, max_tokens)
    )


async def read_events(
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, object],
    out: Outcome,
    cut_after: int | None,
) -> list[str] | None:
    """POST a streaming request and collect its SSE data lines; None when the request failed
    or when this client hangs up after ``cut_after`` events (a deliberate disconnect)."""
    async with http.stream("POST", path, json=body) as response:
        out.status = response.status_code
        if response.status_code != 200:
            out.problem = (await response.aread()).decode(errors="replace")[:200]
            return None
        events: list[str] = []
        async for data in sse_data(response):
            events.append(data)
            if cut_after is not None and len(events) >= cut_after:
                return None  # leaving the block drops the connection mid-stream
    return events


async def native_sse(
    http: httpx.AsyncClient, out: Outcome, max_tokens: int, cut_after: int | None
) -> None:
    body = {"prompt": random.choice(PROMPTS), "max_tokens": max_tokens, "stream": True}
    events = await read_events(http, "/api/generate", body, out, cut_after)
    if events is None:
        return
    if len(events) < 2 or events[-1] != "[DONE]":
        out.problem = f"stream ended without [DONE]: {events[-2:]}"
        return
    final = json.loads(events[-2])
    if "error" in final:
        out.problem = f"error event: {final['error']}"
        return
    texts = sum(1 for e in events[:-2] if json.loads(e)["choices"][0]["text"])
    usage = final["usage"]
    out.completion_tokens = usage["completion_tokens"]
    out.whole = (
        final["choices"][0]["finish_reason"] in ("stop", "length")
        and usage_adds_up(usage, max_tokens)
        and texts <= usage["completion_tokens"]
    )


async def openai_sse(
    http: httpx.AsyncClient, out: Outcome, max_tokens: int, cut_after: int | None
) -> None:
    body = {
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await read_events(http, "/v1/chat/completions", body, out, cut_after)
    if events is None:
        return
    if len(events) < 3 or events[-1] != "[DONE]":
        out.problem = f"stream ended without [DONE]: {events[-2:]}"
        return
    usage_chunk, finish_chunk = json.loads(events[-2]), json.loads(events[-3])
    if "error" in usage_chunk:
        out.problem = f"error event: {usage_chunk['error']}"
        return
    usage = usage_chunk["usage"]
    out.completion_tokens = usage["completion_tokens"]
    out.whole = (
        usage_chunk["choices"] == []
        and finish_chunk["choices"][0]["finish_reason"] in ("stop", "length")
        and usage_adds_up(usage, max_tokens)
    )


async def ws_generate(url: str, out: Outcome, max_tokens: int, cut_after: int | None) -> None:
    ws_url = url.replace("http://", "ws://", 1) + "/ws/generate"
    async with websockets.connect(ws_url, open_timeout=60) as ws:
        out.status = 101
        await ws.send(json.dumps({"prompt": random.choice(PROMPTS), "max_tokens": max_tokens}))
        frames = 0
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=120))
            frames += 1
            if cut_after is not None and frames >= cut_after:
                return  # leaving the block closes the connection mid-generation
            if "token" in frame:
                continue
            if "error" in frame:
                out.problem = f"error frame: {frame['error']}"
                if frame["error"]["code"] in ("server_error", "generation_failed"):
                    out.status = 500
                return
            usage = frame["usage"]
            out.completion_tokens = usage["completion_tokens"]
            out.whole = (
                frame.get("done") is True
                and frame["finish_reason"] in ("stop", "length")
                and usage_adds_up(usage, max_tokens)
            )
            return


async def one_request(
    kind: str, url: str, http: httpx.AsyncClient, disconnect: bool, max_tokens: int
) -> Outcome:
    out = Outcome(kind, disconnect)
    cut_after = random.randint(1, 3) if disconnect else None
    started = time.monotonic()
    try:
        if kind == "native-json":
            await native_json(http, out, max_tokens)
        elif kind == "openai-json":
            await openai_json(http, out, max_tokens)
        elif kind == "native-sse":
            await native_sse(http, out, max_tokens, cut_after)
        elif kind == "openai-sse":
            await openai_sse(http, out, max_tokens, cut_after)
        else:
            await ws_generate(url, out, max_tokens, cut_after)
    except Exception as exc:  # a load test reports failures instead of stopping at the first
        out.problem = f"{type(exc).__name__}: {exc}"[:200]
    out.seconds = time.monotonic() - started
    return out


async def run_load(url: str, args: argparse.Namespace, rng: random.Random) -> list[Outcome]:
    jobs: asyncio.Queue[tuple[str, bool, int]] = asyncio.Queue()
    for _ in range(args.requests):
        kind = rng.choice(KINDS)
        disconnect = kind in STREAMING and rng.random() < args.disconnect_rate * len(KINDS) / len(
            STREAMING
        )
        jobs.put_nowait((kind, disconnect, rng.randint(args.min_tokens, args.max_tokens)))
    outcomes: list[Outcome] = []

    async def client() -> None:
        timeout = httpx.Timeout(args.request_timeout)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            while not jobs.empty():
                kind, disconnect, max_tokens = jobs.get_nowait()
                outcomes.append(await one_request(kind, url, http, disconnect, max_tokens))

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return outcomes


# --- measuring ----------------------------------------------------------------------------------


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def wait_until_idle(url: str, limit_seconds: float) -> dict[str, int]:
    """Poll /api/health until no slot is busy or queued (cancelled streams must free theirs)."""
    deadline = time.monotonic() + limit_seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while True:
            slots: dict[str, int] = (await http.get("/api/health")).json()["slots"]
            if (slots["busy"] == 0 and slots["queued"] == 0) or time.monotonic() > deadline:
                return slots
            await asyncio.sleep(0.2)


async def warm_up(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for kind in KINDS:
            outcome = await one_request(kind, url, http, disconnect=False, max_tokens=16)
            if not outcome.whole:
                raise SystemExit(f"warm-up request {kind} failed: {outcome.problem}")


async def measure(url: str, pid: int, args: argparse.Namespace) -> Report:
    report = Report()
    report.rss["start"] = rss(pid)
    await warm_up(url)
    await wait_until_idle(url, 60)
    report.rss["warm"] = rss(pid)
    started = time.monotonic()
    report.outcomes = await asyncio.wait_for(
        run_load(url, args, random.Random(args.seed)), timeout=args.time_limit
    )
    report.load_seconds = time.monotonic() - started
    report.rss["loaded"] = rss(pid)
    report.slots_after = await wait_until_idle(url, 60)
    await asyncio.sleep(args.idle)  # the idle period is the point here, not a synchronization
    report.rss["idle"] = rss(pid)
    return report


# --- reporting ----------------------------------------------------------------------------------


def megabytes(size: int) -> str:
    return f"{size / (1 << 20):.0f} MB"


def summarize(report: Report, model_name: str, args: argparse.Namespace) -> tuple[list[str], bool]:
    outcomes = report.outcomes
    server_errors = [o for o in outcomes if o.status is not None and o.status >= 500]
    finished = [o for o in outcomes if not o.disconnect]
    broken = [o for o in finished if not o.whole]
    cut = [o for o in outcomes if o.disconnect]
    cut_problems = [o for o in cut if o.problem is not None]
    by_kind = collections.Counter(o.kind for o in outcomes)
    latencies = sorted(o.seconds for o in finished if o.whole)
    tokens = sum(o.completion_tokens for o in outcomes)
    growth = report.rss["idle"] / report.rss["warm"] - 1
    idle = report.slots_after
    ok = (
        len(outcomes) == args.requests
        and not server_errors
        and not broken
        and not cut_problems
        and idle["busy"] == 0
        and idle["queued"] == 0
        and growth <= args.rss_tolerance
    )
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
    lines = [
        f"shimmy load test: {model_name}, {len(outcomes)} requests from {args.clients} clients, "
        f"{args.parallel} slots, max_tokens {args.min_tokens}-{args.max_tokens}",
        "  mix: " + ", ".join(f"{kind} {by_kind[kind]}" for kind in KINDS),
        f"  completed whole: {len(finished) - len(broken)}/{len(finished)}, "
        f"disconnected mid-stream: {len(cut)} (problems: {len(cut_problems)}), "
        f"5xx: {len(server_errors)}",
        f"  {tokens} completion tokens in {report.load_seconds:.1f} s "
        f"({tokens / max(report.load_seconds, 1e-9):.0f} tok/s); latency of whole requests "
        f"p50 {statistics.median(latencies) if latencies else 0:.2f} s, p95 {p95:.2f} s",
        f"  RSS: start {megabytes(report.rss['start'])}, after warm-up "
        f"{megabytes(report.rss['warm'])}, after load {megabytes(report.rss['loaded'])}, "
        f"after {args.idle:g} s idle {megabytes(report.rss['idle'])} "
        f"({growth:+.1%} vs warm-up; limit +{args.rss_tolerance:.0%})",
        f"  slots afterwards: busy {idle['busy']}, queued {idle['queued']}",
    ]
    for outcome in [*server_errors, *broken, *cut_problems][:10]:
        lines.append(f"  ! {outcome.kind} status {outcome.status}: {outcome.problem}")
    lines.append("PASS" if ok else "FAIL")
    return lines, ok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.2)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4, help="shimmy --parallel")
    parser.add_argument("--ctx", type=int, default=1024, help="shimmy --ctx-size")
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds before last RSS")
    parser.add_argument("--rss-tolerance", type=float, default=0.15)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--time-limit", type=float, default=900.0, help="cap on the load phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="shimmy-loadtest-") as folder:
        tmp = Path(folder)
        model, model_name = model_path(args.tiny, tmp)
        with shimmy_server(model, tmp, args) as (url, pid):
            report = asyncio.run(measure(url, pid, args))
    lines, ok = summarize(report, f"{model_name} model ({model.name})", args)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

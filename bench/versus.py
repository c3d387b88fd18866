"""shimmy vs llama.cpp's own server (llama-server) vs llama-cpp-python's server, side by side.

Run with ``make bench`` (which builds llama-server from the same llama.cpp sources as the
wheel) or ``.venv/bin/python bench/versus.py --llama-server PATH``. Requests go to one server
at a time, so the servers never compete for cores; an idle server uses none. The plumbing
(streaming, token counting, server processes, the time budget) is bench.py's. See
bench/README.md for the scenarios and every server's flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

import bench
from bench import LevelStats, StreamResult, fmt, log, median, ratio

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = bench.RESULTS_DIR
LOG_DIR = RESULTS_DIR / "logs"
CHART = ROOT / "docs" / "bench" / "versus.png"

SHIMMY = "shimmy"
SHIMMY_NO_SPEC = "shimmy --no-speculative"
LLAMA_SERVER = "llama-server"
PEER = "llama-cpp-python server"
# The three servers every scenario compares; the others are variants for one scenario.
MAIN = (SHIMMY, LLAMA_SERVER, PEER)
SPEC_PREFIX = "llama-server --spec-type "
# Servers started for one scenario only are listed as "<server> (<what>)"; their numbers
# stand in the main server's column.
EMBED = "(embeddings)"

TARGET_SPEC_OVERHEAD = 0.97  # shimmy on a story >= this x shimmy --no-speculative
QUICK_NGRAM_MODES = ("ngram-simple", "ngram-mod")
# How long the background clients of the long-prompt scenario run before the long prompt is
# sent: their prompts are a few dozen tokens, so by then every batching server decodes all.
BACKGROUND_SETTLE_S = 1.0

# Greedy decoding copies this nearly token for token: the case n-gram speculation is for.
REPEAT_CODE = '''\
def merge_intervals(intervals: list[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Merge overlapping or nearly touching closed intervals, sorted by their start.

    Two intervals are merged when the second starts at most ``gap`` after the first ends.
    """
    if gap < 0:
        raise ValueError("gap must not be negative")
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: (pair[0], pair[1]))
    merged = [ordered[0]]
    for start, end in ordered[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end + gap:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged
'''
REPEAT_PROMPT = (
    "The function below comes from a small scheduling library. It is reviewed, tested and "
    "must not change: a colleague needs an exact copy of it for another module.\n\n"
    f"```python\n{REPEAT_CODE}```\n\n"
    "Repeat the function above verbatim, character for character, with the same names, "
    "docstring and indentation, and nothing else.\n\n```python\n"
)

EMBED_SUBJECTS = ("harbour", "library", "orchard", "railway", "market", "observatory", "mill")


@dataclass
class VersusConfig:
    model: Path
    llama_server: Path | None
    threads: int
    ctx: int
    parallel: int
    chat_slots: int
    levels: list[int]
    tokens: int
    reps: int
    conversations: int
    repeat_tokens: int
    story_tokens: int
    ngram_modes: list[str] | None
    embed_inputs: int
    long_prompt_tokens: int
    background_clients: int
    background_tokens: int
    request_timeout: float
    startup_timeout: float
    time_budget: float
    chart: Path
    quick: bool
    # Letters of the scenarios to run (g, memory, comes with every start; d runs with c).
    scenarios: str = "abcdefg"


@dataclass
class SingleClient:
    """Scenarios c and d on one server: decode tok/s of one client, median of the reps."""

    repeat_tps: float | None = None
    story_tps: float | None = None
    repeat_tokens: int | None = None
    story_tokens: int | None = None
    repeat_tps_all: list[float] = field(default_factory=list)
    story_tps_all: list[float] = field(default_factory=list)


@dataclass
class Conversations:
    conversations: int
    slots: int
    prompt_tokens: int
    turn1_ttft_s: float | None
    turn2_ttft_s: float | None
    speedup: float | None
    turn1_ttft_all_s: list[float]
    turn2_ttft_all_s: list[float]


@dataclass
class LongPrompt:
    prompt_tokens: int
    idle_ttft_s: float | None
    loaded_ttft_s: float | None
    # Background clients that had their first token before the long prompt was sent and were
    # still decoding when its first token came (a one-at-a-time server: at most 1).
    background_decoding: int
    background_max_gap_s: float | None


@dataclass
class Embeddings:
    inputs: int
    seconds: float
    inputs_per_s: float


@dataclass
class Memory:
    rss_mib: float
    processes: list[dict[str, Any]]


@dataclass
class ServerResults:
    name: str
    command: list[str] = field(default_factory=list)
    # llama-server logs its slots' context; kept to check that it matches shimmy's.
    n_ctx_slot: int | None = None
    levels: list[LevelStats] = field(default_factory=list)
    single: SingleClient | None = None
    conversations: Conversations | None = None
    long_prompt: LongPrompt | None = None
    embeddings: Embeddings | None = None
    memory: Memory | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class VersusReport:
    started: str
    elapsed_s: float
    machine: dict[str, Any]
    versions: dict[str, str]
    config: dict[str, Any]
    servers: dict[str, ServerResults]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def best_spec_mode(servers: dict[str, ServerResults]) -> ServerResults | None:
    """The llama-server n-gram mode with the highest repeat-the-code tok/s."""
    measured = [
        s
        for name, s in servers.items()
        if name.startswith(SPEC_PREFIX) and s.single and s.single.repeat_tps is not None
    ]
    return max(measured, key=lambda s: s.single.repeat_tps or 0.0, default=None)


def ngram_modes_from_help(text: str) -> list[str]:
    """The n-gram values of ``--spec-type`` as llama-server's ``--help`` lists them."""
    match = re.search(r"--spec-type\s+([\w,-]+)", text)
    if match is None:
        return []
    return [mode for mode in match.group(1).split(",") if mode.startswith("ngram")]


def n_ctx_slot_from_log(text: str) -> int | None:
    match = re.search(r"n_ctx_slot = (\d+)", text)
    return int(match.group(1)) if match else None


def long_document(tag: str, target_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """A prompt of about ``target_tokens`` tokens, unique from its first line on (``tag``)."""
    lines = [f"Harbour log {tag}. Each entry records one ship that called at the port."]
    entry = 0
    while count_tokens("\n".join(lines)) < target_tokens:
        district = bench.CHAT_DISTRICTS[entry % len(bench.CHAT_DISTRICTS)]
        item = bench.CHAT_ITEMS[(entry * 5) % len(bench.CHAT_ITEMS)]
        lines.append(
            f"Entry {entry + 1}: a ship from {district} unloaded {40 + entry * 7} crates "
            f"for the {item} on day {entry % 28 + 1} of month {entry % 12 + 1}."
        )
        entry += 1
    lines.append("Question: which district sent the most crates? Answer:")
    return "\n".join(lines)


def embed_inputs(count: int) -> list[str]:
    return [
        f"Note {i}: the {EMBED_SUBJECTS[i % len(EMBED_SUBJECTS)]} in "
        f"{bench.CHAT_DISTRICTS[i % len(bench.CHAT_DISTRICTS)]} opened in {1850 + 3 * i} and "
        f"has {10 + i} rooms."
        for i in range(count)
    ]


def tree_memory(pid: int) -> Memory:
    """RSS of a server and all its descendants (shimmy's model workers are children)."""
    import psutil

    root = psutil.Process(pid)
    processes = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss = process.memory_info().rss
            processes.append({"pid": process.pid, "name": process.name(), "rss_mib": rss / 2**20})
    total = sum(p["rss_mib"] for p in processes)
    return Memory(rss_mib=round(total, 1), processes=processes)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def single_of(report: VersusReport, name: str) -> SingleClient | None:
    server = report.servers.get(name)
    return server.single if server else None


def spec_flags(server: ServerResults) -> str:
    return server.name.removeprefix(LLAMA_SERVER + " ")


def main_row(label: str, values: dict[str, float | None], digits: int = 1) -> str:
    """One metric for the three servers and shimmy's ratio to each peer."""
    ours = values.get(SHIMMY)
    cells = [fmt(values.get(name), digits) for name in MAIN]
    ratios = [fmt(ratio(ours, values.get(name)), 2, "x") for name in MAIN[1:]]
    return f"| {label} | " + " | ".join(cells + ratios) + " |"


def per_server(
    report: VersusReport, pick: Callable[[ServerResults], float | None], variant: str = ""
) -> dict[str, float | None]:
    """``pick`` of each main server, taken from its "<name> <variant>" run where there is one
    (a server started for that scenario alone)."""
    values: dict[str, float | None] = {}
    for name in MAIN:
        names = [f"{name} {variant}", name] if variant else [name]
        runs = [report.servers.get(n) for n in names]
        found = [pick(run) for run in runs if run is not None]
        values[name] = next((v for v in found if v is not None), None)
    return values


def chat_variant(report: VersusReport) -> str:
    return f"({report.config.get('chat_slots')} slots)"


def level_rows(report: VersusReport) -> list[str]:
    rows = []
    for clients in report.config.get("levels", []):

        def pick(s: ServerResults, n: int = clients) -> float | None:
            stats = next((lv for lv in s.levels if lv.clients == n), None)
            return stats.aggregate_tps if stats else None

        label = f"a. tok/s @ {clients} client{'' if clients == 1 else 's'}"
        rows.append(main_row(label, per_server(report, pick)))
    return rows


def conversation_rows(report: VersusReport) -> list[str]:
    def pick(attr: str) -> Callable[[ServerResults], float | None]:
        return lambda s: getattr(s.conversations, attr) if s.conversations else None

    config, variant = report.config, chat_variant(report)
    where = f"{config.get('conversations')} conversations on {config.get('chat_slots')} slots"
    rows = (
        (f"b. turn-1 TTFT s, median ({where}; lower is better)", "turn1_ttft_s", 3),
        ("b. turn-2 TTFT s, median (lower is better)", "turn2_ttft_s", 3),
        ("b. speedup turn 1 / turn 2", "speedup", 1),
    )
    return [
        main_row(label, per_server(report, pick(attr), variant), digits)
        for label, attr, digits in rows
    ]


def single_rows(report: VersusReport) -> list[str]:
    best = best_spec_mode(report.servers)
    rows = []
    for attr, scenario in (("repeat_tps", "c. repeat-the-code"), ("story_tps", "d. story")):

        def pick(s: ServerResults, a: str = attr) -> float | None:
            return getattr(s.single, a) if s.single else None

        values = per_server(report, pick)
        rows.append(main_row(f"{scenario} tok/s (llama-server defaults)", values))
        if best is not None:
            spec_values = {**values, LLAMA_SERVER: pick(best)}
            rows.append(
                main_row(f"{scenario} tok/s (llama-server {spec_flags(best)})", spec_values)
            )
    return rows


def other_rows(report: VersusReport) -> list[str]:
    config = report.config

    def long(attr: str) -> Callable[[ServerResults], float | None]:
        return lambda s: getattr(s.long_prompt, attr) if s.long_prompt else None

    def embedded(s: ServerResults) -> float | None:
        return s.embeddings.inputs_per_s if s.embeddings else None

    def rss(s: ServerResults) -> float | None:
        return s.memory.rss_mib if s.memory else None

    tokens, busy = config.get("long_prompt_tokens"), config.get("background_clients")
    inputs = config.get("embed_inputs")
    return [
        main_row(f"e. embeddings/s ({inputs} in one call)", per_server(report, embedded, EMBED)),
        main_row(
            f"f. {tokens}-token prompt TTFT s, idle", per_server(report, long("idle_ttft_s")), 3
        ),
        main_row(
            f"f. {tokens}-token prompt TTFT s, {busy} clients decoding",
            per_server(report, long("loaded_ttft_s")),
            3,
        ),
        main_row("g. RSS MiB at rest, process tree", per_server(report, rss), 0),
    ]


def speculation_lines(report: VersusReport) -> list[str]:
    """Every variant of scenarios c and d, and the overhead target on the story."""
    lines = [
        "",
        "Single client, every variant (c: repeat-the-code, d: story; decode tok/s, tokens):",
        "",
        "| server | c tok/s | c tokens | d tok/s | d tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, server in report.servers.items():
        single = server.single
        if single is None:
            continue
        lines.append(
            f"| {name} | {fmt(single.repeat_tps)} | {single.repeat_tokens or '—'} | "
            f"{fmt(single.story_tps)} | {single.story_tokens or '—'} |"
        )
    best = best_spec_mode(report.servers)
    if best is not None:
        lines += ["", f"llama-server's best n-gram mode on repeat-the-code: `{spec_flags(best)}`."]
    with_spec, without = single_of(report, SHIMMY), single_of(report, SHIMMY_NO_SPEC)
    share = ratio(
        with_spec.story_tps if with_spec else None, without.story_tps if without else None
    )
    target = f"shimmy / shimmy --no-speculative on the story >= {TARGET_SPEC_OVERHEAD}x"
    if share is None:
        lines += ["", f"- n/a: {target} (no --no-speculative run)"]
    else:
        verdict = "PASS" if share >= TARGET_SPEC_OVERHEAD else "MISS"
        lines += ["", f"- {verdict}: {target} ({share:.3f}x)"]
    return lines


def command_lines(report: VersusReport) -> list[str]:
    lines = ["", "Commands (port and paths as run):", ""]
    for name, server in report.servers.items():
        if server.command:
            slot = f" (n_ctx_slot {server.n_ctx_slot})" if server.n_ctx_slot else ""
            lines.append(f"- {name}{slot}: `{' '.join(server.command)}`")
    return lines


def render_markdown(report: VersusReport) -> str:
    config, machine = report.config, report.machine
    lines = [
        f"# shimmy vs llama-server vs llama-cpp-python ({report.started}, "
        f"{report.elapsed_s:.0f} s{', --quick' if config.get('quick') else ''})",
        "",
        f"- Machine: {machine.get('cpu')}, {machine.get('physical_cores')} physical / "
        f"{machine.get('logical_cores')} logical cores, {machine.get('ram_gib')} GiB RAM; "
        f"load average {machine.get('load_average_1m')} at the start",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"- Model: {config.get('model_name')}; threads {config.get('threads')}, "
        f"{config.get('parallel')} slots of {config.get('ctx')} tokens "
        f"({config.get('chat_slots')} for b), greedy",
        "",
        f"| metric | {' | '.join(MAIN)} | shimmy / llama-server | shimmy / llama-cpp-python |",
        "|---|---:|---:|---:|---:|---:|",
        *level_rows(report),
        *conversation_rows(report),
        *single_rows(report),
        *other_rows(report),
        "",
        "Ratios are shimmy / the other server: for tok/s, inputs/s and speedup higher is "
        "better for shimmy, for TTFT and RSS lower.",
        *speculation_lines(report),
        *command_lines(report),
    ]
    errors = [(n, e) for n, s in report.servers.items() for e in s.errors]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {name}: {error}" for name, error in errors]
    if report.skipped:
        spent = f"Skipped (time budget of {config.get('time_budget_s')} s spent): "
        lines += ["", spent + ", ".join(report.skipped)]
    lines += [f"- note: {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def draw_chart(report: VersusReport, path: Path) -> None:
    """Throughput by clients (a) and conversation TTFTs (b), three servers, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variant = chat_variant(report)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in MAIN:
        server = report.servers.get(name)
        levels = [lv for lv in server.levels if lv.ok] if server else []
        if levels:
            xs = [lv.clients for lv in levels]
            left.plot(xs, [lv.aggregate_tps for lv in levels], marker="o", label=name)
    left.set(title="a. tokens/s by concurrent clients", xlabel="clients", ylabel="tokens/s")
    left.set_xscale("log", base=2)
    left.set_xticks(report.config.get("levels", []), labels=report.config.get("levels", []))
    left.set_ylim(bottom=0)  # from zero, so the gaps between the lines are not exaggerated
    left.grid(alpha=0.3)
    if left.lines:
        left.legend()
    first = per_server(report, lambda s: s.conversations and s.conversations.turn1_ttft_s, variant)
    second = per_server(report, lambda s: s.conversations and s.conversations.turn2_ttft_s, variant)
    names = [n for n in MAIN if first[n] is not None and second[n] is not None]
    turns = [(first[n] or 0.0, second[n] or 0.0) for n in names]
    positions = range(len(names))
    right.bar([p - 0.2 for p in positions], [t[0] for t in turns], 0.4, label="turn 1")
    right.bar([p + 0.2 for p in positions], [t[1] for t in turns], 0.4, label="turn 2")
    right.set_xticks(list(positions), labels=names)
    right.set(title="b. median TTFT, conversations over slots", ylabel="seconds (lower is better)")
    if names:
        right.legend()
    config = report.config
    quick = ", --quick smoke run" if config.get("quick") else ""
    fig.suptitle(
        f"{config.get('model_name')}, {config.get('threads')} threads, "
        f"{report.machine.get('cpu')} ({report.started}{quick})",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Server commands
# --------------------------------------------------------------------------------------------


def bench_config(config: VersusConfig, parallel: int | None = None) -> bench.BenchConfig:
    """bench.py's configuration, for its command lines and its Contender."""
    return bench.BenchConfig(
        model=config.model,
        tokens=config.tokens,
        levels=config.levels,
        threads=config.threads,
        ctx=config.ctx,
        parallel=parallel or config.parallel,
        reps=config.reps,
        chat_reps=1,
        chat_turn1_tokens=32,
        request_timeout=config.request_timeout,
        startup_timeout=config.startup_timeout,
        time_budget=config.time_budget,
        skip_peer=False,
        quick=config.quick,
    )


def shimmy_command(config: VersusConfig, *extra: str, slots: int | None = None) -> ArgvFor:
    return lambda port: [*bench.shimmy_argv(bench_config(config, slots), port), *extra]


def llama_server_command(config: VersusConfig, *extra: str, slots: int | None = None) -> ArgvFor:
    # -c is the context of all slots together, split evenly when the KV cache is not unified
    # (the default once -np is given), so slots x ctx gives each slot shimmy's --ctx-size.
    slots = slots or config.parallel
    threads = str(config.threads)

    def argv(port: int) -> list[str]:
        return [
            str(config.llama_server),
            "-m",
            str(config.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            threads,
            "-tb",
            threads,
            "-np",
            str(slots),
            "-c",
            str(slots * config.ctx),
            "--no-webui",
            *extra,
        ]

    return argv


def peer_command(config: VersusConfig, *extra: str) -> ArgvFor:
    return lambda port: [*bench.peer_argv(bench_config(config), port), *extra]


ArgvFor = Callable[[int], list[str]]


def shimmy_has_flag(flag: str) -> bool:
    """Whether this shimmy's ``serve`` knows ``flag`` (features land while the bench exists)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [sys.executable, "-m", "shimmy", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        return flag in done.stdout
    return False


def llama_server_ngram_modes(binary: Path) -> list[str]:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
        return ngram_modes_from_help(done.stdout + done.stderr)
    return []


# --------------------------------------------------------------------------------------------
# Running servers
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A started server: its process, its bench.py client, and where its numbers go."""

    process: subprocess.Popen[bytes]
    contender: bench.Contender
    results: ServerResults

    @property
    def name(self) -> str:
        return self.results.name


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """Stop a server, then any of its children that outlived it (shimmy's model workers)."""
    import psutil

    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(process.pid).children(recursive=True)
    bench.stop_process(process)
    alive = [c for c in children if c.is_running()]
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, left = psutil.wait_procs(alive, timeout=10)
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


# Servers started and not yet stopped, by process id.
STARTED: dict[int, subprocess.Popen[bytes]] = {}


@contextlib.contextmanager
def server_process(
    argv: list[str], log_path: Path, base_url: str, timeout_s: float, cwd: Path
) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """bench.py's server_process, but the process is yielded too (for its memory)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        # A session of its own: Ctrl-C reaches only the bench, whose finally stops the server.
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
        STARTED[process.pid] = process
        try:
            yield process, bench.wait_until_ready(process, base_url, timeout_s, log_path)
        finally:
            stop_tree(process)
            STARTED.pop(process.pid, None)


def stop_all_started() -> None:
    """Stop every server still running: the last resort when SIGTERM or Ctrl-C ends the event
    loop before the scenarios' own ``with`` blocks could stop theirs."""
    for pid, process in list(STARTED.items()):
        stop_tree(process)
        STARTED.pop(pid, None)


class Launcher:
    """Starts servers for the measurements; every start is stopped by the stack it joins."""

    def __init__(
        self,
        config: VersusConfig,
        report: VersusReport,
        count_tokens: Callable[[str], int],
        cwd: Path,
    ) -> None:
        self.config = config
        self.report = report
        self.count_tokens = count_tokens
        self.cwd = cwd

    async def start(
        self, stack: contextlib.AsyncExitStack, name: str, argv_for: ArgvFor
    ) -> Server | None:
        """Start ``name`` (None, with the error recorded, if it does not come up).

        The wait for readiness blocks the event loop, which is fine: nothing else runs then.
        """
        results = self.report.servers.setdefault(name, ServerResults(name=name))
        port = bench.free_port()
        base_url = f"http://127.0.0.1:{port}"
        argv = argv_for(port)
        results.command = argv
        log_path = LOG_DIR / f"versus-{re.sub(r'[^A-Za-z0-9.]+', '-', name).strip('-')}.log"
        log(f"{name}: starting on port {port}")
        try:
            process, ids = stack.enter_context(
                server_process(argv, log_path, base_url, self.config.startup_timeout, self.cwd)
            )
        except (RuntimeError, OSError) as exc:
            results.errors.append(f"start: {exc}")
            log(f"  {name} failed: {exc}")
            return None
        with contextlib.suppress(OSError):
            results.n_ctx_slot = n_ctx_slot_from_log(log_path.read_text(errors="replace"))
        model = bench.model_id_for(self.config.model, ids)
        report = bench.ServerReport(name=name)
        config = bench_config(self.config)
        contender = bench.Contender(report, base_url, model, config, self.count_tokens)
        stack.push_async_callback(contender.client.aclose)
        return Server(process, contender, results)

    @contextlib.asynccontextmanager
    async def alone(self, name: str, argv_for: ArgvFor) -> AsyncIterator[Server | None]:
        """A server for one scenario only, stopped as soon as it is done."""
        async with contextlib.AsyncExitStack() as stack:
            yield await self.start(stack, name, argv_for)


async def attempt(server: Server, what: str, action: Callable[[], Awaitable[T]]) -> T | None:
    """One measurement; a failure is recorded and the server's other scenarios still run."""
    try:
        return await action()
    except (RuntimeError, httpx.HTTPError, ValueError, OSError, KeyError) as exc:
        server.results.errors.append(f"{what}: {exc}")
        log(f"  {server.name} failed: {what}: {exc}")
        return None


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


async def complete(server: Server, prompt: str, max_tokens: int, **extra: Any) -> StreamResult:
    """A streaming /v1/completions request; a failed one raises."""
    contender = server.contender
    body = {**bench.completion_body(contender.model, prompt, max_tokens), **extra}
    result = await bench.stream_request(
        contender.client,
        "/v1/completions",
        body,
        contender.config.request_timeout,
        contender.count_tokens,
    )
    if not result.ok:
        raise RuntimeError(f"completion failed: {result.error}")
    return result


async def chat(server: Server, messages: list[dict[str, str]], max_tokens: int) -> StreamResult:
    contender = server.contender
    body = bench.chat_body(contender.model, messages, max_tokens)
    result = await bench.stream_request(
        contender.client,
        "/v1/chat/completions",
        body,
        contender.config.request_timeout,
        contender.count_tokens,
    )
    if not result.ok or result.ttft is None:
        raise RuntimeError(f"chat failed: {result.error}")
    return result


async def warm_up(server: Server) -> StreamResult:
    """One short request: shimmy loads the model on first use, the others pay their first
    decode; memory at rest is measured after it."""
    return await complete(server, "Hello,", 8)


async def single_client(server: Server, config: VersusConfig) -> SingleClient:
    """c. repeat a function verbatim and d. continue a story: decode tok/s of one client."""
    single = SingleClient()
    for _ in range(config.reps):
        # The closing fence ends the copy, so the measured tokens are the copied code.
        copy = await complete(server, REPEAT_PROMPT, config.repeat_tokens, stop=["```"])
        story = await complete(server, bench.SINGLE_STREAM_PROMPT, config.story_tokens)
        for result, rates in ((copy, single.repeat_tps_all), (story, single.story_tps_all)):
            rate = bench.decode_rate(result.tokens, result.t_first, result.t_end)
            if rate is not None:
                rates.append(rate)
        single.repeat_tokens, single.story_tokens = copy.tokens, story.tokens
    single.repeat_tps = median(single.repeat_tps_all)
    single.story_tps = median(single.story_tps_all)
    return single


async def conversations(
    server: Server, config: VersusConfig, count_tokens: Callable[[str], int]
) -> Conversations:
    """b. turn 1 of every conversation, then turn 2 of each, one request at a time: with more
    conversations than slots, turn 2 is fast only where a prefix outlives its slot."""
    sessions = [bench.chat_turn1(500 + i) for i in range(config.conversations)]
    turn1, histories = [], []
    for messages in sessions:
        first = await chat(server, messages, 32)
        turn1.append(first.ttft or 0.0)
        histories.append(
            [
                *messages,
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "And which one serves the most residents?"},
            ]
        )
    turn2 = [(await chat(server, history, 16)).ttft or 0.0 for history in histories]
    t1, t2 = median(turn1), median(turn2)
    return Conversations(
        conversations=config.conversations,
        slots=config.chat_slots,
        prompt_tokens=count_tokens("\n".join(m["content"] for m in sessions[0])),
        turn1_ttft_s=t1,
        turn2_ttft_s=t2,
        speedup=ratio(t1, t2),
        turn1_ttft_all_s=turn1,
        turn2_ttft_all_s=turn2,
    )


async def long_prompt(
    server: Server, config: VersusConfig, count_tokens: Callable[[str], int]
) -> LongPrompt:
    """f. time to first token of a long prompt, alone and while other clients decode."""
    idle = await complete(server, long_document("A", config.long_prompt_tokens, count_tokens), 8)
    background = [
        asyncio.create_task(complete(server, bench.story_prompt(100, i), config.background_tokens))
        for i in range(config.background_clients)
    ]
    try:
        await asyncio.sleep(BACKGROUND_SETTLE_S)
        sent = time.perf_counter()
        document = long_document("B", config.long_prompt_tokens, count_tokens)
        loaded = await complete(server, document, 8)
        finished = await asyncio.gather(*background)
    finally:
        # On a failure, the background clients are not left running (nor their errors unread).
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    first = loaded.t_first or sent
    decoding = sum(
        1
        for r in finished
        if r.t_first is not None and r.t_first < sent and (r.t_end or 0.0) > first
    )
    gaps = [g for g in (r.max_gap for r in finished) if g is not None]
    return LongPrompt(
        prompt_tokens=count_tokens(document),
        idle_ttft_s=idle.ttft,
        loaded_ttft_s=loaded.ttft,
        background_decoding=decoding,
        background_max_gap_s=max(gaps) if gaps else None,
    )


async def embeddings(server: Server, config: VersusConfig) -> Embeddings:
    """e. one /v1/embeddings call with many inputs, after a small one that warms up."""
    contender = server.contender

    async def call(inputs: list[str]) -> float:
        started = time.perf_counter()
        body = {"model": contender.model, "input": inputs}
        response = await contender.client.post("/v1/embeddings", json=body)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        vectors = len(response.json().get("data", []))
        if vectors != len(inputs):
            raise RuntimeError(f"{vectors} vectors for {len(inputs)} inputs")
        return elapsed

    await call(["warm-up one", "warm-up two"])
    seconds = await call(embed_inputs(config.embed_inputs))
    return Embeddings(config.embed_inputs, seconds, config.embed_inputs / seconds)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Run:
    """The scenarios in order, cheapest and most telling first, so that a spent time budget
    costs the largest concurrency levels (the longest steps) rather than whole scenarios."""

    def __init__(self, config: VersusConfig, launcher: Launcher, budget: bench.TimeBudget):
        self.config = config
        self.launcher = launcher
        self.budget = budget
        self.main: dict[str, Server] = {}

    def main_commands(self) -> list[tuple[str, ArgvFor]]:
        config = self.config
        commands = [(SHIMMY, shimmy_command(config))]
        if config.llama_server is not None:
            commands.append((LLAMA_SERVER, llama_server_command(config)))
        commands.append((PEER, peer_command(config)))
        return commands

    async def go(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            # Idle servers use no CPU, so the three stay up for the whole run.
            for name, argv_for in self.main_commands():
                server = await self.launcher.start(stack, name, argv_for)
                if server is None:
                    continue
                if await attempt(server, "warm-up", functools.partial(warm_up, server)):
                    self.main[name] = server
                    # g. memory at rest: the model is loaded and one request was served.
                    server.results.memory = tree_memory(server.process.pid)
            steps = {
                "c": self.single_clients,
                "b": self.conversations,
                "f": self.long_prompts,
                "e": self.embeddings,
                "a": self.levels,
            }
            for letter, step in steps.items():
                if letter in self.config.scenarios:
                    await step()

    async def on(
        self,
        name: str,
        argv_for: ArgvFor | None,
        what: str,
        measure: Callable[[Server], Awaitable[None]],
        *,
        warm: bool = True,
    ) -> None:
        """Measure on a main server (``argv_for`` None) or on one started for this alone."""
        if argv_for is None:
            server = self.main.get(name)
            if server is not None:
                await attempt(server, what, functools.partial(measure, server))
            return
        async with self.launcher.alone(name, argv_for) as alone:
            if alone is None:
                return
            if warm and not await attempt(alone, "warm-up", functools.partial(warm_up, alone)):
                return
            await attempt(alone, what, functools.partial(measure, alone))

    async def single_clients(self) -> None:
        config = self.config
        log(f"c/d. single client: repeat-the-code and story, {config.reps} rep(s)")
        variants: list[tuple[str, ArgvFor | None]] = [(SHIMMY, None)]
        if shimmy_has_flag("--no-speculative"):
            variants.append((SHIMMY_NO_SPEC, shimmy_command(config, "--no-speculative")))
        else:
            self.launcher.report.notes.append("this shimmy has no --no-speculative: not run")
        if config.llama_server is not None:
            variants.append((LLAMA_SERVER, None))
            for mode in self.spec_modes(config.llama_server):
                argv_for = llama_server_command(config, "--spec-type", mode)
                variants.append((SPEC_PREFIX + mode, argv_for))
        variants.append((PEER, None))

        async def measure(server: Server) -> None:
            server.results.single = await single_client(server, config)

        for name, argv_for in variants:
            if self.budget.allows(f"c/d on {name}"):
                await self.on(name, argv_for, "single client", measure)

    def spec_modes(self, binary: Path) -> list[str]:
        offered = llama_server_ngram_modes(binary)
        if not offered:
            self.launcher.report.notes.append("llama-server --help lists no ngram-* --spec-type")
            offered = list(QUICK_NGRAM_MODES[:1])
        wanted = self.config.ngram_modes
        if wanted is not None:
            return wanted
        return [m for m in QUICK_NGRAM_MODES if m in offered] if self.config.quick else offered

    async def conversations(self) -> None:
        config = self.config
        if not self.budget.allows("b. conversations"):
            return
        log(f"b. {config.conversations} conversations on {config.chat_slots} slots")
        count = self.launcher.count_tokens

        async def measure(server: Server) -> None:
            server.results.conversations = await conversations(server, config, count)

        # Servers of their own with fewer slots than conversations; the peer has one anyway.
        slots = config.chat_slots
        resized = f"({slots} slots)"
        await self.on(f"{SHIMMY} {resized}", shimmy_command(config, slots=slots), "b", measure)
        if config.llama_server is not None:
            argv_for = llama_server_command(config, slots=slots)
            await self.on(f"{LLAMA_SERVER} {resized}", argv_for, "b", measure)
        await self.on(PEER, None, "b", measure)

    async def long_prompts(self) -> None:
        config = self.config
        if not self.budget.allows("f. long prompt"):
            return
        busy = config.background_clients
        log(f"f. {config.long_prompt_tokens}-token prompt, idle and with {busy} clients decoding")
        count = self.launcher.count_tokens

        async def measure(server: Server) -> None:
            server.results.long_prompt = await long_prompt(server, config, count)

        for name in MAIN:
            await self.on(name, None, "long prompt", measure)

    async def embeddings(self) -> None:
        config = self.config
        if not self.budget.allows("e. embeddings"):
            return
        log(f"e. {config.embed_inputs} embeddings in one call")

        async def measure(server: Server) -> None:
            server.results.embeddings = await embeddings(server, config)

        # shimmy serves embeddings from the chat model; llama-server only when started for
        # them (and then nothing else), llama-cpp-python only with --embedding.
        await self.on(SHIMMY, None, "embeddings", measure)
        if config.llama_server is not None:
            argv_for = llama_server_command(config, "--embeddings", "--pooling", "mean")
            await self.on(f"{LLAMA_SERVER} {EMBED}", argv_for, "e", measure, warm=False)
        argv_for = peer_command(config, "--embedding", "True")
        await self.on(f"{PEER} {EMBED}", argv_for, "e", measure, warm=False)

    async def levels(self) -> None:
        config = self.config
        if not self.budget.allows("a. concurrent clients"):
            return
        log(f"a. warm-up at {config.levels} clients")
        for server in self.main.values():
            warm = functools.partial(server.contender.warm_up, config.levels)
            await attempt(server, "warm-up", warm)
        for clients in config.levels:
            if not self.budget.allows(f"a. {clients} clients"):
                continue
            log(f"a. {clients} concurrent clients, {config.tokens} tokens each")
            for server in self.main.values():
                level = functools.partial(server.contender.concurrency_level, clients)
                stats = await attempt(server, f"{clients} clients", level)
                if stats is not None:
                    server.results.levels.append(stats)


def run(config: VersusConfig) -> VersusReport:
    started = time.perf_counter()
    report = VersusReport(
        started=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        elapsed_s=0.0,
        machine=bench.machine_facts(),
        versions=bench.versions(),
        config=config_facts(config),
        servers={},
    )
    if config.llama_server is None:
        report.notes.append("no llama-server binary (build it with `make llama-server`)")
    count_tokens = bench.load_tokenizer(config.model)
    budget = bench.TimeBudget(config.time_budget)
    # cwd is an empty folder so shimmy does not also pick up a ./models of the caller.
    with tempfile.TemporaryDirectory(prefix="shimmy-versus-") as scratch:
        launcher = Launcher(config, report, count_tokens, Path(scratch))
        asyncio.run(Run(config, launcher, budget).go())
    report.skipped = budget.skipped
    report.elapsed_s = time.perf_counter() - started
    return report


def config_facts(config: VersusConfig) -> dict[str, Any]:
    facts = {k: v for k, v in dataclasses.asdict(config).items() if not isinstance(v, Path)}
    facts.update(
        model=str(config.model),
        model_name=config.model.name,
        llama_server=str(config.llama_server) if config.llama_server else None,
        time_budget_s=config.time_budget,
    )
    return facts


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def default_llama_server() -> Path | None:
    """The binary `make llama-server` caches for the installed version (CPU build), or one
    on PATH."""
    from importlib.metadata import PackageNotFoundError, version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    with contextlib.suppress(PackageNotFoundError):
        built = cache / "shimmy" / "llama-server" / f"{version('llama-cpp-python')}-cpu"
        if (built / "llama-server").is_file():
            return built / "llama-server"
    found = shutil.which("llama-server")
    return Path(found) if found else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--model", type=Path, help="GGUF file (default: the starter model)")
    add("--llama-server", type=Path, help="llama-server binary (default: make's cached build)")
    add("--quick", action="store_true", help="smoke run: fewer clients, tokens and variants")
    add("--levels", type=bench.parse_levels, help="concurrent clients (1,4,8,16)")
    add("--tokens", type=int, help="max_tokens per request in a. (128)")
    add("--threads", type=int, help="threads of every server (physical cores)")
    add("--ctx", type=int, default=4096, help="context per sequence (4096)")
    add("--parallel", type=int, default=8, help="slots of shimmy and llama-server (8)")
    add("--chat-slots", type=int, default=4, help="slots in b. (4)")
    add("--conversations", type=int, help="conversations in b. (12)")
    add("--reps", type=int, help="repetitions of c. and d. (2)")
    add("--ngram-modes", help="llama-server --spec-type values to try (all its ngram-* modes)")
    add("--request-timeout", type=float, default=120.0, help="seconds per request (120)")
    add("--time-budget", type=float, help="no new step after this many seconds (900)")
    add("--scenarios", default="abcdefg", help="letters of the scenarios to run (abcdefg)")
    add("--chart", type=Path, help=f"PNG to draw (default {CHART.relative_to(ROOT)})")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> VersusConfig:
    quick = bool(args.quick)
    model = args.model.resolve() if args.model else bench.default_model()
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")
    binary = args.llama_server or default_llama_server()
    if binary is not None and not binary.is_file():
        raise SystemExit(f"llama-server not found: {binary} (make llama-server builds it)")
    # A smoke run must not replace the committed chart.
    chart = args.chart or (RESULTS_DIR / "versus-quick.png" if quick else CHART)
    return VersusConfig(
        model=model,
        llama_server=binary.resolve() if binary else None,
        threads=args.threads or bench.physical_cores(),
        ctx=args.ctx,
        parallel=args.parallel,
        chat_slots=args.chat_slots,
        levels=args.levels or ([1, 4] if quick else [1, 4, 8, 16]),
        tokens=args.tokens or (32 if quick else 128),
        reps=args.reps or (1 if quick else 2),
        conversations=args.conversations or (6 if quick else 12),
        repeat_tokens=128 if quick else 256,
        story_tokens=48 if quick else 128,
        ngram_modes=args.ngram_modes.split(",") if args.ngram_modes else None,
        embed_inputs=16 if quick else 64,
        long_prompt_tokens=1000 if quick else 2000,
        background_clients=4,
        background_tokens=64 if quick else 128,
        request_timeout=args.request_timeout,
        startup_timeout=180.0,
        time_budget=args.time_budget or (240.0 if quick else 900.0),
        chart=chart,
        quick=quick,
        scenarios=args.scenarios.replace("d", "c"),
    )


def save(report: VersusReport, markdown: str, chart: Path) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "versus.md").write_text(markdown)
    (RESULTS_DIR / "versus.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    try:
        draw_chart(report, chart)
        log(f"chart: {chart}")
    except ImportError:
        log("no matplotlib (pip install -e '.[bench]'): chart not drawn")


def main(argv: Sequence[str] | None = None) -> int:
    config = build_config(parse_args(argv))
    try:
        report = bench.run_interruptibly(functools.partial(run, config))
    finally:
        stop_all_started()
    if report is None:
        return 130
    markdown = render_markdown(report)
    save(report, markdown, config.chart)
    print(markdown)
    log(f"saved {RESULTS_DIR / 'versus.md'} and versus.json")
    return 1 if any(s.errors for s in report.servers.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""A simulated stretch of typing against ``/infill``: keystroke latency with and without reuse.

An editor asks for a completion at every pause in typing: the same file each time, its prefix a
few characters longer. This sends ``--steps`` such completions (streamed, as llama.vscode's
settings allow) to shimmy, to shimmy with ``--no-prefix-cache``, and, when a ``llama-server``
binary is found (``--llama-server`` or on PATH), to llama.cpp's own server on the same model,
one server at a time. It reports time to first token (p50/p95 over the keystrokes after the
first, the first one's separately: it reads the whole file) and the prompt tokens each request
decoded (``timings.prompt_n``) and reused (``timings.cache_n``).

    .venv/bin/python bench/fim_typing.py                 # the tiny generated FIM model
    .venv/bin/python bench/fim_typing.py --model qwen2.5-coder-1.5b-q8_0.gguf

Without ``--model`` the tiny random-weight FIM model of the tests is generated (its text is
noise; its timings are real llama.cpp work). Results: ``bench/results/fim_latest.{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the benchmark's helpers: ports, processes, percentiles)

TYPED = "total = sum(value * weight for value, weight in zip(values, weights)) / len(values)\n"


@dataclass
class Keystroke:
    ttft_ms: float
    total_ms: float
    prompt_n: int  # prompt tokens decoded
    cache_n: int  # prompt tokens reused
    predicted_n: int


@dataclass
class Run:
    server: str
    keystrokes: list[Keystroke] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        later = self.keystrokes[1:]
        ttft = [k.ttft_ms for k in later]
        return {
            "server": self.server,
            "requests": len(self.keystrokes),
            "first_ttft_ms": self.keystrokes[0].ttft_ms if self.keystrokes else None,
            "ttft_p50_ms": bench.percentile(ttft, 50),
            "ttft_p95_ms": bench.percentile(ttft, 95),
            "decoded_mean": statistics.fmean(k.prompt_n for k in later) if later else None,
            "reused_mean": statistics.fmean(k.cache_n for k in later) if later else None,
            "first_decoded": self.keystrokes[0].prompt_n if self.keystrokes else None,
            "error": self.error,
        }


def tiny_fim_model(folder: Path) -> Path:
    """The tests' tiny FIM model (tests/tiny_gguf.py, loaded from its file)."""
    spec = importlib.util.spec_from_file_location("tiny_gguf", HERE.parent / "tests/tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path: Path = module.write_tiny_gguf(folder / "coder.gguf", fim="repo", name="coder")
    return path


def source_file(count_tokens: Any, tokens: int) -> tuple[str, int]:
    """A Python file of about ``tokens`` tokens, and the cursor: a line start in its middle."""
    lines: list[str] = []
    i = 0
    while count_tokens("".join(lines)) < tokens:
        lines.append(f"def scale_{i}(values, factor={i + 2}):\n")
        lines.append(f"    return [v * factor + {i * 3} for v in values]\n\n")
        i += 1
    text = "".join(lines)
    middle = text.index("\n\n", len(text) // 2) + 2
    return text, middle


def keystroke(client: httpx.Client, url: str, body: dict[str, Any]) -> Keystroke:
    started = time.perf_counter()
    first: float | None = None
    final: dict[str, Any] = {}
    with client.stream("POST", f"{url}/infill", json=body) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            data = bench.sse_data(line)
            if not data or data == "[DONE]":
                continue
            event = json.loads(data)
            if first is None and (event.get("content") or event.get("stop")):
                first = time.perf_counter()
            if event.get("stop"):
                final = event
    ended = time.perf_counter()
    timings = final.get("timings", {})
    return Keystroke(
        ttft_ms=((first or ended) - started) * 1000,
        total_ms=(ended - started) * 1000,
        prompt_n=int(timings.get("prompt_n", -1)),
        cache_n=int(timings.get("cache_n", -1)),
        predicted_n=int(timings.get("predicted_n", -1)),
    )


def type_into(url: str, model: str, text: str, cursor: int, args: argparse.Namespace) -> Run:
    run = Run("")
    with httpx.Client(timeout=args.request_timeout, trust_env=False) as client:
        for step in range(args.steps):
            typed = TYPED[: (step + 1) * args.chars]
            body = {
                "model": model,
                "input_prefix": text[:cursor] + typed,
                "input_suffix": text[cursor:],
                "n_predict": args.n_predict,
                "temperature": 0,
                "seed": 1234,
                "stream": True,
                "cache_prompt": True,
            }
            run.keystrokes.append(keystroke(client, url, body))
    return run


def shimmy_argv(model: Path, port: int, args: argparse.Namespace, *, reuse: bool) -> list[str]:
    argv = [sys.executable, "-m", "shimmy", "serve", "--bind", f"127.0.0.1:{port}"]
    argv += ["--model-dirs", str(model), "--no-user-caches", "--no-starter"]
    argv += ["--threads", str(args.threads), "--threads-batch", str(args.threads)]
    argv += ["--ctx-size", str(args.ctx), "--parallel", "1"]
    return argv if reuse else [*argv, "--no-prefix-cache"]


def llama_server_argv(binary: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c",
            str(args.ctx), "-t", str(args.threads), "-np", "1"]  # fmt: skip


def measure(name: str, argv: list[str], model: Path, text: str, cursor: int, args: Any) -> Run:
    port = (
        int(argv[argv.index("--port") + 1])
        if "--port" in argv
        else int(argv[argv.index("--bind") + 1].rsplit(":", 1)[1])
    )
    url = f"http://127.0.0.1:{port}"
    log_path = bench.RESULTS_DIR / "logs" / f"fim-{name.replace(' ', '-')}.log"
    bench.log(f"{name}: {args.steps} keystrokes")
    try:
        with bench.server_process(argv, url, log_path, args.startup_timeout, HERE.parent) as ids:
            served = bench.model_id_for(model, ids) if ids else model.stem
            run = type_into(url, served, text, cursor, args)
    except (RuntimeError, httpx.HTTPError) as exc:
        run = Run(name, error=str(exc))
    run.server = name
    return run


def render(runs: Sequence[Run], facts: dict[str, Any]) -> str:
    lines = [
        f"# Typing into /infill: {facts['steps']} keystrokes, {facts['file_tokens']}-token file",
        "",
        f"model `{facts['model']}`, {facts['chars']} characters per keystroke, "
        f"n_predict {facts['n_predict']}, {facts['threads']} threads",
        "",
        "| server | TTFT p50 | TTFT p95 | first TTFT | decoded/req | reused/req | first decoded |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary()
        if run.error:
            lines.append(f"| {run.server} | failed: {run.error[:80]} | | | | | |")
            continue
        cells = [
            bench.fmt(s["ttft_p50_ms"], 1, " ms"),
            bench.fmt(s["ttft_p95_ms"], 1, " ms"),
            bench.fmt(s["first_ttft_ms"], 1, " ms"),
            bench.fmt(s["decoded_mean"], 1),
            bench.fmt(s["reused_mean"], 1),
            str(s["first_decoded"]),
        ]
        lines.append(f"| {run.server} | {' | '.join(cells)} |")
    if facts.get("llama_server") is None:
        lines += ["", "llama.cpp's server: skipped (no llama-server binary found)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a FIM GGUF (default: the tiny test model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chars", type=int, default=3, help="characters typed per keystroke")
    parser.add_argument("--file-tokens", type=int, default=400)
    parser.add_argument("--n-predict", type=int, default=16)
    parser.add_argument("--threads", type=int, default=bench.physical_cores())
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--llama-server", default=shutil.which("llama-server"))
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--startup-timeout", type=float, default=120)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shimmy-fim-bench-") as tmp:
        model = args.model.resolve() if args.model else tiny_fim_model(Path(tmp))
        count_tokens = bench.load_tokenizer(model)
        text, cursor = source_file(count_tokens, args.file_tokens)
        runs = []
        for name, reuse in (("shimmy", True), ("shimmy --no-prefix-cache", False)):
            runs.append(measure(name, shimmy_argv(model, bench.free_port(), args, reuse=reuse),
                                model, text, cursor, args))  # fmt: skip
        if args.llama_server and os.access(args.llama_server, os.X_OK):
            argv_ = llama_server_argv(args.llama_server, model, bench.free_port(), args)
            runs.append(measure("llama-server", argv_, model, text, cursor, args))
        else:
            args.llama_server = None
            bench.log("llama-server: not found, skipped (pass --llama-server PATH)")
    facts = {
        "model": model.name,
        "steps": args.steps,
        "chars": args.chars,
        "file_tokens": count_tokens(text),
        "n_predict": args.n_predict,
        "threads": args.threads,
        "llama_server": args.llama_server,
        "machine": bench.machine_facts(),
    }
    markdown = render(runs, facts)
    print(markdown)
    bench.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS_DIR / "fim_latest.md").write_text(markdown)
    report = {
        "facts": facts,
        "runs": [r.summary() for r in runs],
        "keystrokes": {r.server: [asdict(k) for k in r.keystrokes] for r in runs},
    }
    (bench.RESULTS_DIR / "fim_latest.json").write_text(json.dumps(report, indent=2))
    return 0 if all(run.error is None for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark's own logic: statistics, SSE parsing, targets, the table, process cleanup.

No model and no server is run here; the benchmark itself is ``make bench``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ is a folder of scripts, not a package on sys.path: load the file itself.
    spec = importlib.util.spec_from_file_location("shimmy_bench", BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def stream(bench: ModuleType, start: float, chunk_times: list[float], tokens: int) -> object:
    return bench.StreamResult(
        t_start=start,
        t_first=chunk_times[0],
        t_end=chunk_times[-1],
        chunk_times=chunk_times,
        text="x" * tokens,
        tokens=tokens,
    )


def test_percentile_interpolates_between_ranks(bench: ModuleType) -> None:
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 95) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_decode_rate_excludes_the_wait_for_the_first_token(bench: ModuleType) -> None:
    # 11 tokens over 2 s from first to last token: 10 intervals -> 5 tok/s.
    assert bench.decode_rate(11, 10.0, 12.0) == pytest.approx(5.0)
    assert bench.decode_rate(1, 10.0, 12.0) is None
    assert bench.decode_rate(5, None, 12.0) is None


def test_sse_lines_and_chunks_of_both_shapes(bench: ModuleType) -> None:
    assert bench.sse_data('data: {"a": 1}') == '{"a": 1}'
    assert bench.sse_data("data:[DONE]") == "[DONE]"
    assert bench.sse_data(": ping") is None
    assert bench.sse_data("") is None
    assert bench.chunk_text({"choices": [{"text": "Hi", "index": 0}]}) == "Hi"
    assert bench.chunk_text({"choices": [{"delta": {"content": "Yo"}}]}) == "Yo"
    assert bench.chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert bench.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert bench.chunk_usage_tokens({"usage": {"completion_tokens": 3}}) == 3
    assert bench.chunk_usage_tokens({"usage": None}) is None


def test_concurrent_streams_are_told_apart_from_serial_ones(bench: ModuleType) -> None:
    together = [
        stream(bench, 0.0, [0.5, 1.0, 1.5, 2.0], 4),
        stream(bench, 0.0, [0.6, 1.1, 1.6, 2.6], 4),
    ]
    stats = bench.summarize_level(together)
    assert (stats.clients, stats.ok, stats.tokens, stats.concurrent) == (2, 2, 8, 2)
    assert stats.wall_s == pytest.approx(2.6)
    assert stats.aggregate_tps == pytest.approx(8 / 2.6)
    assert stats.max_gap_s == pytest.approx(1.0)
    assert stats.ttft_p50_s == pytest.approx(0.55)
    assert stats.chunks == 8
    assert stats.usage_tokens is None  # no answer carried usage
    assert stats.max_gap_per_client_s == pytest.approx([0.5, 1.0])
    assert bench.no_starvation(stats)

    one_after_another = [
        stream(bench, 0.0, [0.5, 1.0], 2),
        stream(bench, 0.0, [1.5, 2.0], 2),
    ]
    stats = bench.summarize_level(one_after_another)
    assert stats.concurrent == 1
    assert stats.all_started_before_last_finished
    assert not bench.no_starvation(stats)


def test_a_failed_client_counts_as_starved(bench: ModuleType) -> None:
    failed = bench.StreamResult(t_start=0.0, t_end=3.0, error="HTTP 503: busy")
    stats = bench.summarize_level([stream(bench, 0.0, [0.5, 1.0], 2), failed])
    assert (stats.clients, stats.ok) == (2, 1)
    assert not stats.all_started_before_last_finished
    assert not bench.no_starvation(stats)
    assert stats.ttft_per_client_s == [0.5, None]


def level(bench: ModuleType, clients: int, tps: float, concurrent: int) -> object:
    return bench.LevelStats(
        clients=clients,
        ok=clients,
        tokens=100,
        wall_s=1.0,
        aggregate_tps=tps,
        ttft_p50_s=0.1,
        ttft_p95_s=0.2,
        max_gap_s=0.05,
        concurrent=concurrent,
        all_started_before_last_finished=True,
    )


def sample_report(bench: ModuleType, *, shimmy_tps: float, aggregate: float) -> object:
    shimmy = bench.ServerReport(
        name=bench.SHIMMY,
        single_tps_all=[shimmy_tps],
        single_tps=shimmy_tps,
        levels=[level(bench, 8, aggregate, 8)],
        chat=bench.ChatStats(reps=1, turn1_ttft_s=1.0, turn2_ttft_s=0.1, turn2_ttft_all_s=[0.1]),
    )
    peer = bench.ServerReport(
        name=bench.PEER,
        single_tps_all=[50.0],
        single_tps=50.0,
        levels=[level(bench, 8, 50.0, 1)],
        chat=bench.ChatStats(reps=1, turn1_ttft_s=1.2, turn2_ttft_s=0.3, turn2_ttft_all_s=[0.3]),
    )
    no_prefix = bench.ChatStats(reps=1, turn1_ttft_s=1.0, turn2_ttft_s=0.5, turn2_ttft_all_s=[0.5])
    no_prefix_server = bench.ServerReport(name=bench.SHIMMY_NO_PREFIX, chat=no_prefix)
    servers = {bench.SHIMMY: shimmy, bench.PEER: peer, bench.SHIMMY_NO_PREFIX: no_prefix_server}
    return bench.Report(
        started="now",
        elapsed_s=1.0,
        machine={"cpu": "test cpu", "physical_cores": 2, "logical_cores": 2, "ram_gib": 4},
        versions={"python": "3"},
        config={"levels": [8], "reps": 1, "tokens": 16, "chat_prompt_tokens": 600},
        direct_tps_all=[60.0],
        direct_tps=60.0,
        direct_error=None,
        servers=servers,
        targets=bench.evaluate_targets(shimmy, peer, 60.0, no_prefix),
    )


def test_targets_pass_and_miss(bench: ModuleType) -> None:
    good = sample_report(bench, shimmy_tps=59.0, aggregate=120.0)
    assert [t.status for t in good.targets] == ["PASS", "PASS", "PASS"]
    bad = sample_report(bench, shimmy_tps=40.0, aggregate=90.0)
    assert [t.status for t in bad.targets] == ["MISS", "MISS", "PASS"]
    assert "0.67x" in bad.targets[0].detail


def test_targets_are_not_applicable_without_numbers(bench: ModuleType) -> None:
    targets = bench.evaluate_targets(None, None, None, None)
    assert [t.status for t in targets] == ["n/a", "n/a", "n/a"]


def test_table_shows_both_servers_ratios_and_verdicts(bench: ModuleType) -> None:
    text = bench.render_markdown(sample_report(bench, shimmy_tps=59.0, aggregate=120.0))
    assert f"| metric | {bench.SHIMMY} | {bench.PEER} | ratio |" in text
    assert "| aggregate tok/s @ 8 clients | 120.0 | 50.0 | 2.40x |" in text
    assert "| median of 1 | 60.0 | 0.98x |" in text
    assert "| 8 | shimmy | 8/8 |" in text
    assert "5.0x slower" in text
    assert text.count("- PASS:") == 3
    assert "test cpu" in text


def test_stream_request_records_text_chunks_and_usage(bench: ModuleType) -> None:
    body = (
        b'data: {"choices":[{"text":"Hel","index":0}]}\n\n'
        b": ping\n\n"
        b'data: {"choices":[{"text":"","index":0}]}\n\n'
        b'data: {"choices":[{"text":"lo","index":0,"finish_reason":"length"}]}\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/busy":
            return httpx.Response(503, json={"error": "busy"})
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def scenario() -> tuple[object, object]:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            ok = await bench.stream_request(client, "/v1/completions", {}, 10.0, len)
            busy = await bench.stream_request(client, "/busy", {}, 10.0, len)
        return ok, busy

    ok, busy = asyncio.run(scenario())
    assert ok.error is None and ok.ok
    assert ok.text == "Hello"
    assert ok.tokens == 5  # the counter given (len) is applied to the whole text
    assert ok.usage_tokens == 2
    assert len(ok.chunk_times) == 2
    assert busy.error is not None and busy.error.startswith("HTTP 503")
    assert not busy.ok


def test_a_server_that_dies_at_start_is_reported_and_reaped(
    bench: ModuleType, tmp_path: Path
) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad flag --nope'); sys.exit(3)"]
    log_path = tmp_path / "logs" / "dead.log"
    with (
        pytest.raises(RuntimeError, match=r"exited with status 3: bad flag --nope"),
        bench.server_process(argv, "http://127.0.0.1:9", log_path, 30.0, tmp_path),
    ):
        pass


def test_stop_process_ends_a_running_child(bench: ModuleType) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        bench.stop_process(child, grace_s=10.0)
        assert child.poll() is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_failures_are_listed_and_their_targets_are_not_applicable(bench: ModuleType) -> None:
    report = sample_report(bench, shimmy_tps=59.0, aggregate=120.0)
    report.servers[bench.PEER] = bench.ServerReport(name=bench.PEER, error="start: exited with 1")
    report.targets = bench.evaluate_targets(
        report.servers[bench.SHIMMY], report.servers[bench.PEER], 60.0, None
    )
    text = bench.render_markdown(report)
    assert f"- {bench.PEER}: start: exited with 1" in text
    assert "| aggregate tok/s @ 8 clients | 120.0 | — | — |" in text
    assert [t.status for t in report.targets] == ["PASS", "n/a", "n/a"]


def test_a_spent_time_budget_skips_steps_and_says_so(bench: ModuleType) -> None:
    generous = bench.TimeBudget(3600.0)
    assert generous.allows("1 concurrent clients")
    assert generous.skipped == []
    spent = bench.TimeBudget(0.0)
    assert not spent.allows("16 concurrent clients")
    assert spent.skipped == ["16 concurrent clients"]

    report = sample_report(bench, shimmy_tps=59.0, aggregate=120.0)
    report.config["time_budget_s"] = 360.0
    report.skipped = spent.skipped
    text = bench.render_markdown(report)
    assert "Skipped (time budget of 360.0 s spent): 16 concurrent clients" in text

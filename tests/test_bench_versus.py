"""bench/versus.py's own logic: parsing llama-server's help and log, the table, the chart.

No model and no server is run here; the comparison itself is ``make bench``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def versus() -> ModuleType:
    # versus.py imports bench.py by name, as it does when run from bench/ as a script.
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module("versus")
    finally:
        sys.path.remove(str(BENCH_DIR))


def report(versus: ModuleType, **servers: object) -> object:
    return versus.VersusReport(
        started="today",
        elapsed_s=1.0,
        machine={},
        versions={},
        config={"levels": [1, 4], "chat_slots": 4, "conversations": 12, "quick": True},
        servers=dict(servers),
    )


def test_ngram_modes_are_read_from_the_help(versus: ModuleType) -> None:
    help_text = (
        "--spec-type none,draft-simple,draft-mtp,ngram-simple,ngram-map-k,ngram-mod\n"
        "  comma-separated list of types"
    )
    assert versus.ngram_modes_from_help(help_text) == ["ngram-simple", "ngram-map-k", "ngram-mod"]
    assert versus.ngram_modes_from_help("no such option") == []


def test_slot_context_is_read_from_the_log(versus: ModuleType) -> None:
    line = "srv load_model: initializing, n_slots = 8, n_ctx_slot = 4096, kv_unified = 'false'"
    assert versus.n_ctx_slot_from_log(line) == 4096
    assert versus.n_ctx_slot_from_log("") is None


def test_the_best_ngram_mode_is_the_fastest_copy(versus: ModuleType) -> None:
    def spec(mode: str, tps: float) -> object:
        return versus.ServerResults(
            name=versus.SPEC_PREFIX + mode, single=versus.SingleClient(repeat_tps=tps)
        )

    servers = {s.name: s for s in (spec("ngram-simple", 40.0), spec("ngram-mod", 55.0))}
    servers["llama-server"] = versus.ServerResults(
        name="llama-server", single=versus.SingleClient(repeat_tps=90.0)
    )
    best = versus.best_spec_mode(servers)
    assert best.name.endswith("ngram-mod")
    assert versus.spec_flags(best) == "--spec-type ngram-mod"


def test_a_scenario_server_stands_in_for_its_main_server(versus: ModuleType) -> None:
    def chat(t1: float, t2: float) -> object:
        return versus.Conversations(12, 4, 600, t1, t2, t1 / t2, [t1], [t2])

    servers = {
        "shimmy": versus.ServerResults(name="shimmy"),
        "shimmy (4 slots)": versus.ServerResults(
            name="shimmy (4 slots)", conversations=chat(1, 0.1)
        ),
        "llama-cpp-python server": versus.ServerResults(
            name="llama-cpp-python server", conversations=chat(1, 2)
        ),
    }
    values = versus.per_server(
        report(versus, **servers),
        lambda s: s.conversations and s.conversations.speedup,
        "(4 slots)",
    )
    assert values == {"shimmy": 10.0, "llama-server": None, "llama-cpp-python server": 0.5}


def test_the_table_has_every_scenario_even_without_numbers(versus: ModuleType) -> None:
    empty = report(versus, shimmy=versus.ServerResults(name="shimmy", errors=["start: boom"]))
    markdown = versus.render_markdown(empty)
    for scenario in ("a.", "b.", "c.", "d.", "e.", "f.", "g."):
        assert f"| {scenario} " in markdown
    assert "shimmy / llama-server" in markdown
    assert "- shimmy: start: boom" in markdown
    assert "n/a: shimmy / shimmy --no-speculative" in markdown


def test_the_chart_is_drawn_without_numbers(versus: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    versus.draw_chart(report(versus), path)
    assert path.read_bytes()[:4] == b"\x89PNG"

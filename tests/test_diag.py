"""``shimmy.diag``: the facts behind ``shimmy diag`` (and a future /api/system)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import isolated_settings
from rich.console import Console

from shimmy import __version__
from shimmy.diag import (
    collect_diagnostics,
    cpu_facts,
    diagnostics_tables,
    format_size,
    searched_folders,
)


def test_collect_diagnostics_reports_every_section(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, threads=3, threads_batch=5)
    facts = collect_diagnostics(settings)
    json.dumps(facts)  # the /api/system endpoint will serve it as is
    assert facts["versions"]["shimmy"] == __version__
    assert facts["versions"]["llama_cpp_python"]
    llama = facts["llama_cpp"]
    assert "CPU" in llama["system_info"] or llama["gpu_offload"]
    assert all(isinstance(llama[key], bool) for key in ("gpu_offload", "mmap", "mlock"))
    cpu = facts["cpu"]
    assert (cpu["threads"], cpu["threads_batch"]) == (3, 5)
    assert cpu["logical_cores"] >= 1
    assert facts["memory"]["total_bytes"] > 0
    models = facts["models"]
    assert (models["count"], models["ids"], models["default"]) == (1, ["tiny"], "tiny")
    assert models["unusable"] == {}


def test_folders_report_whether_they_exist(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path)
    folders = collect_diagnostics(settings)["models"]["folders"]
    assert folders == [
        {"source": "model_paths", "path": str(tiny_model_dir), "exists": True},
        {"source": "models_dir", "path": str(tmp_path / "own-models"), "exists": False},
    ]


def test_unusable_models_and_bad_defaults_are_reported_not_raised(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.gguf").write_bytes(b"not a gguf")
    facts = collect_diagnostics(isolated_settings(folder, tmp_path))["models"]
    assert facts["ids"] == ["broken"]
    assert facts["unusable"]["broken"]
    facts = collect_diagnostics(isolated_settings(folder, tmp_path, default_model="nope"))
    assert "nope" in facts["models"]["error"]


def test_user_caches_are_searched_only_when_enabled(tmp_path: Path) -> None:
    base = isolated_settings(tmp_path, tmp_path)
    assert [source for source, _ in searched_folders(base)] == ["model_paths", "models_dir"]
    wide = base.model_copy(update={"scan_user_caches": True})
    sources = [source for source, _ in searched_folders(wide)]
    assert {"huggingface", "ollama", "lmstudio"} <= set(sources)


@pytest.mark.parametrize(
    ("cpuinfo", "model", "features"),
    [
        (
            "processor\t: 0\nmodel name\t: Test CPU 9000\n"
            "flags\t\t: fpu sse3 avx avx2 fma f16c avx512f avx512bw\n",
            "Test CPU 9000",
            ["sse3", "avx", "avx2", "avx512f", "avx512bw", "fma", "f16c"],
        ),
        (
            "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\nCPU part\t: 0xd40\n",
            None,
            ["asimd", "asimddp", "i8mm", "sve"],
        ),
    ],
)
def test_cpu_features_from_cpuinfo(
    tmp_path: Path, cpuinfo: str, model: str | None, features: list[str]
) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    facts = cpu_facts(path)
    assert facts["features"] == features
    if model is not None:
        assert facts["model"] == model


def test_missing_cpuinfo_is_not_an_error(tmp_path: Path) -> None:
    facts = cpu_facts(tmp_path / "absent")
    assert facts["features"] == []
    assert facts["logical_cores"] >= 1


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "?"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"),
     (3 << 40, "3072.0 GiB")],
)  # fmt: skip
def test_format_size(size: int | None, text: str) -> None:
    assert format_size(size) == text


def test_tables_render_every_fact(tiny_model_dir: Path, tmp_path: Path) -> None:
    facts = collect_diagnostics(isolated_settings(tiny_model_dir, tmp_path))
    console = Console(record=True, width=200)
    for table in diagnostics_tables(facts):
        console.print(table)
    text = console.export_text()
    for needle in ("shimmy", __version__, "GPU offload", "features", "tiny", str(tiny_model_dir)):
        assert needle in text

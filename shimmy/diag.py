"""System, build and model-discovery facts, for ``shimmy diag`` and the API.

Everything here is cheap and read-only: nothing loads a model. Facts that a platform cannot
provide (no /proc/cpuinfo on macOS, no physical core count in a container) come back as None
rather than failing the whole report.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.table import Table
from rich.text import Text

from shimmy import __version__
from shimmy.errors import ShimmyError
from shimmy.settings import Settings

# The CPU features llama.cpp's kernels care about (x86 flags, then Arm "Features" names).
CPU_FEATURES = (
    "sse3",
    "ssse3",
    "avx",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "fma",
    "f16c",
    "bmi2",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
)

CPUINFO = Path("/proc/cpuinfo")


def format_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def searched_folders(settings: Settings) -> list[tuple[str, Path]]:
    """(source, folder) pairs discovery looks in, in its order (the starter model aside)."""
    from shimmy.models.discovery import user_cache_folders

    folders = [("model_paths", path.expanduser().absolute()) for path in settings.model_paths]
    folders.append(("models_dir", settings.models_dir.expanduser().absolute()))
    if settings.scan_user_caches:
        folders += user_cache_folders()
    return folders


def cpu_facts(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    model: str | None = platform.processor() or None
    flags: set[str] = set()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return {
        "model": model,
        "architecture": platform.machine(),
        "features": [name for name in CPU_FEATURES if name in flags],
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
    }


def llama_facts() -> dict[str, Any]:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {
        "system_info": (info.decode(errors="replace") if isinstance(info, bytes) else str(info))
        .strip()
        .rstrip("|")
        .strip(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "mlock": bool(llama_cpp.llama_supports_mlock()),
        "max_devices": int(llama_cpp.llama_max_devices()),
    }


def folder_facts(settings: Settings) -> list[dict[str, Any]]:
    return [
        {"source": source, "path": str(path), "exists": path.exists()}
        for source, path in searched_folders(settings)
    ]


def model_facts(settings: Settings) -> dict[str, Any]:
    from shimmy.registry import ModelRegistry

    facts: dict[str, Any] = {
        "folders": folder_facts(settings),
        "count": 0,
        "ids": [],
        "default": None,
    }
    registry = ModelRegistry(settings)
    try:
        entries = registry.discover()
    except ShimmyError as err:  # e.g. a default model that does not exist: report, don't fail
        facts["error"] = err.details or err.message
        return facts
    facts["count"] = len(entries)
    facts["ids"] = [entry.id for entry in entries]
    facts["unusable"] = {entry.id: entry.error for entry in entries if not entry.usable}
    facts["default"] = registry.default_id
    return facts


def collect_diagnostics(settings: Settings, *, discover: bool = True) -> dict[str, Any]:
    """Everything ``shimmy diag`` shows. ``discover=False`` skips reading every model's header
    (a running server already knows its models) and reports only the folders searched."""
    from shimmy.engine.local import default_threads

    memory = psutil.virtual_memory()
    threads = settings.threads or default_threads()
    return {
        "versions": {
            "shimmy": __version__,
            "python": platform.python_version(),
            "llama_cpp_python": package_version("llama_cpp_python"),
            "platform": platform.platform(),
            "executable": sys.executable,
        },
        "llama_cpp": llama_facts(),
        "cpu": {
            **cpu_facts(),
            "threads": threads,
            "threads_batch": settings.threads_batch or os.cpu_count() or threads,
        },
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available},
        "models": model_facts(settings) if discover else {"folders": folder_facts(settings)},
    }


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _section(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in rows:
        table.add_row(name, Text(value))  # paths and versions are data, never rich markup
    return table


def diagnostics_tables(facts: dict[str, Any]) -> list[Table]:
    """``collect_diagnostics``'s facts as readable sections, for the terminal."""
    versions, llama, cpu, memory, models = (
        facts["versions"],
        facts["llama_cpp"],
        facts["cpu"],
        facts["memory"],
        facts["models"],
    )
    model_rows = [
        (f["source"], f"{f['path']} ({'exists' if f['exists'] else 'missing'})")
        for f in models["folders"]
    ]
    if "error" in models:
        model_rows.append(("error", models["error"]))
    found = ", ".join(models["ids"]) or "none"
    model_rows += [
        ("found", f"{models['count']}: {found}"),
        ("default", models["default"] or "none"),
    ]
    return [
        _section(
            "Versions",
            [
                ("shimmy", versions["shimmy"]),
                ("python", versions["python"]),
                ("llama-cpp-python", versions["llama_cpp_python"] or "not installed"),
                ("platform", versions["platform"]),
            ],
        ),
        _section(
            "llama.cpp",
            [
                ("system info", llama["system_info"]),
                ("GPU offload", _yes_no(llama["gpu_offload"])),
                ("mmap", _yes_no(llama["mmap"])),
                ("mlock", _yes_no(llama["mlock"])),
            ],
        ),
        _section(
            "CPU",
            [
                ("model", cpu["model"] or "?"),
                ("features", " ".join(cpu["features"]) or "none detected"),
                (
                    "cores",
                    f"{cpu['logical_cores']} logical, {cpu['physical_cores'] or '?'} physical",
                ),
                ("threads", f"{cpu['threads']} decode, {cpu['threads_batch']} prompt"),
            ],
        ),
        _section(
            "Memory",
            [
                ("total", format_size(memory["total_bytes"])),
                ("available", format_size(memory["available_bytes"])),
            ],
        ),
        _section("Models", model_rows),
    ]

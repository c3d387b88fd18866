"""Running the ``shimmy`` command line as a real subprocess (``python -m shimmy``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CliRunner = Callable[..., subprocess.CompletedProcess[bytes]]


def cli_env(model_paths: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """An environment that sees only ``model_paths``; no SHIMMY_* of the caller leaks in."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHIMMY_")}
    env.update(
        {
            "SHIMMY_MODEL_PATHS": str(model_paths),
            "SHIMMY_MODELS_DIR": str(tmp / "own-models"),
            "SHIMMY_CACHE_DIR": str(tmp / "cache"),
            "SHIMMY_SCAN_USER_CACHES": "false",
            "SHIMMY_STARTER_MODEL": "false",
            "SHIMMY_CTX_SIZE": "512",
            "SHIMMY_PARALLEL": "1",
            "SHIMMY_THREADS": "2",
            "PYTHONIOENCODING": "utf-8",
        }
    )
    env.update(extra)
    return env


def run_shimmy(
    args: Sequence[str], env: dict[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "shimmy", *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=90,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert result.stdout == b""
    return lines[0]


def stdout_json(result: subprocess.CompletedProcess[bytes]) -> dict:
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data

"""`shimmy pull`, `rm`, `ps` and the loaded column of `list`, as subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from cli_helpers import cli_env, run_shimmy
from conftest import isolated_settings, run_server
from test_pull import MirrorServer
from tiny_gguf import write_tiny_gguf


def test_pull_then_generate_then_rm(
    tiny_model_dir: Path, tmp_path: Path, mirror: MirrorServer
) -> None:
    data = write_tiny_gguf(tmp_path / "src.gguf", seed=9).read_bytes()
    mirror.state.files["/m/cli-pulled.gguf"] = data
    env = cli_env(tiny_model_dir, tmp_path)
    pulled = run_shimmy(["pull", "--allow-private-pull", f"{mirror.url}/m/cli-pulled.gguf"], env)
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert pulled.stdout.decode().strip() == "cli-pulled"
    assert (tmp_path / "own-models" / "cli-pulled.gguf").read_bytes() == data

    listed = run_shimmy(["list"], env)
    assert "cli-pulled" in listed.stdout.decode()
    generated = run_shimmy(["generate", "--model", "cli-pulled", "--prompt", "x"], env)
    assert generated.returncode == 0, generated.stderr.decode()

    removed = run_shimmy(["rm", "cli-pulled"], env)
    assert removed.returncode == 0, removed.stderr.decode()
    assert not (tmp_path / "own-models" / "cli-pulled.gguf").exists()


def test_pull_of_a_missing_file_fails_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, mirror: MirrorServer
) -> None:
    env = cli_env(tiny_model_dir, tmp_path, SHIMMY_ALLOW_PRIVATE_PULL="true")
    result = run_shimmy(["pull", f"{mirror.url}/nothing.gguf"], env)
    assert result.returncode != 0
    assert result.stderr.decode().strip().splitlines()[-1].startswith("error: ")
    assert result.stdout == b""


def test_rm_refuses_models_outside_its_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_shimmy(["rm", "tiny"], cli_env(tiny_model_dir, tmp_path))
    assert result.returncode != 0
    assert "not in shimmy's models folder" in result.stderr.decode()
    assert (tiny_model_dir / "tiny.gguf").exists()


def test_ps_and_list_show_what_a_running_server_has_loaded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path)
    with run_server(settings) as url:
        port = url.rsplit(":", 1)[1]
        env = cli_env(tiny_model_dir, tmp_path, SHIMMY_PORT=port)
        before = run_shimmy(["ps", "--json"], env)
        assert before.returncode == 0, before.stderr.decode()
        assert httpx.post(f"{url}/api/models/tiny/load", timeout=30).status_code == 200
        after = run_shimmy(["ps"], env)
        assert "tiny" in after.stdout.decode()
        listed = run_shimmy(["list", "--json"], env)
        [model] = json.loads(listed.stdout)["models"]
        assert model["loaded"] is True
    gone = run_shimmy(["ps"], env)
    assert gone.returncode != 0
    assert "no shimmy server answers" in gone.stderr.decode()

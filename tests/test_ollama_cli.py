"""``shimmy serve --ollama``: Ollama's API on a port of its own, next to the main one, from the
real command line (a subprocess stopped with Ctrl-C)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import ollama
import pytest
from cli_helpers import cli_env, run_shimmy
from test_cli import serve_until_ctrl_c

MAIN = r"http://127\.0\.0\.1:\d+"


def test_serve_with_ollama_s_own_port(tiny_model_dir: Path, tmp_path: Path) -> None:
    found: dict[str, str] = {}

    def read_banner(banner: str) -> None:
        match = re.search(r"Ollama API: +(http://127\.0\.0\.1:\d+)  \(and (\S+/ollama)\)", banner)
        assert match is not None, banner
        found.update(own=match[1], prefixed=match[2])

    def use(client: httpx.Client) -> None:
        for host in (found["own"], found["prefixed"]):
            models = ollama.Client(host=host, timeout=30).list().models
            assert [model.model for model in models] == ["tiny:latest"]
        assert httpx.get(found["own"]).text == "Ollama is running"
        # Ollama's port also answers the OpenAI-compatible API, as Ollama's does.
        assert httpx.get(f"{found['own']}/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/api/health").status_code == 200

    env = cli_env(tiny_model_dir, tmp_path)
    args = ["--port", "0", "--ollama", "127.0.0.1:0"]
    text = serve_until_ctrl_c(args, env, MAIN, use, on_banner=read_banner)
    assert re.search(r"RKLLama API: +http://\S+/rkllama\n", text)


def test_without_the_flag_the_banner_points_to_the_prefix(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def use(client: httpx.Client) -> None:
        assert client.get("/ollama/api/tags").json()["models"][0]["name"] == "tiny:latest"

    text = serve_until_ctrl_c(["--port", "0"], cli_env(tiny_model_dir, tmp_path), MAIN, use)
    pointer = r"Ollama API: +http://\S+/ollama  \(on Ollama's own port with --ollama\)"
    assert re.search(pointer, text)


@pytest.mark.parametrize(
    ("ollama_flag", "error"),
    [
        ("127.0.0.1:70000", "error: cannot parse --ollama '127.0.0.1:70000': bad port '70000'"),
        ("no-such-host.invalid:1", "error: cannot listen on no-such-host.invalid:1"),
    ],
)
def test_a_bad_ollama_address_is_one_error_line(
    tiny_model_dir: Path, tmp_path: Path, ollama_flag: str, error: str
) -> None:
    env = cli_env(tiny_model_dir, tmp_path, SHIMMY_LOG_LEVEL="warning")
    done = run_shimmy(["serve", "--port", "0", "--ollama", ollama_flag], env)
    assert done.returncode != 0
    [line] = done.stderr.decode().splitlines()
    assert line.startswith(error)

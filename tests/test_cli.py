"""The ``shimmy`` command line, run as a real subprocess (``python -m shimmy``)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cli_helpers import CliRunner, assert_one_error_line, cli_env, run_shimmy, stdout_json

from shimmy import __version__
from shimmy.api.security import is_loopback_host as is_loopback
from shimmy.cli import parse_bind
from shimmy.errors import InvalidRequest

# --- global options ---------------------------------------------------------------------------


def test_version_names_shimmy_and_llama_cpp_python(shimmy_cli: CliRunner) -> None:
    for flag in ("--version", "-V"):
        result = shimmy_cli(flag)
        assert result.returncode == 0
        out = result.stdout.decode()
        assert f"shimmy {__version__}" in out
        assert re.search(r"llama-cpp-python \d+\.\d+", out)


def test_help_lists_every_command(shimmy_cli: CliRunner) -> None:
    for args in (["-h"], ["--help"], []):
        result = shimmy_cli(*args)
        assert result.returncode == 0
        out = result.stdout.decode()
        for command in ("serve", "generate", "list", "probe", "diag"):
            assert command in out


def test_command_help_shows_shared_settings_flags(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("generate", "-h", COLUMNS="200")
    assert result.returncode == 0
    out = result.stdout.decode()
    for flag in ("--max-tokens", "--model-dirs", "--ctx-size", "--api-key", "--no-prefix-cache"):
        assert flag in out


def test_unknown_option_is_one_error_line(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("generate", "--no-such-flag")
    assert "--no-such-flag" in assert_one_error_line(result)
    assert result.returncode == 2


def test_invalid_environment_setting_is_one_error_line(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("list", SHIMMY_CTX_SIZE="lots")
    assert "ctx_size" in assert_one_error_line(result)
    assert result.returncode == 2


# --- list -------------------------------------------------------------------------------------


def test_list_table_shows_the_tiny_model(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("list", COLUMNS="200")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "tiny" in out
    assert "usable" in out
    assert "llama" in out  # architecture column


def test_list_json_matches_the_api_shape(shimmy_cli: CliRunner) -> None:
    data = stdout_json(shimmy_cli("list", "--json"))
    assert data["default"] == "tiny"
    assert [model["id"] for model in data["models"]] == ["tiny"]
    model = data["models"][0]
    assert model["usable"] is True
    assert model["architecture"] == "llama"
    assert model["size_bytes"] > 0


def test_list_shows_ids_verbatim_not_as_markup(tiny_model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "tiny[red].gguf").write_bytes(tiny_model_path.read_bytes())
    result = run_shimmy(["list"], cli_env(folder, tmp_path))
    assert result.returncode == 0, result.stderr.decode()
    assert "tiny[red]" in result.stdout.decode()


def test_flags_override_environment(
    shimmy_cli: CliRunner, tiny_model_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stdout_json(shimmy_cli("list", "--json", SHIMMY_MODEL_PATHS=str(empty)))["models"] == []
    data = stdout_json(
        shimmy_cli(
            "list", "--json", "--model-dirs", str(tiny_model_dir), SHIMMY_MODEL_PATHS=str(empty)
        )
    )
    assert [model["id"] for model in data["models"]] == ["tiny"]


def test_verbose_logs_go_to_stderr_as_json_lines(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("list", "--json", "-v", "--log-format", "json")
    assert stdout_json(result)["default"] == "tiny"
    lines = result.stderr.decode().splitlines()
    assert lines, "debug logging wrote nothing"
    records = [json.loads(line) for line in lines]
    assert all({"level", "logger", "message"} <= record.keys() for record in records)


# --- diag -------------------------------------------------------------------------------------


def test_diag_prints_readable_sections(shimmy_cli: CliRunner, tiny_model_dir: Path) -> None:
    result = shimmy_cli("diag", COLUMNS="200")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    for heading in ("Versions", "llama.cpp", "CPU", "Memory", "Models"):
        assert heading in out
    assert "tiny" in out
    assert str(tiny_model_dir) in out


def test_diag_json_has_every_section(shimmy_cli: CliRunner, tiny_model_dir: Path) -> None:
    data = stdout_json(shimmy_cli("diag", "--json"))
    assert {"versions", "llama_cpp", "cpu", "memory", "models"} <= data.keys()
    assert data["versions"]["shimmy"] == __version__
    assert isinstance(data["llama_cpp"]["gpu_offload"], bool)
    assert data["llama_cpp"]["system_info"]
    assert data["cpu"]["threads"] == 2  # SHIMMY_THREADS reached the settings
    assert data["memory"]["total_bytes"] >= data["memory"]["available_bytes"] > 0
    models = data["models"]
    assert models["ids"] == ["tiny"] and models["count"] == 1 and models["default"] == "tiny"
    folder = {"source": "model_paths", "path": str(tiny_model_dir), "exists": True}
    assert folder in models["folders"]


# --- generate ---------------------------------------------------------------------------------


def test_generate_streams_text_to_stdout(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("generate", "--prompt", "Hello", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8")  # non-empty and valid UTF-8
    assert not result.stdout.startswith(b"{")


def test_generate_reads_the_prompt_from_stdin(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("generate", "--max-tokens", "8", "--json", stdin=b"Once upon a time\n")
    data = stdout_json(result)
    assert data["usage"]["prompt_tokens"] > 1
    assert data["usage"]["completion_tokens"] >= 1


def test_generate_json_has_the_api_generate_shape(shimmy_cli: CliRunner) -> None:
    data = stdout_json(shimmy_cli("generate", "-p", "Hello", "--json", "-v"))
    assert data["model"] == "tiny"
    assert data["id"].startswith("gen-")
    choice = data["choices"][0]
    assert isinstance(choice["text"], str) and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_generate_max_tokens_bounds_the_completion(shimmy_cli: CliRunner) -> None:
    data = stdout_json(shimmy_cli("generate", "-p", "Hello", "--max-tokens", "5", "--json"))
    assert 1 <= data["usage"]["completion_tokens"] <= 5


def test_generate_same_seed_same_text(shimmy_cli: CliRunner) -> None:
    args = ("generate", "-p", "Hello", "--max-tokens", "16", "--temperature", "1.0", "--json")
    first = stdout_json(shimmy_cli(*args, "--seed", "7"))["choices"][0]["text"]
    again = stdout_json(shimmy_cli(*args, "--seed", "7"))["choices"][0]["text"]
    assert first == again


def test_generate_chat_wraps_the_prompt_in_the_template(shimmy_cli: CliRunner) -> None:
    args = ("generate", "-p", "Hello", "--max-tokens", "1", "--json")
    raw = stdout_json(shimmy_cli(*args))["usage"]["prompt_tokens"]
    chat = stdout_json(shimmy_cli(*args, "--chat"))["usage"]["prompt_tokens"]
    assert chat > raw


def test_generate_unknown_model_is_one_error_line(shimmy_cli: CliRunner) -> None:
    result = shimmy_cli("generate", "--model", "no-such-model", "-p", "Hello")
    assert "no-such-model" in assert_one_error_line(result)


@pytest.mark.parametrize("args", [["--prompt", "  "], []])
def test_generate_empty_prompt_exits_2(shimmy_cli: CliRunner, args: list[str]) -> None:
    result = shimmy_cli("generate", *args, stdin=b"\n")
    assert_one_error_line(result)
    assert result.returncode == 2


# --- probe ------------------------------------------------------------------------------------


def test_probe_reports_speeds_and_metadata(shimmy_cli: CliRunner, tiny_model_path: Path) -> None:
    result = shimmy_cli("probe", "tiny", COLUMNS="200")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.count("tokens/s") == 2  # prompt and generation
    for fact in ("tiny", "llama", str(tiny_model_path), "load time"):
        assert fact in out


def test_probe_json_counts_tokens(shimmy_cli: CliRunner) -> None:
    data = stdout_json(shimmy_cli("probe", "--json"))  # the default model
    assert data["model"]["id"] == "tiny"
    assert data["prompt_tokens"] > 1
    assert 1 <= data["completion_tokens"] <= 16
    assert data["load_seconds"] > 0


def test_probe_broken_file_fails(tmp_path: Path) -> None:
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken = broken_dir / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    env = cli_env(broken_dir, tmp_path)
    for target in ("broken", str(broken)):
        result = run_shimmy(["probe", target], env)
        assert result.returncode != 0
        assert result.stdout == b""
        # discovery may warn about the file first; the failure itself is one final line
        lines = result.stderr.decode().splitlines()
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
        assert "broken" in lines[-1]


def test_probe_unknown_model_fails(shimmy_cli: CliRunner) -> None:
    assert_one_error_line(shimmy_cli("probe", "no-such-model"))


# --- serve ------------------------------------------------------------------------------------


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def serve_until_ctrl_c(
    args: list[str],
    env: dict[str, str],
    url_pattern: str,
    use: Callable[[httpx.Client], None],
    on_banner: Callable[[str], None] | None = None,
) -> str:
    """Run ``shimmy serve ARGS``, call ``use`` with a client once it listens (``on_banner``
    first, with the banner), stop it with Ctrl-C; return everything it printed on stderr (it
    must print nothing on stdout)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "shimmy", "serve", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The banner is printed once the socket listens: connections are queued from then on,
        # so reading up to it is the synchronization (port 0: the banner names the real port).
        assert server.stderr is not None
        banner: list[str] = []
        url = None
        while url is None or not banner[-1].startswith("  try:"):
            line = server.stderr.readline().decode()
            assert line, f"serve exited before listening: {''.join(banner)}"
            banner.append(line)
            found = re.search(f"listening on ({url_pattern})", line)
            url = found.group(1) if found else url
        if on_banner is not None:
            on_banner("".join(banner))
        with httpx.Client(base_url=url, timeout=30) as client:
            use(client)
        server.send_signal(signal.SIGINT)
        # Read through the pipe objects: readline() above may hold buffered lines that
        # communicate(), which reads the raw descriptors, would skip.
        err = server.stderr.read()
        out = server.stdout.read() if server.stdout is not None else b""
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = "".join(banner) + err.decode()
    assert server.returncode == 0, text
    assert out == b""
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(
    ("bind", "url_pattern"),
    [
        ("127.0.0.1:0", r"http://127\.0\.0\.1:\d+"),
        pytest.param(
            "[::1]:0",
            r"http://\[::1\]:\d+",
            marks=pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback"),
        ),
    ],
)
def test_serve_answers_http_and_stops_on_ctrl_c(
    tiny_model_dir: Path, tmp_path: Path, bind: str, url_pattern: str
) -> None:
    def use(client: httpx.Client) -> None:
        assert client.get("/api/health").json()["status"] == "healthy"
        models = client.get("/api/models").json()
        assert [model["id"] for model in models["models"]] == ["tiny"]
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    text = serve_until_ctrl_c(["--bind", bind], cli_env(tiny_model_dir, tmp_path), url_pattern, use)
    assert "models found:  1, default: tiny" in text, text
    assert re.search(r"chat page: +http://\S+/\n", text)
    assert re.search(r"OpenAI API: +http://\S+/v1\n", text)
    assert "try:           curl http://" in text
    assert "not a loopback address" not in text


def test_serve_without_the_web_page_and_with_a_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    def use(client: httpx.Client) -> None:
        assert client.get("/").status_code == 404
        assert client.get("/ui/app.js").status_code == 404
        assert client.get("/api/health").status_code == 200

    env = cli_env(tiny_model_dir, tmp_path, SHIMMY_API_KEY="k-123")
    text = serve_until_ctrl_c(["--no-web-ui", "--port", "0"], env, r"http://127\.0\.0\.1:\d+", use)
    assert "chat page" not in text
    assert 'curl -H "Authorization: Bearer $KEY" http://' in text


def test_serve_refuses_a_port_in_use(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = cli_env(tiny_model_dir, tmp_path, SHIMMY_LOG_LEVEL="warning")
        result = run_shimmy(["serve", "--bind", "127.0.0.1:1", "--port", str(port)], env)
    assert f"127.0.0.1:{port}" in assert_one_error_line(result)


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0", ("0.0.0.0", None)),
        (":9000", (None, 9000)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]", ("::", None)),
        ("::1", ("::1", None)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_bind(bind: str, expected: tuple[str | None, int | None]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["[::1", "host:port", "127.0.0.1:70000", "[::1]x"])
def test_parse_bind_rejects_garbage(bind: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_bind(bind)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")


# --- the starter model ------------------------------------------------------------------------


@pytest.mark.starter
def test_generate_pipes_real_text(starter_model_path: Path, tmp_path: Path) -> None:
    env = cli_env(starter_model_path, tmp_path, SHIMMY_CTX_SIZE="2048")
    result = run_shimmy(["generate", "--max-tokens", "8"], env, stdin=b"hi")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8").strip()

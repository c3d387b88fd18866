"""``shimmy generate``'s prompt sources, chat template choice, stop strings and completion.

Prompt token counts tell exactly what reached the model: the expected prompt is tokenized
with the same vocabulary (real llama.cpp) and compared with what the CLI reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import CliRunner, assert_one_error_line, cli_env, run_shimmy, stdout_json
from tiny_gguf import write_tiny_gguf

from shimmy.engine.llama import LlamaModel

# A template whose output is easy to predict: "[role]content" per message, then "[assistant]".
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def templated_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("templated")
    write_tiny_gguf(folder / "templated.gguf", chat_template=TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def count_tokens(templated_model_dir: Path) -> Iterator[Callable[[str], int]]:
    model = LlamaModel(templated_model_dir / "templated.gguf", n_gpu_layers=0)
    yield lambda text: len(model.tokenize(text))
    model.close()


@pytest.fixture
def templated_cli(templated_model_dir: Path, tmp_path: Path) -> CliRunner:
    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_shimmy(args, cli_env(templated_model_dir, tmp_path), stdin)

    return run


def prompt_tokens(result: subprocess.CompletedProcess[bytes]) -> int:
    return stdout_json(result)["usage"]["prompt_tokens"]


ONE_TOKEN = ("--max-tokens", "1", "--json")


def test_a_model_with_its_own_template_gets_the_prompt_as_a_user_message(
    templated_cli: CliRunner, count_tokens: Callable[[str], int]
) -> None:
    result = templated_cli("generate", "Hello", *ONE_TOKEN)
    assert prompt_tokens(result) == count_tokens("[user]Hello[assistant]")


def test_raw_sends_the_prompt_unchanged(
    templated_cli: CliRunner, count_tokens: Callable[[str], int]
) -> None:
    result = templated_cli("generate", "Hello", "--raw", *ONE_TOKEN)
    assert prompt_tokens(result) == count_tokens("Hello")


def test_system_goes_first_in_the_template(
    templated_cli: CliRunner, count_tokens: Callable[[str], int]
) -> None:
    result = templated_cli("generate", "Hello", "--system", "Be brief", *ONE_TOKEN)
    assert prompt_tokens(result) == count_tokens("[system]Be brief[user]Hello[assistant]")


def test_raw_system_is_put_before_the_prompt_like_the_api(
    templated_cli: CliRunner, count_tokens: Callable[[str], int]
) -> None:
    result = templated_cli("generate", "Hello", "--raw", "-s", "Be brief", *ONE_TOKEN)
    assert prompt_tokens(result) == count_tokens("Be brief\n\nHello")


def test_a_model_without_a_template_gets_the_raw_prompt(
    shimmy_cli: CliRunner, count_tokens: Callable[[str], int]
) -> None:
    # the tiny model has the same vocabulary, but no template: nothing is wrapped around
    assert prompt_tokens(shimmy_cli("generate", "Hello", *ONE_TOKEN)) == count_tokens("Hello")


def test_raw_and_chat_together_is_bad_input(templated_cli: CliRunner) -> None:
    result = templated_cli("generate", "Hello", "--raw", "--chat")
    assert "--raw" in assert_one_error_line(result)
    assert result.returncode == 2


def test_prompt_from_a_file_equals_the_same_prompt_inline(
    shimmy_cli: CliRunner, tmp_path: Path
) -> None:
    text = "Once upon a time, ünïcode and all"
    (tmp_path / "prompt.txt").write_text(text + "\n", encoding="utf-8")
    args = ("--max-tokens", "12", "--temperature", "0.8", "--seed", "3", "--json")
    from_file = stdout_json(shimmy_cli("generate", "--file", str(tmp_path / "prompt.txt"), *args))
    inline = stdout_json(shimmy_cli("generate", "--prompt", text, *args))
    from_stdin = stdout_json(shimmy_cli("generate", "-f", "-", *args, stdin=text.encode()))
    assert from_file["usage"] == inline["usage"] == from_stdin["usage"]
    assert from_file["choices"][0]["text"] == inline["choices"][0]["text"]


def test_a_missing_file_is_one_error_line(shimmy_cli: CliRunner, tmp_path: Path) -> None:
    result = shimmy_cli("generate", "--file", str(tmp_path / "absent.txt"))
    assert "absent.txt" in assert_one_error_line(result)
    assert result.returncode == 2


@pytest.mark.parametrize(
    "args", [["Hi", "--prompt", "Hi"], ["--prompt", "Hi", "--file", "x"], ["Hi", "-f", "-"]]
)
def test_the_prompt_given_twice_is_bad_input(shimmy_cli: CliRunner, args: list[str]) -> None:
    result = shimmy_cli("generate", *args)
    assert "once" in assert_one_error_line(result)
    assert result.returncode == 2


def test_stop_ends_the_text_before_the_stop_string(shimmy_cli: CliRunner) -> None:
    args = ("generate", "Hello", "--max-tokens", "60", "--temperature", "0", "--json")
    full = stdout_json(shimmy_cli(*args))["choices"][0]["text"]
    # a stop string from the middle of the greedy text, first seen at its own position
    start = next(i for i in range(8, len(full) - 3) if full.index(full[i : i + 3]) == i)
    stop = full[start : start + 3]
    stopped = stdout_json(shimmy_cli(*args, "--stop", stop))["choices"][0]
    assert stopped["text"] == full[:start]
    assert stopped["finish_reason"] == "stop"


def test_model_config_sampling_defaults_apply_unless_a_flag_is_given(
    shimmy_cli: CliRunner, tmp_path: Path
) -> None:
    config = tmp_path / "shimmy.toml"
    config.write_text("[models.tiny.sampling]\nmax_tokens = 3\ntemperature = 0.0\n")
    by_config = stdout_json(shimmy_cli("generate", "Hello", "--json", "--config", str(config)))
    assert by_config["usage"]["completion_tokens"] <= 3
    by_flag = stdout_json(
        shimmy_cli("generate", "Hello", "--json", "--config", str(config), "-n", "9")
    )
    assert by_flag["usage"]["completion_tokens"] > 3
    greedy = stdout_json(shimmy_cli("generate", "Hello", "--json", "--temperature", "0", "-n", "9"))
    assert by_flag["choices"][0]["text"] == greedy["choices"][0]["text"]


# --- shell completion -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_script_completes_commands_and_options(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = cli_env(tiny_model_dir, tmp_path)
    # the script calls `shimmy` itself: put this interpreter's console script first on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    script = run_shimmy(["--show-completion", "bash"], env)
    assert script.returncode == 0, script.stderr.decode()
    # bash calls the completion function with the command's name, as done here
    complete = '_shimmy_completion shimmy; echo "${COMPREPLY[@]}"'
    probe = (
        f'eval "$SCRIPT"\n'
        f"COMP_WORDS=(shimmy gen); COMP_CWORD=1; {complete}\n"
        f"COMP_WORDS=(shimmy chat --sys); COMP_CWORD=2; {complete}\n"
    )
    result = subprocess.run(
        ["bash", "-c", probe],
        env={**env, "SCRIPT": script.stdout.decode()},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    commands, options = result.stdout.decode().splitlines()
    assert commands.split() == ["generate"]
    assert "--system" in options.split()

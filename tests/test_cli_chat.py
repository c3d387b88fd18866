"""``shimmy chat`` driven at its prompt through a pseudo-terminal (pexpect), as a person would.

The tiny model answers random bytes, so the tests read the per-answer report line
(``[N tokens, ... · prompt P tokens (R reused)]``) and ``/history`` rather than wording.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from cli_helpers import cli_env, run_shimmy
from conftest import LONG_CONTEXT

PROMPT = ">>> "
# "[stopped · 12 tokens, 850.3 tokens/s · first token 0.01 s · prompt 40 tokens (32 reused)]"
REPORT = re.compile(
    r"\[(stopped · )?(\d+) tokens(?:[^\]]*?prompt (\d+) tokens(?: \((\d+) reused\))?)?[^\]]*\]"
)
TIMEOUT = 60

Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def spawn_chat(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Spawn]:
    children: list[pexpect.spawn] = []

    def spawn(*args: str, model_dir: Path = tiny_model_dir, **env: str) -> pexpect.spawn:
        environment = cli_env(model_dir, tmp_path, TERM="xterm", COLUMNS="100", **env)
        child = pexpect.spawn(
            sys.executable,
            ["-m", "shimmy", "chat", *args],
            env=environment,
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
            dimensions=(40, 100),
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close(force=True)


def answer(child: pexpect.spawn, message: str) -> re.Match[str]:
    """Send one message; return the report line's match once the prompt is back."""
    child.sendline(message)
    child.expect(REPORT)
    report = child.match
    child.expect_exact(PROMPT)
    return report


def command(child: pexpect.spawn, line: str, *expected: str) -> None:
    """Send a line that gets no answer (a /command); expect ``expected`` in order, then the
    prompt."""
    child.sendline(line)
    for pattern in expected:
        child.expect(pattern)
    child.expect_exact(PROMPT)


def leave(child: pexpect.spawn) -> int:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_answers_stream_with_a_speed_report(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "12")
    child.expect("loading tiny")  # the model's load progress bar
    child.expect("Chatting with tiny")
    child.expect_exact(PROMPT)
    report = answer(child, "Hello there")
    assert 1 <= int(report.group(2)) <= 12
    assert report.group(1) is None  # not stopped
    assert leave(child) == 0


def test_each_turn_sends_the_conversation_and_reuses_its_cache(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "8", "--temperature", "0")
    child.expect_exact(PROMPT)
    first = answer(child, "What is a llama?")
    second = answer(child, "And an alpaca?")
    # the second prompt holds the first exchange, whose KV the engine kept
    assert int(second.group(3)) > int(first.group(3)) + len("And an alpaca?") // 2
    assert int(second.group(4) or 0) >= int(first.group(3)) - 1
    command(child, "/history", "user: What is a llama\\?", "assistant: ", "user: And an alpaca\\?")
    assert leave(child) == 0


def test_clear_forgets_and_system_sets_the_system_prompt(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "4", "--temperature", "0")
    child.expect_exact(PROMPT)
    alone = int(answer(child, "Hi").group(3))
    answer(child, "Again")
    command(child, "/clear", "conversation cleared")
    assert int(answer(child, "Hi").group(3)) == alone
    command(child, "/system You are terse.", "system prompt set")
    assert int(answer(child, "Hi").group(3)) > alone
    command(child, "/history", "system: You are terse.")
    assert leave(child) == 0


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(
    spawn_chat: Spawn, long_model_dir: Path
) -> None:
    child = spawn_chat(
        "-n",
        str(LONG_CONTEXT - 64),  # an answer that would run for minutes
        model_dir=long_model_dir,
        SHIMMY_CTX_SIZE=str(LONG_CONTEXT),
        SHIMMY_MAX_TOKENS_CAP=str(LONG_CONTEXT),
    )
    child.expect_exact(PROMPT)
    for message in ("Tell me everything", "And more"):
        child.sendline(message)
        child.expect_exact(f"{message}\r\n")  # the terminal's echo of the line
        child.sendintr()
        child.expect(REPORT)
        assert child.match.group(1) is not None  # "[stopped · ..."
        assert int(child.match.group(2)) < LONG_CONTEXT // 2
        child.expect_exact(PROMPT)
    # both questions (and what was said of the answers) are kept
    command(child, "/history", "user: Tell me everything", "user: And more")
    assert leave(child) == 0


def test_ctrl_c_at_the_prompt_hints_and_ctrl_d_leaves(spawn_chat: Spawn) -> None:
    child = spawn_chat()
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect("Ctrl-D or /exit to leave")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_multiline_messages_and_unknown_commands(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "2")
    child.expect_exact(PROMPT)
    child.sendline('"""first line')
    child.expect_exact("... ")
    child.sendline('second line"""')
    child.expect(REPORT)
    child.expect_exact(PROMPT)
    command(child, "/history", "user: first line\r\nsecond line")
    command(child, "/nonsense", "unknown command /nonsense")
    assert leave(child) == 0


def test_typed_lines_are_remembered_across_sessions(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "2")
    child.expect_exact(PROMPT)
    answer(child, "remember this line")
    assert leave(child) == 0
    again = spawn_chat("-n", "2")
    again.expect_exact(PROMPT)
    # up arrow twice: readline recalls the previous session's lines ("/exit", then ours)
    again.send("\x1b[A\x1b[A")
    again.sendline("")
    again.expect(REPORT)
    again.expect_exact(PROMPT)
    command(again, "/history", "user: remember this line")
    assert leave(again) == 0


def test_old_exchanges_are_forgotten_to_fit_the_context(spawn_chat: Spawn) -> None:
    child = spawn_chat("-n", "16", SHIMMY_CTX_SIZE="256")
    child.expect_exact(PROMPT)
    message = "x" * 60
    for _ in range(6):
        child.sendline(message)
        index = child.expect([r"forgot the \d+ oldest", REPORT])
        if index == 0:
            break
        child.expect_exact(PROMPT)
    else:
        pytest.fail("the conversation outgrew the context without forgetting anything")
    child.expect(REPORT)
    child.expect_exact(PROMPT)
    command(child, "y" * 400, "does not fit the model's context")
    assert leave(child) == 0


def test_piped_input_prints_only_the_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    def chat(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        args = ["chat", "-n", "6", "--temperature", "0"]
        return run_shimmy(args, cli_env(tiny_model_dir, tmp_path), stdin=stdin)

    result = chat(b"Hello\nHow are you?\n/exit\nnever sent\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    out = result.stdout.decode("utf-8")
    assert out.endswith("\n") and PROMPT not in out and "Chatting with" not in out
    # the same answers without the line after /exit: it was never sent
    assert chat(b"Hello\nHow are you?\n").stdout == result.stdout
    # and the second answer depends on the first exchange (the history is sent)
    assert chat(b"How are you?\n").stdout != result.stdout

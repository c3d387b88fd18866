"""``shimmy chat``: an interactive conversation in the terminal, in-process (no server).

Answers stream as they are generated; the whole conversation is sent each turn, and the
engine's prefix cache reuses the KV of everything said before, so a turn costs only its new
tokens. Ctrl-C stops an answer (the conversation goes on), Ctrl-D or /exit leaves. With a
terminal, lines are edited with readline and remembered across sessions; without one (a
pipe), every input line is one message and only the answers are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shimmy.cli.loading import load_engine, open_registry
from shimmy.cli.options import CommonOptions, build_settings, with_common_options
from shimmy.cli.output import tell, write_stdout
from shimmy.cli.sampling import SamplingFlags, max_tokens_option, with_sampling_options
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine, Stream
    from shimmy.engine.types import GenerationRequest, Usage

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
DEFAULT_MAX_TOKENS = DEFAULTS[Dialect.CLI_CHAT].max_tokens or 1
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000
MULTILINE_QUOTES = '"""'
EXIT_COMMANDS = ("/exit", "/quit", "/bye")
HELP = """\
Commands:
  /help            this help
  /clear           forget the conversation (the system prompt stays)
  /system [TEXT]   show or set the system prompt (setting it starts a new conversation)
  /history         show the conversation so far
  /exit            leave (also /quit, /bye, Ctrl-D)
Ctrl-C stops an answer. Start and end a message with \"\"\" to write several lines."""


@dataclass
class Turn:
    """One answer as it streams: kept outside the coroutine so Ctrl-C cannot lose it."""

    text: list[str] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str = "cancelled"
    started: float = field(default_factory=time.perf_counter)
    first_text_at: float | None = None
    ended: float | None = None
    stream: Stream | None = None
    stop_requested: bool = False

    def answer(self) -> str:
        return "".join(self.text)


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def rendered(self) -> list[dict[str, str]]:
        preamble = [{"role": "system", "content": self.system}] if self.system else []
        return preamble + self.messages

    def forget_oldest_exchange(self) -> bool:
        """Drop the oldest user message and its answer; False if only the newest is left."""
        if len(self.messages) <= 1:
            return False
        del self.messages[: 2 if self.messages[1]["role"] == "assistant" else 1]
        return True


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        sampling: SamplingFlags,
        *,
        max_tokens: int | None,
        system: str | None,
        interactive: bool,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.conversation = Conversation(system=system)
        self.interactive = interactive

    # --- one turn -------------------------------------------------------------------------
    async def prepare_turn(self, user_text: str) -> GenerationRequest:
        """The request for the conversation ending with ``user_text``. When it no longer fits
        the context (with room left for an answer), the oldest exchanges are forgotten."""
        from shimmy.serving.chat import Message
        from shimmy.serving.prepare import prepare

        self.conversation.messages.append({"role": "user", "content": user_text})
        room = min(self.max_tokens or DEFAULT_MAX_TOKENS, self.engine.n_ctx // 4)
        forgot = 0
        while True:
            messages = [Message(m["role"], m["content"]) for m in self.conversation.messages]
            given = self.sampling.input(
                messages=messages,
                system=self.conversation.system or None,
                max_tokens=self.max_tokens,
            )
            prepared = await prepare(self.engine, given, Dialect.CLI_CHAT, self.settings)
            request = prepared.request
            assert isinstance(request.prompt, str)
            if len(await self.engine.tokenize(request.prompt)) + room <= self.engine.n_ctx:
                break
            if not self.conversation.forget_oldest_exchange():
                self.conversation.messages.pop()
                raise InvalidRequest(
                    f"the message does not fit the model's context ({self.engine.n_ctx} tokens)"
                )
            forgot += 1
        if forgot and self.interactive:
            tell(f"(forgot the {forgot} oldest exchange(s) to fit the context)")
        return request

    async def reply(self, user_text: str, turn: Turn) -> None:
        await self.answer(await self.prepare_turn(user_text), turn)

    async def answer(self, request: GenerationRequest, turn: Turn) -> None:
        from shimmy.engine.types import TextDelta

        stream = turn.stream = self.engine.submit(request)
        if turn.stop_requested:  # Ctrl-C came while the prompt was being prepared
            stream.cancel()
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    turn.text.append(event.text)
                    # An answer's leading blank lines are template noise: not shown, but kept
                    # in the history, whose next rendering then matches the cached tokens.
                    shown = event.text if turn.first_text_at else event.text.lstrip("\n")
                    if shown:
                        turn.first_text_at = turn.first_text_at or time.perf_counter()
                        write_stdout(shown)
                else:
                    turn.usage, turn.finish_reason = event.usage, event.finish_reason
        finally:
            stream.cancel()  # an error or exit mid-answer must still free the slot
            turn.ended = time.perf_counter()

    def finish(self, turn: Turn) -> None:
        """Record the (possibly stopped) answer and report on it."""
        answer = turn.answer()
        if answer:
            self.conversation.messages.append({"role": "assistant", "content": answer})
        write_stdout("\n")
        if self.interactive:
            tell(describe_turn(turn, self.count_tokens))

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text, add_special=False) if text else 0

    # --- commands -------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in EXIT_COMMANDS:
            return False
        if name == "/help":
            tell(HELP)
        elif name == "/clear":
            self.conversation.messages.clear()
            tell("(conversation cleared)")
        elif name == "/system":
            if argument:
                self.conversation = Conversation(system=argument)
                tell("(system prompt set; new conversation)")
            else:
                tell(f"system prompt: {self.conversation.system or '(none)'}")
        elif name == "/history":
            for message in self.conversation.rendered():
                tell(f"{message['role']}: {message['content']}")
        else:
            tell(f"unknown command {name}: /help lists them")
        return True


def describe_turn(turn: Turn, count_tokens: Callable[[str], int]) -> str:
    """The line after an answer: tokens, speed, time to first token, prompt and reuse. An
    answer stopped with Ctrl-C has no usage from the engine: its text is counted instead."""
    ended = turn.ended or time.perf_counter()
    first = turn.first_text_at or ended
    usage = turn.usage
    tokens = usage.completion_tokens if usage else count_tokens(turn.answer())
    parts = ["stopped"] if turn.finish_reason == "cancelled" else []
    if tokens > 1 and ended > first:
        parts.append(f"{tokens} tokens, {(tokens - 1) / (ended - first):,.1f} tokens/s")
    else:
        parts.append(f"{tokens} tokens")
    if turn.first_text_at is not None:
        parts.append(f"first token {first - turn.started:.2f} s")
    if usage is not None:
        reused = f" ({usage.cached_tokens} reused)" if usage.cached_tokens else ""
        parts.append(f"prompt {usage.prompt_tokens} tokens{reused}")
    if turn.finish_reason == "length":
        parts.append("cut at --max-tokens")
    return "[" + " · ".join(parts) + "]"


# --- reading input ----------------------------------------------------------------------------


@contextlib.contextmanager
def ctrl_c_stops(turn: Turn, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While an answer is prepared and streams, Ctrl-C cancels its generation (the engine then
    finishes it with its usage) instead of raising KeyboardInterrupt at an arbitrary point."""

    def stop(signum: int, frame: object) -> None:
        turn.stop_requested = True
        if turn.stream is not None:
            loop.call_soon_threadsafe(turn.stream.cancel)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def line_history(path: Path) -> Iterator[None]:
    """readline editing, with the lines typed remembered in ``path`` across sessions."""
    try:
        import readline
    except ImportError:  # no readline (Windows): plain input() still works
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def read_message(ask: Callable[[str], str], interactive: bool) -> str:
    """One message; a line starting with three double quotes goes on until one ending with
    them. Raises EOFError at the end of input."""
    line = ask(PROMPT if interactive else "")
    if not line.lstrip().startswith(MULTILINE_QUOTES):
        return line
    first = line.lstrip()[len(MULTILINE_QUOTES) :]
    if first.rstrip().endswith(MULTILINE_QUOTES):
        return first.rstrip()[: -len(MULTILINE_QUOTES)]
    lines = [first]
    while True:
        line = ask(CONTINUATION_PROMPT if interactive else "")
        if line.rstrip().endswith(MULTILINE_QUOTES):
            lines.append(line.rstrip()[: -len(MULTILINE_QUOTES)])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def _read_piped_line(_prompt: str) -> str:
    line = sys.stdin.buffer.readline()
    if not line:
        raise EOFError
    return line.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")


def run_chat(session: ChatSession, runner: asyncio.Runner) -> None:
    ask: Callable[[str], str] = input if session.interactive else _read_piped_line
    while True:
        try:
            message = read_message(ask, session.interactive)
        except EOFError:
            if session.interactive:
                write_stdout("\n")
            return
        except KeyboardInterrupt:
            write_stdout("\n")
            tell("(Ctrl-D or /exit to leave)")
            continue
        if not message.strip():
            continue
        if message.startswith("/") and not message.startswith("//"):
            if not session.command(message.strip()):
                return
            continue
        text = message.removeprefix("/")  # "//..." sends a message starting with "/"
        said_before = len(session.conversation.messages)
        turn = Turn()
        try:
            with ctrl_c_stops(turn, runner.get_loop()):
                runner.run(session.reply(text, turn))
        except ShimmyError as err:
            del session.conversation.messages[said_before:]
            tell(f"error: {err.details or err.message}")
            if not session.interactive:
                raise
            continue
        session.finish(turn)


def _greeting(engine: Engine) -> str:
    source = engine.template.source
    template = {
        "gguf": "the model's chat template",
        "override": "the configured chat template",
        "plain": "a plain format (the model has no chat template)",
    }.get(source, f"shimmy's {source.removeprefix('builtin:')} template")
    return (
        f"Chatting with {engine.entry.id} ({template}, {engine.n_ctx} tokens of context).\n"
        "Type /help for commands; Ctrl-C stops an answer, Ctrl-D leaves."
    )


@with_common_options
@with_sampling_options
def chat(
    common: CommonOptions,
    sampling: SamplingFlags,
    system: Annotated[
        str | None, typer.Option("--system", "-s", help="System prompt for the conversation")
    ] = None,
    max_tokens: Annotated[
        int | None, max_tokens_option(DEFAULT_MAX_TOKENS, "Tokens per answer")
    ] = None,
) -> None:
    """Chat with a model in the terminal (in-process, no server needed).

    Answers stream as they come; the conversation is remembered (and its KV reused) until
    /clear. Ctrl-C stops an answer, Ctrl-D or /exit leaves, /help lists the commands.

    Piped input works too: every line is one message, and only the answers are printed.
    """
    settings = build_settings(common)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    with asyncio.Runner() as runner:
        registry = runner.run(open_registry(settings))
        try:
            engine = runner.run(load_engine(registry, None))
            session = ChatSession(
                engine,
                settings,
                sampling,
                max_tokens=max_tokens,
                system=system,
                interactive=interactive,
            )
            if interactive:
                tell(_greeting(engine))
                with line_history(settings.cache_dir / HISTORY_FILE):
                    run_chat(session, runner)
            else:
                run_chat(session, runner)
        finally:
            runner.run(registry.aclose())

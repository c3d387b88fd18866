"""``shimmy generate``: one completion in-process (no server), streamed to stdout."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shimmy.cli.loading import load_engine, open_registry
from shimmy.cli.options import CommonOptions, build_settings, with_common_options
from shimmy.cli.output import print_json, write_stdout
from shimmy.cli.sampling import SamplingFlags, max_tokens_option, with_sampling_options
from shimmy.errors import InvalidRequest
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.engine.types import Finished

# Templates a model (or its config) brings itself; shimmy's builtin guesses are used only
# when asked for, since a base model given chat markup it never saw answers worse.
_MODEL_OWN_TEMPLATES = ("gguf", "override")
DEFAULT_MAX_TOKENS = DEFAULTS[Dialect.CLI_GENERATE].max_tokens or 1


def read_prompt(argument: str | None, option: str | None, file: Path | None) -> str:
    """The prompt from exactly one of: the argument, --prompt, --file (``-`` = stdin), stdin."""
    given = [name for name, value in (("PROMPT", argument), ("--prompt", option)) if value]
    if file is not None:
        given.append("--file")
    if len(given) > 1:
        raise InvalidRequest(f"give the prompt once, not with {' and '.join(given)}")
    prompt = argument or option
    if prompt is None:
        if file is not None and str(file) != "-":
            try:
                data = file.read_bytes()
            except OSError as err:
                raise InvalidRequest(f"cannot read --file {file}: {err.strerror or err}") from None
        elif sys.stdin is None or sys.stdin.isatty():
            raise InvalidRequest("no prompt: pass it as an argument, --prompt, --file or stdin")
        else:
            data = sys.stdin.buffer.read()
        prompt = data.decode("utf-8", errors="replace")
        # echo's (or a text file's) final newline ends the input; it is not part of the prompt
        prompt = prompt.removesuffix("\n").removesuffix("\r")
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty")
    return prompt


def wants_chat_template(engine: Engine, *, raw: bool, chat: bool, system: bool) -> bool:
    if raw and chat:
        raise InvalidRequest("--raw and --chat contradict each other")
    if raw:
        return False
    return chat or system or engine.template.source in _MODEL_OWN_TEMPLATES


async def _generate(
    settings: Settings,
    prompt: str,
    sampling: SamplingFlags,
    *,
    system: str | None,
    raw: bool,
    chat: bool,
    as_json: bool,
    max_tokens: int | None,
) -> None:
    from shimmy.engine.types import TextDelta
    from shimmy.serving.chat import Message
    from shimmy.serving.prepare import prepare

    registry = await open_registry(settings)
    try:
        engine = await load_engine(registry, None)
        if wants_chat_template(engine, raw=raw, chat=chat, system=system is not None):
            given = sampling.input(
                messages=[Message("user", prompt)], system=system, max_tokens=max_tokens
            )
        else:
            # as POST /api/generate does with prompt + system
            given = sampling.input(prompt=prompt, system=system, max_tokens=max_tokens)
        prepared = await prepare(engine, given, Dialect.CLI_GENERATE, settings)
        request = prepared.request
        stream = engine.submit(request)
        try:
            if as_json:
                text, finished = await stream.collect()
                print_json(_response_body(engine, text, finished))
                return
            async for event in stream:
                if isinstance(event, TextDelta) and event.text:
                    write_stdout(event.text)
            if sys.stdout.isatty():
                write_stdout("\n")
        finally:
            stream.cancel()
    finally:
        await registry.aclose()


def _response_body(engine: Engine, text: str, finished: Finished) -> dict[str, Any]:
    """The same shape as POST /api/generate's response."""
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "model": engine.entry.id,
        "created": int(time.time()),
        "choices": [{"text": text, "index": 0, "finish_reason": finished.finish_reason}],
        "usage": finished.usage.as_dict(),
    }


@with_common_options
@with_sampling_options
def generate(
    common: CommonOptions,
    sampling: SamplingFlags,
    prompt_argument: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", help="The prompt (or use --prompt, --file, stdin)"),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt")] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Read the prompt from this file ('-' = stdin)"),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("--system", "-s", help="System prompt (implies --chat unless --raw)"),
    ] = None,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Send the prompt as is, never through a chat template"),
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Always use a chat template (shimmy's builtin one if the model has none)"
        ),
    ] = False,
    max_tokens: Annotated[
        int | None, max_tokens_option(DEFAULT_MAX_TOKENS, "Tokens to generate")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the /api/generate response object instead")
    ] = False,
) -> None:
    """Generate text in-process (no server) and stream it to stdout.

    The prompt comes from the argument, --prompt, --file or stdin:

    echo "Once upon a time" | shimmy generate --max-tokens 100

    A model that carries its own chat template gets the prompt as a user message (with
    --system before it); --raw sends the prompt exactly as given.
    """
    settings = build_settings(common)
    text = read_prompt(prompt_argument, prompt, file)
    asyncio.run(
        _generate(
            settings,
            text,
            sampling,
            system=system,
            raw=raw,
            chat=chat,
            as_json=as_json,
            max_tokens=max_tokens,
        )
    )

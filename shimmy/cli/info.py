"""``shimmy list``, ``probe`` and ``diag``: what shimmy finds, how fast a model runs, and the
facts a bug report needs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from shimmy.cli.loading import load_engine, open_registry
from shimmy.cli.manage import loaded_on_server, server_url
from shimmy.cli.options import (
    CommonOptions,
    build_settings,
    discovered_registry,
    with_common_options,
)
from shimmy.cli.output import print_json, stdout_console, tell
from shimmy.diag import collect_diagnostics, diagnostics_tables, format_size, searched_folders
from shimmy.errors import ServerError
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.models.entry import ModelEntry

PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,"
PROBE_TOKENS = 16


def _status(entry: ModelEntry) -> Text:
    if entry.usable:
        return Text("usable")
    return Text.assemble(("error: ", "red"), entry.error or "unknown")


@with_common_options
def list_models(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, as GET /api/models")] = False,
) -> None:
    """List the models shimmy finds."""
    settings = build_settings(common)
    registry = discovered_registry(settings)
    entries = registry.entries
    # A running server (at the configured address) tells what it has loaded right now.
    on_server = loaded_on_server(settings)
    loaded_ids = {str(m.get("id")) for m in on_server or []}
    if as_json:
        models = [e.to_api(loaded=e.id in loaded_ids) for e in entries]
        print_json({"models": models, "default": registry.default_id})
        return
    if not entries:
        folders = ", ".join(str(path) for _, path in searched_folders(settings))
        tell(
            f"No models found. Searched: {folders}. Put a .gguf file in one of them or pass "
            "--model-dirs."
        )
        return
    table = Table(caption="* default model", caption_justify="left")
    table.add_column("", width=1)
    table.add_column("ID", no_wrap=True, style="bold")
    for heading in ("ARCH", "QUANT"):
        table.add_column(heading)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("CONTEXT", justify="right")
    table.add_column("SOURCE")
    table.add_column("STATUS")
    if on_server is not None:
        table.caption = f"* default model · loaded: on the server at {server_url(settings)}"
    for entry in entries:
        table.add_row(
            "*" if entry.id == registry.default_id else "",
            Text(entry.id),  # Text: ids and errors are data, never rich markup
            Text(entry.architecture or "?"),
            Text(entry.quantization or "?"),
            format_size(entry.size_bytes),
            str(entry.context_length or "?"),
            entry.source,
            Text("loaded", style="green") if entry.id in loaded_ids else _status(entry),
        )
    stdout_console().print(table)


@dataclass
class ProbeResult:
    entry: ModelEntry
    load_seconds: float
    n_ctx: int
    prompt_tokens: int
    prompt_seconds: float
    completion_tokens: int
    generation_seconds: float
    text: str

    @property
    def prompt_tokens_per_second(self) -> float | None:
        return _rate(self.prompt_tokens, self.prompt_seconds)

    @property
    def generation_tokens_per_second(self) -> float | None:
        # the first token's time is counted with the prompt: time to first text
        return _rate(self.completion_tokens - 1, self.generation_seconds)


def _rate(count: int, seconds: float) -> float | None:
    return count / seconds if count > 0 and seconds > 0 else None


async def _probe(settings: Settings) -> ProbeResult:
    from shimmy.engine.types import TextDelta
    from shimmy.serving.defaults import Dialect
    from shimmy.serving.prepare import GenerationInput, prepare

    registry = await open_registry(settings)
    try:
        entry = registry.resolve(None)
        engine = await load_engine(registry, entry.id)
        # Sent explicitly, so a model's configured defaults cannot change the measurement.
        given = GenerationInput(
            prompt=PROBE_PROMPT,
            sampling={"temperature": 0.0, "seed": 0},
            max_tokens=PROBE_TOKENS,
        )
        request = (await prepare(engine, given, Dialect.CLI_PROBE, settings)).request
        started = time.perf_counter()
        first_text_at: float | None = None
        parts: list[str] = []
        async for event in engine.submit(request):
            if isinstance(event, TextDelta):
                first_text_at = first_text_at or time.perf_counter()
                parts.append(event.text)
                continue
            ended = time.perf_counter()
            first = first_text_at or ended
            return ProbeResult(
                entry=entry,
                load_seconds=engine.load_seconds,
                n_ctx=engine.n_ctx,
                prompt_tokens=event.usage.prompt_tokens,
                prompt_seconds=first - started,
                completion_tokens=event.usage.completion_tokens,
                generation_seconds=ended - first,
                text="".join(parts),
            )
        raise ServerError("the generation ended without finishing")
    finally:
        await registry.aclose()


def _format_rate(rate: float | None) -> str:
    return f"{rate:,.1f} tokens/s" if rate is not None else "n/a"


def _format_count(count: int | None) -> str:
    if count is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


@with_common_options
def probe(
    common: CommonOptions,
    model_name: Annotated[
        str | None,
        typer.Argument(metavar="[MODEL]", help="Model id or GGUF path (default model if omitted)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON")] = False,
) -> None:
    """Load a model, generate a few tokens greedily and report its speed."""
    settings = build_settings(common, default_model=model_name)
    result = asyncio.run(_probe(settings))
    entry = result.entry
    if as_json:
        print_json(
            {
                "model": entry.to_api(loaded=True),
                "n_ctx": result.n_ctx,
                "load_seconds": result.load_seconds,
                "prompt_tokens": result.prompt_tokens,
                "prompt_tokens_per_second": result.prompt_tokens_per_second,
                "completion_tokens": result.completion_tokens,
                "generation_tokens_per_second": result.generation_tokens_per_second,
                "text": result.text,
            }
        )
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", entry.id),
        ("path", str(entry.path)),
        ("architecture", entry.architecture or "?"),
        ("quantization", entry.quantization or "?"),
        ("parameters", _format_count(entry.parameter_count)),
        ("size", format_size(entry.size_bytes)),
        ("context", f"{result.n_ctx} per sequence (trained: {entry.context_length or '?'})"),
        ("load time", f"{result.load_seconds:.2f} s"),
        (
            "prompt",
            f"{result.prompt_tokens} tokens, {_format_rate(result.prompt_tokens_per_second)}",
        ),
        (
            "generation",
            f"{result.completion_tokens} tokens, "
            f"{_format_rate(result.generation_tokens_per_second)}",
        ),
        ("sample", repr(result.text)),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    stdout_console().print(table, soft_wrap=True)


@with_common_options
def diag(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Show versions, llama.cpp build, CPU, memory and model discovery facts."""
    facts = collect_diagnostics(build_settings(common))
    if as_json:
        print_json(facts)
        return
    console = stdout_console()
    for section in diagnostics_tables(facts):
        console.print(section)
        console.print()

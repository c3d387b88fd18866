"""The ``shimmy`` command line: serve, generate, list, probe, diag.

Settings come from three layers, later ones winning: defaults, ``SHIMMY_*`` environment
variables, command-line flags. Only flags the user actually typed are passed on, so an unset
flag never hides an environment variable.

stdout carries command output only (``shimmy generate`` composes in pipelines); logs, banners
and warnings go to stderr. A failure prints exactly one ``error: ...`` line (plus a traceback
with ``-v``) and exits non-zero: 2 for bad input, 1 for everything else.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shimmy import __version__
from shimmy.api.security import insecure_bind_warning, load_api_keys
from shimmy.cli_models import (
    loaded_on_server,
    pull_with_progress,
    remove_local_model,
    require_loaded_on_server,
    server_url,
)
from shimmy.diag import (
    collect_diagnostics,
    diagnostics_tables,
    format_size,
    package_version,
    searched_folders,
)
from shimmy.errors import InvalidRequest, ServerError, ShimmyError
from shimmy.logging_setup import configure_logging
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.engine.engine import ModelEngine
    from shimmy.engine.types import Finished
    from shimmy.models.entry import ModelEntry
    from shimmy.registry import ModelRegistry

T = TypeVar("T")

# Open connections (a long stream, an idle WebSocket) must not keep Ctrl-C waiting forever.
GRACEFUL_SHUTDOWN_SECONDS = 5
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,"
PROBE_TOKENS = 16
PIPED_OUTPUT_WIDTH = 240
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="shimmy",
    help="A fast, safe local server for GGUF language models, backed by llama.cpp.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class CliState:
    """Shared by the root callback and ``main``: whether to show tracebacks."""

    verbose: bool = False


class LogFormat(StrEnum):
    text = "text"
    json = "json"


# --- options shared by every command --------------------------------------------------------

_MODELS = "Models"
_ENGINE = "Engine"
_OTHER = "Logging and security"


def _option(
    kind: Any, *names: str, panel: str, default: Any = None, **info: Any
) -> inspect.Parameter:
    """A keyword-only parameter carrying a Typer option, to splice into command signatures."""
    annotation = Annotated[kind, typer.Option(*names, rich_help_panel=panel, **info)]
    return inspect.Parameter(
        "_", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


_SEP = os.pathsep
_COMMON_OPTIONS: dict[str, inspect.Parameter] = {
    "model_dirs": _option(str | None, "--model-dirs", metavar="DIRS", panel=_MODELS,
                          help=f"Extra folders or GGUF files to search, '{_SEP}'-separated"),
    "models_dir": _option(Path | None, "--models-dir", panel=_MODELS,
                          help="shimmy's own models folder"),
    "model": _option(str | None, "--model", "-m", metavar="PATH|ID", panel=_MODELS,
                     help="The model to use (served as 'default'): an id or a GGUF file"),
    "no_user_caches": _option(bool, "--no-user-caches", default=False, panel=_MODELS,
                              help="Do not search the Hugging Face, Ollama and LM Studio folders"),
    "no_starter": _option(bool, "--no-starter", default=False, panel=_MODELS,
                          help="Do not offer the bundled starter model"),
    "cache_dir": _option(Path | None, "--cache-dir", panel=_MODELS, help="shimmy's cache folder"),
    "config": _option(Path | None, "--config", panel=_MODELS,
                      help="TOML file with per-model options (aliases, context, sampling, LoRA)"),
    "ctx_size": _option(int | None, "--ctx-size", "-c", panel=_ENGINE,
                        help="Context length per sequence"),
    "n_gpu_layers": _option(int | None, "--n-gpu-layers", panel=_ENGINE,
                            help="Layers to offload to the GPU (default: all when supported)"),
    "threads": _option(int | None, "--threads", "-t", panel=_ENGINE,
                       help="Decode threads (default: one per physical core)"),
    "threads_batch": _option(int | None, "--threads-batch", panel=_ENGINE,
                             help="Prompt-processing threads"),
    "parallel": _option(int | None, "--parallel", panel=_ENGINE,
                        help="Sequences decoded together per model"),
    "max_queue": _option(int | None, "--max-queue", panel=_ENGINE,
                         help="Requests waiting for a slot before 'server busy'"),
    "batch_size": _option(int | None, "--batch-size", "-b", panel=_ENGINE,
                          help="Max tokens per llama_decode call"),
    "no_prefix_cache": _option(bool, "--no-prefix-cache", default=False, panel=_ENGINE,
                               help="Do not reuse the KV cache of a slot's previous prompt"),
    "api_key": _option(list[str] | None, "--api-key", metavar="KEY", panel=_OTHER,
                       help="Accepted API key (repeatable)"),
    "log_format": _option(LogFormat | None, "--log-format", panel=_OTHER,
                          help="Log line format on stderr"),
    "verbose": _option(bool, "--verbose", "-v", default=False, panel=_OTHER,
                       help="Debug logging and tracebacks"),
}  # fmt: skip


# flag name -> Settings field, for flags whose value is passed through unchanged
_FLAG_FIELDS = {
    "model_dirs": "model_paths",
    "models_dir": "models_dir",
    "model": "default_model",
    "cache_dir": "cache_dir",
    "config": "config",
    "ctx_size": "ctx_size",
    "n_gpu_layers": "n_gpu_layers",
    "threads": "threads",
    "threads_batch": "threads_batch",
    "parallel": "parallel",
    "max_queue": "max_queue",
    "batch_size": "batch_size",
    "api_key": "api_keys",
    "log_format": "log_format",
}
# "--no-x" switches -> the Settings field they turn off
_OFF_SWITCHES = {
    "no_user_caches": "scan_user_caches",
    "no_starter": "starter_model",
    "no_prefix_cache": "prefix_cache",
}


@dataclass
class CommonOptions:
    """What the user typed of the shared flags, already named as Settings fields."""

    values: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False


def _common_from_flags(ctx: typer.Context, flags: dict[str, Any]) -> CommonOptions:
    values: dict[str, Any] = {}
    for flag, settings_field in _FLAG_FIELDS.items():
        value = flags[flag]
        if value is None or value == []:
            continue
        values[settings_field] = value.value if isinstance(value, Enum) else value
    for flag, settings_field in _OFF_SWITCHES.items():
        if flags[flag]:
            values[settings_field] = False
    state = ctx.find_object(CliState)
    verbose = bool(flags["verbose"]) or (state is not None and state.verbose)
    if state is not None:
        state.verbose = verbose  # main() prints tracebacks for -v given after the command too
    return CommonOptions(values, verbose)


_CONTEXT = "_typer_context"


def with_common_options(command: Callable[..., T]) -> Callable[..., T]:
    """Give ``command`` every shared settings flag; it receives them as ``common``.

    Typer reads a command's options from its signature, so the wrapper advertises the
    command's own parameters plus the shared ones (declared once, above).
    """
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "common"]
    shared = [p.replace(name=name) for name, p in _COMMON_OPTIONS.items()]
    context = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        flags = {name: kwargs.pop(name) for name in _COMMON_OPTIONS}
        common = _common_from_flags(kwargs.pop(_CONTEXT), flags)
        return command(*args, common=common, **kwargs)

    parameters = [*own, *shared, context]
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def build_settings(common: CommonOptions, *, quiet: bool = True, **overrides: Any) -> Settings:
    """The one place commands get their Settings; also configures logging to match.

    ``quiet`` commands (everything but serve) log warnings only, unless the user asked for a
    level (``-v`` or ``SHIMMY_LOG_LEVEL``).
    """
    values = dict(common.values)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if common.verbose:
        values["log_level"] = "debug"
    try:
        settings = Settings(**values)
    except ValidationError as err:
        raise InvalidRequest(_describe_validation_error(err)) from None
    level = settings.log_level
    if quiet and "log_level" not in settings.model_fields_set:
        level = "warning"
    configure_logging(level, settings.log_format)
    return settings


def _describe_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    return f"invalid setting '{where}': {first['msg']}"


def _registry(settings: Settings) -> ModelRegistry:
    from shimmy.registry import ModelRegistry

    registry = ModelRegistry(settings)
    registry.discover()
    return registry


def _stdout_console() -> Console:
    # Piped output (grep, a file) has no width to fit: don't truncate table cells to 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPED_OUTPUT_WIDTH if wide else None)


def _tell(line: str) -> None:
    """A message for the person at the terminal, never part of the output."""
    print(line, file=sys.stderr, flush=True)


def _write_stdout(text: str) -> None:
    """Write UTF-8 bytes whatever the locale says: generated text can be any character."""
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


def _print_json(data: Any) -> None:
    _write_stdout(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


# --- root ------------------------------------------------------------------------------------


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"shimmy {__version__}")
        typer.echo(f"llama-cpp-python {package_version('llama_cpp_python') or 'not installed'}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Show versions and exit"
        ),
    ] = None,
) -> None:
    """A fast, safe local server for GGUF language models, backed by llama.cpp.

    Every setting can also come from a SHIMMY_* environment variable (e.g. SHIMMY_CTX_SIZE);
    flags win over the environment.
    """
    ctx.ensure_object(CliState).verbose = verbose


# --- serve -----------------------------------------------------------------------------------


def parse_bind(value: str) -> tuple[str | None, int | None]:
    """``HOST:PORT``, ``HOST``, ``:PORT``, ``[IPv6]:PORT``, ``[IPv6]`` or a bare IPv6 address."""
    value = value.strip()
    host: str | None
    port_text: str | None = None
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidRequest(f"cannot parse --bind '{value}': expected [ADDRESS]:PORT")
        host, port_text = inside, rest[1:] or None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host = value  # a hostname, an IPv4 address, or a bare IPv6 address
    if port_text is None:
        return host or None, None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidRequest(f"cannot parse --bind '{value}': bad port '{port_text}'")
    return host or None, int(port_text)


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen before the server starts: the real port is known (port 0) for the
    banner, and clients that connect right away are queued by the kernel, not refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ServerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        if port != 0:  # restart at once on a fixed port whose old connections linger
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _banner(settings: Settings, registry: ModelRegistry) -> list[str]:
    from shimmy.engine.llama import gpu_offload_supported

    folders = ", ".join(
        str(path) + ("" if path.exists() else " (missing)")
        for _, path in searched_folders(settings)
    )
    if gpu_offload_supported():
        layers = "all" if settings.n_gpu_layers in (None, -1) else str(settings.n_gpu_layers)
        backend = f"llama.cpp with GPU offload ({layers} layers)"
    else:
        backend = "llama.cpp on CPU (this build has no GPU offload)"
    return [
        f"shimmy {__version__} listening on {settings.base_url}",
        f"  model folders: {folders}",
        f"  models found:  {len(registry.entries)}, default: {registry.default_id or 'none'}",
        f"  backend:       {backend}",
    ]


@app.command()
@with_common_options
def serve(
    common: CommonOptions,
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind", metavar="HOST:PORT", help="Address to listen on ([::1]:PORT for IPv6)"
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", help="Port (overrides the port of --bind; 0 = any free)"),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", metavar="ORIGIN", help="Allowed browser origin (repeatable)"),
    ] = None,
    keep_alive: Annotated[
        float | None,
        typer.Option("--keep-alive", help="Idle seconds before a model is unloaded; -1 = never"),
    ] = None,
    max_loaded_models: Annotated[
        int | None, typer.Option("--max-loaded-models", help="Models kept in memory at once")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", help="File with accepted API keys, one per line"),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host", metavar="HOST", help="Extra Host header to accept (repeatable)"
        ),
    ] = None,
    rate_limit: Annotated[
        float | None,
        typer.Option("--rate-limit", help="Requests per minute per client (default: off)"),
    ] = None,
    rate_burst: Annotated[
        int | None, typer.Option("--rate-burst", help="Requests a client may burst")
    ] = None,
    graceful_timeout: Annotated[
        int,
        typer.Option(
            "--graceful-timeout", help="Seconds in-flight requests get to finish on shutdown"
        ),
    ] = GRACEFUL_SHUTDOWN_SECONDS,
) -> None:
    """Run the HTTP + WebSocket server (native /api, OpenAI-compatible /v1)."""
    host, bind_port = parse_bind(bind) if bind is not None else (None, None)
    settings = build_settings(
        common,
        quiet=False,
        host=host,
        port=port if port is not None else bind_port,
        cors_origins=cors_origin or None,
        keep_alive=keep_alive,
        max_loaded_models=max_loaded_models,
        api_key_file=api_key_file,
        allowed_hosts=allowed_host or None,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
    )
    load_api_keys(settings)  # an unreadable or empty key file stops here, with one line
    registry = _registry(settings)
    if settings.default_model:
        registry.resolve(None)  # fail here, before listening, on an unusable --model
    sock = _listen(settings.host, settings.port)
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    for line in _banner(settings, registry):
        _tell(line)
    warning = insecure_bind_warning(settings)
    if warning:
        _tell(f"warning: {warning}")
    import uvicorn

    from shimmy.api.app import create_app

    config = uvicorn.Config(
        create_app(settings, registry),
        log_config=None,  # keep our stderr handler and format for uvicorn's loggers too
        log_level=settings.log_level,
        lifespan="on",
        ws="auto",  # websockets' sans-I/O protocol where available: the legacy one is deprecated
        server_header=False,
        access_log=False,  # shimmy.access logs one line per request, with model and tokens
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = uvicorn.Server(config)

    def terminated(signum: int, frame: object) -> None:
        # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal, which would
        # end the process with -15; as an interrupt it ends like Ctrl-C, with exit code 0.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully and re-raised the Ctrl-C: a normal exit
    finally:
        sock.close()
    if not server.started:
        raise ServerError("the server did not start (see the log above)")


# --- generate --------------------------------------------------------------------------------


def _read_prompt(prompt: str | None) -> str:
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidRequest("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
        # echo's (or a text file's) final newline ends the input; it is not part of the prompt
        prompt = prompt.removesuffix("\n").removesuffix("\r")
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty")
    return prompt


async def _generate(
    settings: Settings, prompt: str, *, chat: bool, as_json: bool, **request: Any
) -> None:
    from shimmy.engine.types import GenerationRequest, TextDelta
    from shimmy.registry import ModelRegistry

    registry = ModelRegistry(settings)
    await asyncio.to_thread(registry.discover)
    try:
        engine = await registry.get_engine(None)
        if chat:
            prompt = engine.template.render([{"role": "user", "content": prompt}])
        stream = engine.submit(GenerationRequest(prompt=prompt, **request))
        try:
            if as_json:
                text, finished = await stream.collect()
                _print_json(_response_body(engine, text, finished))
                return
            async for event in stream:
                if isinstance(event, TextDelta) and event.text:
                    _write_stdout(event.text)
            if sys.stdout.isatty():
                _write_stdout("\n")
        finally:
            stream.cancel()
    finally:
        await registry.aclose()


def _response_body(engine: ModelEngine, text: str, finished: Finished) -> dict[str, Any]:
    """The same shape as POST /api/generate's response."""
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "model": engine.entry.id,
        "created": int(time.time()),
        "choices": [{"text": text, "index": 0, "finish_reason": finished.finish_reason}],
        "usage": finished.usage.as_dict(),
    }


@app.command()
@with_common_options
def generate(
    common: CommonOptions,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The prompt (default: read stdin)")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate at most")
    ] = 50,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, max=2.0, help="0 = greedy")
    ] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.9,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="0 = off")] = 40,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", min=0.01, help="1.0 = off")
    ] = 1.1,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same text")] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", metavar="TEXT", help="Stop before this text (repeatable)"),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt as a user message in the chat template")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the /api/generate response object instead")
    ] = False,
) -> None:
    """Generate text in-process (no server) and stream it to stdout.

    Reads the prompt from --prompt or stdin: echo "Once upon a time" | shimmy generate
    """
    from shimmy.engine.types import SamplingParams

    settings = build_settings(common)
    text = _read_prompt(prompt)
    sampling = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    asyncio.run(
        _generate(
            settings,
            text,
            chat=chat,
            as_json=as_json,
            max_tokens=min(max_tokens, settings.max_tokens_cap),
            sampling=sampling,
            stop=list(stop or []),
        )
    )


# --- list ------------------------------------------------------------------------------------


def _status(entry: ModelEntry) -> Text:
    if entry.usable:
        return Text("usable")
    return Text.assemble(("error: ", "red"), entry.error or "unknown")


@app.command("list")
@with_common_options
def list_models(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, as GET /api/models")] = False,
) -> None:
    """List the models shimmy finds."""
    settings = build_settings(common)
    registry = _registry(settings)
    entries = registry.entries
    # A running server (at the configured address) tells what it has loaded right now.
    on_server = loaded_on_server(settings)
    loaded_ids = {str(m.get("id")) for m in on_server or []}
    if as_json:
        models = [e.to_api(loaded=e.id in loaded_ids) for e in entries]
        _print_json({"models": models, "default": registry.default_id})
        return
    if not entries:
        folders = ", ".join(str(path) for _, path in searched_folders(settings))
        _tell(
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
    _stdout_console().print(table)


# --- probe -----------------------------------------------------------------------------------


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
    from shimmy.engine.types import GenerationRequest, SamplingParams, TextDelta
    from shimmy.registry import ModelRegistry

    registry = ModelRegistry(settings)
    await asyncio.to_thread(registry.discover)
    try:
        entry = registry.resolve(None)
        engine = await registry.get_engine(entry.id)
        request = GenerationRequest(
            prompt=PROBE_PROMPT,
            max_tokens=PROBE_TOKENS,
            sampling=SamplingParams(temperature=0.0, seed=0),
        )
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


@app.command()
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
        _print_json(
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
    _stdout_console().print(table, soft_wrap=True)


# --- diag ------------------------------------------------------------------------------------


@app.command()
@with_common_options
def diag(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Show versions, llama.cpp build, CPU, memory and model discovery facts."""
    facts = collect_diagnostics(build_settings(common))
    if as_json:
        _print_json(facts)
        return
    console = _stdout_console()
    for section in diagnostics_tables(facts):
        console.print(section)
        console.print()


# --- models: pull, rm, ps --------------------------------------------------------------------


@app.command()
@with_common_options
def pull(
    common: CommonOptions,
    source: Annotated[
        str, typer.Argument(help="hf://OWNER/REPO/FILE.gguf, or an http(s):// URL of a .gguf")
    ],
) -> None:
    """Download a model into shimmy's models folder (resumable, verified)."""
    settings = build_settings(common)
    model_id = pull_with_progress(source, settings, Console(stderr=True))
    _tell(f"pulled {model_id} into {settings.models_dir}")
    _write_stdout(model_id + "\n")


@app.command("rm")
@with_common_options
def remove(
    common: CommonOptions,
    model_id: Annotated[str, typer.Argument(metavar="ID", help="The model id to delete")],
) -> None:
    """Delete a model from shimmy's own models folder (never anything outside it)."""
    settings = build_settings(common)
    for path in remove_local_model(model_id, settings):
        _tell(f"deleted {path}")


@app.command()
@with_common_options
def ps(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the models a running shimmy server has loaded (at --bind / SHIMMY_HOST:PORT)."""
    settings = build_settings(common)
    models = require_loaded_on_server(settings)
    if as_json:
        _print_json({"models": models})
        return
    if not models:
        _tell(f"no models loaded at {server_url(settings)}")
        return
    table = Table()
    for heading in ("ID", "MEMORY", "BUSY", "QUEUED", "IDLE", "UNLOADS IN"):
        table.add_column(heading)
    for model in models:
        expires = model.get("expires_in")
        table.add_row(
            Text(str(model["id"])),
            format_size(int(model.get("memory_bytes") or 0)),
            f"{model.get('busy', 0)}/{model.get('slots', 0)}",
            str(model.get("queued", 0)),
            f"{model.get('idle_seconds', 0):.0f}s",
            "never" if expires is None else f"{expires:.0f}s",
        )
    _stdout_console().print(table)


# --- entry point -----------------------------------------------------------------------------


def _fail(message: str, code: int, state: CliState) -> None:
    if state.verbose:
        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    sys.stderr.write(f"error: {first_line}\n")
    sys.stderr.flush()
    sys.exit(code)


def _silence_stdout() -> None:
    """The reader went away (``| head``): stop Python's exit-time flush from failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> None:
    state = CliState()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args or ["--help"], prog_name="shimmy", obj=state, standalone_mode=False)
    except typer.Exit as exit_:
        result = exit_.exit_code
    except typer.TyperException as err:  # typer's usage and parameter errors
        code = getattr(err, "exit_code", 1)
        hint = " (see 'shimmy --help')" if code == EXIT_BAD_INPUT else ""
        _fail(err.format_message() + hint, code, state)
    except ShimmyError as err:
        code = EXIT_BAD_INPUT if isinstance(err, InvalidRequest) else 1
        _fail(err.details or err.message, code, state)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(1)
    except OSError as err:
        _fail(str(err), 1, state)
    except Exception as err:
        _fail(f"unexpected {type(err).__name__}: {err}", 1, state)
    sys.exit(result if isinstance(result, int) else 0)

"""The flags every command shares, and how they become one ``Settings``.

Settings come from three layers, later ones winning: defaults, ``SHIMMY_*`` environment
variables, command-line flags. Only flags the user actually typed are passed on, so an unset
flag never hides an environment variable.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from shimmy.errors import InvalidRequest
from shimmy.logging_setup import configure_logging
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.registry import ModelRegistry

T = TypeVar("T")


@dataclass
class CliState:
    """Shared by the root callback and ``main``: whether to show tracebacks."""

    verbose: bool = False


class LogFormat(StrEnum):
    text = "text"
    json = "json"


_MODELS = "Models"
_ENGINE = "Engine"
_OTHER = "Logging and security"


def option(
    kind: Any, *names: str, panel: str, default: Any = None, **info: Any
) -> inspect.Parameter:
    """A keyword-only parameter carrying a Typer option, to splice into command signatures."""
    annotation = Annotated[kind, typer.Option(*names, rich_help_panel=panel, **info)]
    return inspect.Parameter(
        "_", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


_SEP = os.pathsep
_COMMON_OPTIONS: dict[str, inspect.Parameter] = {
    "model_dirs": option(str | None, "--model-dirs", metavar="DIRS", panel=_MODELS,
                          help=f"Extra folders or GGUF files to search, '{_SEP}'-separated"),
    "models_dir": option(Path | None, "--models-dir", panel=_MODELS,
                          help="shimmy's own models folder"),
    "model": option(str | None, "--model", "-m", metavar="PATH|ID", panel=_MODELS,
                     help="The model to use (served as 'default'): an id or a GGUF file"),
    "no_user_caches": option(bool, "--no-user-caches", default=False, panel=_MODELS,
                              help="Do not search the Hugging Face, Ollama and LM Studio folders"),
    "no_starter": option(bool, "--no-starter", default=False, panel=_MODELS,
                          help="Do not offer the bundled starter model"),
    "cache_dir": option(Path | None, "--cache-dir", panel=_MODELS, help="shimmy's cache folder"),
    "config": option(Path | None, "--config", panel=_MODELS,
                      help="TOML file with per-model options (aliases, context, sampling, LoRA)"),
    "ctx_size": option(int | None, "--ctx-size", "-c", panel=_ENGINE,
                        help="Context length per sequence"),
    "n_gpu_layers": option(int | None, "--n-gpu-layers", panel=_ENGINE,
                            help="Layers to offload to the GPU (default: all when supported)"),
    "threads": option(int | None, "--threads", "-t", panel=_ENGINE,
                       help="Decode threads (default: one per physical core)"),
    "threads_batch": option(int | None, "--threads-batch", panel=_ENGINE,
                             help="Prompt-processing threads"),
    "parallel": option(int | None, "--parallel", panel=_ENGINE,
                        help="Sequences decoded together per model"),
    "max_queue": option(int | None, "--max-queue", panel=_ENGINE,
                         help="Requests waiting for a slot before 'server busy'"),
    "batch_size": option(int | None, "--batch-size", "-b", panel=_ENGINE,
                          help="Max tokens per llama_decode call"),
    "no_prefix_cache": option(bool, "--no-prefix-cache", default=False, panel=_ENGINE,
                               help="Do not reuse the KV cache of a slot's previous prompt"),
    "cache_ram": option(int | None, "--cache-ram", metavar="MIB", panel=_ENGINE,
                         help="Host memory (MiB) per model for evicted conversations' KV "
                              "(0: off)"),
    "no_speculative": option(bool, "--no-speculative", default=False, panel=_ENGINE,
                              help="Do not draft tokens from the text's own n-grams"),
    "draft_max": option(int | None, "--draft-max", metavar="N", panel=_ENGINE,
                         help="Most draft tokens verified per step"),
    "swa_full": option(bool, "--swa-full", default=False, panel=_ENGINE,
                        help="Keep full KV for sliding-window layers (more memory)"),
    "api_key": option(list[str] | None, "--api-key", metavar="KEY", panel=_OTHER,
                       help="Accepted API key (repeatable)"),
    "log_format": option(LogFormat | None, "--log-format", panel=_OTHER,
                          help="Log line format on stderr"),
    "verbose": option(bool, "--verbose", "-v", default=False, panel=_OTHER,
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
    "cache_ram": "cache_ram",
    "draft_max": "draft_max",
    "api_key": "api_keys",
    "log_format": "log_format",
}
# "--no-x" switches -> the Settings field they turn off
_OFF_SWITCHES = {
    "no_user_caches": "scan_user_caches",
    "no_starter": "starter_model",
    "no_prefix_cache": "prefix_cache",
    "no_speculative": "speculative",
}
# "--x" switches -> the Settings field they turn on
_ON_SWITCHES = {"swa_full": "swa_full"}


@dataclass
class CommonOptions:
    """What the user typed of the shared flags, already named as Settings fields."""

    values: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False


def _common_from_flags(ctx: typer.Context | None, flags: dict[str, Any]) -> CommonOptions:
    values: dict[str, Any] = {}
    for flag, settings_field in _FLAG_FIELDS.items():
        value = flags[flag]
        if value is None or value == []:
            continue
        values[settings_field] = value.value if isinstance(value, Enum) else value
    for flag, settings_field in _OFF_SWITCHES.items():
        if flags[flag]:
            values[settings_field] = False
    for flag, settings_field in _ON_SWITCHES.items():
        if flags[flag]:
            values[settings_field] = True
    state = ctx.find_object(CliState) if ctx is not None else None
    verbose = bool(flags["verbose"]) or (state is not None and state.verbose)
    if state is not None:
        state.verbose = verbose  # main() prints tracebacks for -v given after the command too
    return CommonOptions(values, verbose)


def splice_options(
    receive_as: str,
    options: dict[str, inspect.Parameter],
    collect: Callable[[typer.Context | None, dict[str, Any]], Any],
    *,
    needs_context: bool = False,
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A decorator giving a command the flags in ``options``, declared once for many commands;
    the command receives ``collect(ctx, flags)`` as its ``receive_as`` argument.

    Typer reads a command's options from its signature, so the wrapper advertises the
    command's own parameters plus the spliced ones. Typer passes its context to one parameter
    only, so at most one of the stacked decorators may ask for it.
    """
    context_name = f"_typer_context_{receive_as}"

    def decorate(command: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != receive_as]
        spliced = [p.replace(name=name) for name, p in options.items()]
        if needs_context:
            kind = inspect.Parameter.KEYWORD_ONLY
            spliced.append(inspect.Parameter(context_name, kind, annotation=typer.Context))

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            flags = {name: kwargs.pop(name) for name in options}
            context = kwargs.pop(context_name) if needs_context else None
            return command(*args, **{receive_as: collect(context, flags)}, **kwargs)

        parameters = [*own, *spliced]
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters
        )
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


with_common_options = splice_options(
    "common", _COMMON_OPTIONS, _common_from_flags, needs_context=True
)
"""Give a command every shared settings flag; it receives them as ``common``."""


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


def discovered_registry(settings: Settings) -> ModelRegistry:
    from shimmy.registry import ModelRegistry

    registry = ModelRegistry(settings)
    registry.discover()
    return registry

"""The ``shimmy`` Typer application and its root options (``shimmy.cli.main`` adds the
commands)."""

from __future__ import annotations

from typing import Annotated

import typer

from shimmy import __version__
from shimmy.cli.options import CliState
from shimmy.diag import package_version

app = typer.Typer(
    name="shimmy",
    help="A fast, safe local server for GGUF language models, backed by llama.cpp.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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

"""The entry point: run the Typer app and turn every failure into one ``error: ...`` line.

A failure prints exactly one line on stderr (plus a traceback with ``-v``) and exits non-zero:
2 for bad input, 1 for everything else, 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

import typer

from shimmy.cli.app import app
from shimmy.cli.chat import chat
from shimmy.cli.generate import generate
from shimmy.cli.info import diag, list_models, probe
from shimmy.cli.manage import ps, pull, remove
from shimmy.cli.options import CliState
from shimmy.cli.serve import serve
from shimmy.errors import InvalidRequest, ShimmyError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# In the order `shimmy --help` lists them.
app.command()(serve)
app.command()(generate)
app.command()(chat)
app.command("list")(list_models)
app.command()(probe)
app.command()(diag)
app.command()(pull)
app.command("rm")(remove)
app.command()(ps)


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

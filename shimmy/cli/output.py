"""Where the CLI writes: stdout carries command output only, so ``shimmy generate`` composes
in pipelines; everything meant for the person at the terminal goes to stderr."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

PIPED_OUTPUT_WIDTH = 240


def stdout_console() -> Console:
    # Piped output (grep, a file) has no width to fit: don't truncate table cells to 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPED_OUTPUT_WIDTH if wide else None)


def tell(line: str) -> None:
    """A message for the person at the terminal, never part of the output."""
    print(line, file=sys.stderr, flush=True)


def write_stdout(text: str) -> None:
    """Write UTF-8 bytes whatever the locale says: generated text can be any character."""
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


def print_json(data: Any) -> None:
    write_stdout(json.dumps(data, ensure_ascii=False, indent=2) + "\n")

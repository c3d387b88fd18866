"""The ``shimmy`` command line: serve, generate, chat, list, probe, diag, pull, rm, ps.

One module per group of commands (each registers itself on the Typer ``app``), plus the shared
flags (``options``, ``sampling``), output helpers and in-process model loading.
"""

from shimmy.cli.app import app as app
from shimmy.cli.main import main as main
from shimmy.cli.serve import parse_bind

__all__ = ["app", "main", "parse_bind"]

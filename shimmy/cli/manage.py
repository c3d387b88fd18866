"""``shimmy pull``, ``rm`` and ``ps``: managing model files, and asking a running server what
it has loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from shimmy.cli.options import CommonOptions, build_settings, with_common_options
from shimmy.cli.output import print_json, stdout_console, tell, write_stdout
from shimmy.diag import format_size
from shimmy.errors import ModelNotFound, ServerError, ShimmyError
from shimmy.models.discovery import discover_models
from shimmy.models.pull import (
    PullError,
    PullEvent,
    PullProgress,
    PullSuccess,
    parse_source,
    pull_model,
)
from shimmy.models.remove import remove_model_files
from shimmy.models.safepath import validate_model_id
from shimmy.settings import Settings


def pull_with_progress(source: str, settings: Settings, console: Console) -> str:
    """Download ``source`` into the models folder, drawing a progress bar on ``console``
    (stderr); return the new model's id."""
    parsed = parse_source(source, param="source")

    async def run() -> PullEvent | None:
        last: PullEvent | None = None
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("pulling", total=None)
            async for event in pull_model(parsed, settings):
                last = event
                if isinstance(event, PullProgress):
                    progress.update(
                        task,
                        description=f"pulling {event.file}".strip(),
                        total=event.total,
                        completed=event.completed,
                    )
                elif event.status in ("verifying", "waiting"):
                    progress.update(task, description=event.status)
        return last

    last = asyncio.run(run())
    if isinstance(last, PullError):
        raise last.to_error()
    if not isinstance(last, PullSuccess):
        raise ServerError("the pull ended without a result")
    return last.id


def remove_local_model(model_id: str, settings: Settings) -> list[Path]:
    wanted = validate_model_id(model_id, param="id")
    entry = next((e for e in discover_models(settings) if e.id == wanted), None)
    if entry is None:
        raise ModelNotFound(f"Model '{wanted}' is not available")
    return remove_model_files(entry, settings)


def _headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}


def server_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return settings.model_copy(update={"host": host}).base_url


def loaded_on_server(
    settings: Settings, *, timeout: float = 0.5, get: Callable[..., httpx.Response] = httpx.get
) -> list[dict[str, Any]] | None:
    """What a shimmy server at the configured address has loaded; None if none answers."""
    try:
        response = get(
            f"{server_url(settings)}/api/models/loaded", headers=_headers(settings), timeout=timeout
        )
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        models = response.json()["models"]
    except (ValueError, KeyError, TypeError):
        return None
    return models if isinstance(models, list) else None


def require_loaded_on_server(settings: Settings) -> list[dict[str, Any]]:
    models = loaded_on_server(settings, timeout=5)
    if models is None:
        raise ShimmyError(f"no shimmy server answers at {server_url(settings)}")
    return models


@with_common_options
def pull(
    common: CommonOptions,
    source: Annotated[
        str, typer.Argument(help="hf://OWNER/REPO/FILE.gguf, or an http(s):// URL of a .gguf")
    ],
    allow_private_pull: Annotated[
        bool,
        typer.Option(
            "--allow-private-pull",
            help="Allow loopback, private and link-local addresses and plain http (a mirror)",
        ),
    ] = False,
) -> None:
    """Download a model into shimmy's models folder (resumable, verified)."""
    settings = build_settings(common, allow_private_pull=True if allow_private_pull else None)
    model_id = pull_with_progress(source, settings, Console(stderr=True))
    tell(f"pulled {model_id} into {settings.models_dir}")
    write_stdout(model_id + "\n")


@with_common_options
def remove(
    common: CommonOptions,
    model_id: Annotated[str, typer.Argument(metavar="ID", help="The model id to delete")],
) -> None:
    """Delete a model from shimmy's own models folder (never anything outside it)."""
    settings = build_settings(common)
    for path in remove_local_model(model_id, settings):
        tell(f"deleted {path}")


@with_common_options
def ps(
    common: CommonOptions,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the models a running shimmy server has loaded (at --bind / SHIMMY_HOST:PORT)."""
    settings = build_settings(common)
    models = require_loaded_on_server(settings)
    if as_json:
        print_json({"models": models})
        return
    if not models:
        tell(f"no models loaded at {server_url(settings)}")
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
    stdout_console().print(table)

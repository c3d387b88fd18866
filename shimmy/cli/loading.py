"""Loading a model in-process for the CLI, with a progress bar on a terminal."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from shimmy.engine.protocol import EngineHooks
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.registry import ModelRegistry


async def open_registry(settings: Settings) -> ModelRegistry:
    from shimmy.engine.local import LocalEngine
    from shimmy.registry import ModelRegistry

    # One command, one user, one model: a worker process would only add its start-up time.
    registry = ModelRegistry(settings, engine_factory=LocalEngine)
    await asyncio.to_thread(registry.discover)
    return registry


async def load_engine(
    registry: ModelRegistry, model: str | None, console: Console | None = None
) -> Engine:
    """The engine for ``model`` (the default model if None). While a model loads, a terminal
    shows a bar fed by llama.cpp's own load progress; pipes and files get nothing."""
    console = console or Console(stderr=True)
    entry = registry.resolve(model)
    if not console.is_terminal or registry.is_loaded(entry.id):
        return await registry.get_engine(entry.id)
    with Progress(
        TextColumn("loading {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(entry.id, total=1.0)

        def advance(model_id: str, fraction: float) -> None:
            # Called on the loading thread; rich's Progress takes its own lock.
            progress.update(task, completed=fraction)

        stop_observing = registry.observe(EngineHooks(on_load_progress=advance))
        try:
            return await registry.get_engine(entry.id)
        finally:
            stop_observing()

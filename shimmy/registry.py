"""ModelRegistry: which models exist, which are loaded, and loading them on demand.

Loading runs in a thread (it reads hundreds of MB) and happens once per model even when many
requests ask for it at the same moment; requests for other models are not blocked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shimmy.engine.engine import ModelEngine
from shimmy.errors import ModelNotFound, ModelUnusable
from shimmy.models.discovery import discover_models, entry_for_file
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelEntry, Settings], ModelEngine]


class ModelRegistry:
    def __init__(self, settings: Settings, engine_factory: EngineFactory = ModelEngine) -> None:
        self.settings = settings
        self._engine_factory = engine_factory
        self._entries: dict[str, ModelEntry] = {}
        self._default_id: str | None = None
        self._engines: dict[str, ModelEngine] = {}
        self._loading: dict[str, asyncio.Task[ModelEngine]] = {}
        self._lock = threading.Lock()  # guards _entries/_engines for readers in other threads

    # --- discovery -----------------------------------------------------------------------
    def discover(self) -> list[ModelEntry]:
        entries = discover_models(self.settings)
        with self._lock:
            self._entries = {e.id: e for e in entries}
            self._default_id = self._pick_default(entries)
        log.info("found %d model(s); default: %s", len(entries), self._default_id)
        return entries

    def _pick_default(self, entries: list[ModelEntry]) -> str | None:
        wanted = self.settings.default_model
        if wanted:
            by_id = self._match(wanted, entries)
            if by_id is not None:
                return by_id.id
            path = Path(wanted).expanduser()
            if path.is_file():
                entry = entry_for_file(path.absolute(), source="model_paths")
                taken = {e.id for e in entries}
                base, n = entry.id, 2
                while entry.id in taken:
                    entry.id, n = f"{base}-{n}", n + 1
                entries.insert(0, entry)
                self._entries[entry.id] = entry
                return entry.id
            raise ModelNotFound(f"default model '{wanted}' is neither a known id nor a file")
        usable = [e for e in entries if e.usable]
        return usable[0].id if usable else None

    @staticmethod
    def _match(wanted: str, entries: list[ModelEntry]) -> ModelEntry | None:
        for entry in entries:
            if entry.id == wanted or entry.id == wanted.lower():
                return entry
        candidate = Path(wanted).expanduser()
        if candidate.exists():
            for entry in entries:
                with contextlib.suppress(OSError):
                    if os.path.samefile(entry.path, candidate):
                        return entry
        return None

    @property
    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def default_id(self) -> str | None:
        return self._default_id

    def resolve(self, model: str | None) -> ModelEntry:
        with self._lock:
            if model is None or model == "" or model == "default":
                if self._default_id is None:
                    raise ModelNotFound(
                        "no model is available: put a GGUF file in the models folder or pass "
                        "--model-dirs",
                        message="No model is available",
                    )
                entry = self._entries[self._default_id]
            else:
                found = self._entries.get(model) or self._entries.get(model.lower())
                if found is None:
                    raise ModelNotFound(f"Model '{model[:200]}' is not available")
                entry = found
        if not entry.usable:
            raise ModelUnusable(f"model '{entry.id}' cannot be loaded: {entry.error}")
        return entry

    # --- loading ---------------------------------------------------------------------------
    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._engines

    def loaded_count(self) -> int:
        return len(self._engines)

    def loaded_engines(self) -> list[ModelEngine]:
        return list(self._engines.values())

    async def get_engine(self, model: str | None) -> ModelEngine:
        entry = self.resolve(model)
        engine = self._engines.get(entry.id)
        if engine is not None:
            engine.last_used = time.monotonic()
            return engine
        task = self._loading.get(entry.id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(entry))
            self._loading[entry.id] = task
            task.add_done_callback(lambda _t: self._loading.pop(entry.id, None))
        # shield: one impatient client that disconnects must not abort a load others wait for
        return await asyncio.shield(task)

    async def _load(self, entry: ModelEntry) -> ModelEngine:
        await self._make_room()
        log.info("loading %s from %s", entry.id, entry.path)
        engine = await asyncio.to_thread(self._engine_factory, entry, self.settings)
        log.info("loaded %s in %.2fs", entry.id, engine.load_seconds)
        self._engines[entry.id] = engine
        return engine

    async def _make_room(self) -> None:
        """Unload least-recently-used idle models beyond ``max_loaded_models``."""
        while len(self._engines) >= self.settings.max_loaded_models:
            idle = [e for e in self._engines.values() if e.in_flight == 0]
            if not idle:
                return  # everything is busy: load anyway rather than fail a user's request
            victim = min(idle, key=lambda e: e.last_used)
            await self.unload(victim.entry.id)

    async def unload(self, model_id: str) -> bool:
        engine = self._engines.pop(model_id, None)
        if engine is None:
            return False
        log.info("unloading %s", model_id)
        await asyncio.to_thread(engine.close)
        return True

    async def aclose(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for model_id in list(self._engines):
            await self.unload(model_id)

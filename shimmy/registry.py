"""ModelRegistry: which models exist, which are loaded, and loading them on demand.

Loading runs in a thread (it reads hundreds of MB) and happens once per model even when many
requests ask for it at the same moment; requests for other models are not blocked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from shimmy.engine.local import LocalEngine, estimate_memory
from shimmy.engine.protocol import Engine, EngineFactory, EngineHooks
from shimmy.engine.types import Usage
from shimmy.engine.worker import WorkerEngine
from shimmy.errors import (
    InsufficientMemory,
    ModelCrashed,
    ModelLoading,
    ModelNotFound,
    ModelUnusable,
)
from shimmy.models.config import ModelOptions, load_config
from shimmy.models.discovery import discover_models, entry_for_file
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

log = logging.getLogger(__name__)

# keep_alive 0 unloads a model as soon as it is idle; this grace keeps a request that has just
# looked the model up (and is rendering its prompt) from finding it gone.
IDLE_GRACE_SECONDS = 0.5


@dataclass
class ModelFailure:
    """Why a model's last worker died, shown in /api/models until it loads again."""

    reason: str
    at: float  # time.time()
    recent_crashes: int  # within the crash window

    def to_api(self) -> dict[str, Any]:
        return {"reason": self.reason, "at": self.at, "recent_crashes": self.recent_crashes}


class ModelRegistry:
    """Engines are used only through ``shimmy.engine.protocol.Engine``: ``engine_factory``
    may make them in this process or elsewhere. ``hooks`` hear every engine's events (finished
    generations, load progress); so do the observers added later with ``observe``. Without an
    ``engine_factory`` each model gets a worker process (``settings.model_workers``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory | None = None,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.settings = settings
        self.config = load_config(settings.config)
        if engine_factory is None:
            engine_factory = WorkerEngine if settings.model_workers else LocalEngine
        self._engine_factory = engine_factory
        self._crash_times: dict[str, list[float]] = {}
        self.failures: dict[str, ModelFailure] = {}
        self._condemned: dict[str, str] = {}  # model id -> why it is no longer loaded
        self._entries: dict[str, ModelEntry] = {}
        self._aliases = self.config.alias_map()
        self._default_id: str | None = None
        self._engines: dict[str, Engine] = {}
        self._loading: dict[str, asyncio.Task[Engine]] = {}
        self._lock = threading.Lock()  # guards _entries/_engines for readers in other threads
        self._reaper: asyncio.Task[None] | None = None
        self.load_counts: dict[str, int] = {}
        # Replaced, never changed in place: engine threads iterate it without a lock.
        self._observers: tuple[EngineHooks, ...] = (hooks,) if hooks is not None else ()
        self._wake_reaper: asyncio.Event | None = None

    # --- observers -------------------------------------------------------------------------
    def observe(self, hooks: EngineHooks) -> Callable[[], None]:
        """Let ``hooks`` hear every engine's events from now on, loaded engines included;
        returns the function that stops it. For observers that cannot exist before the
        registry (the app's metrics read the registry) or live shorter (the CLI's progress bar
        lives while one model loads). ``hooks.on_idle`` is not called."""
        self._observers = (*self._observers, hooks)

        def stop() -> None:
            self._observers = tuple(h for h in self._observers if h is not hooks)

        return stop

    def _tell(self, hook: str, *args: Any) -> None:
        """Call ``hook`` (an ``EngineHooks`` field name) of every observer that has it."""
        for hooks in self._observers:
            observer = getattr(hooks, hook)
            if observer is not None:
                try:
                    observer(*args)
                except Exception:  # one broken observer must not starve the others
                    log.exception("%s observer failed", hook)

    def _finished(
        self, model_id: str, usage: Usage, enqueued_at: float, first_token_at: float | None
    ) -> None:
        self._tell("on_finish", model_id, usage, enqueued_at, first_token_at)

    def _load_progress(self, model_id: str, fraction: float) -> None:
        self._tell("on_load_progress", model_id, fraction)

    # --- crashes ---------------------------------------------------------------------------
    def _crashed(self, model_id: str, reason: str) -> None:
        """A model's worker died (on the event loop). It is loaded again on the next request,
        unless it crashed ``crash_limit`` times within ``crash_window``: then it is unusable
        with the reason, rather than crash-looping."""
        now = time.monotonic()
        window = self.settings.crash_window
        times = [t for t in self._crash_times.get(model_id, []) if now - t < window]
        times.append(now)
        self._crash_times[model_id] = times
        self.failures[model_id] = ModelFailure(reason, time.time(), len(times))
        if len(times) >= self.settings.crash_limit:
            why = f"it crashed {len(times)} times within {window:g} s; last: {reason}"
            self._condemned[model_id] = why
            with self._lock:
                entry = self._entries.get(model_id)
                if entry is not None:
                    entry.error = why
            log.error("%s is now unusable: %s", model_id, why)
        self._tell("on_crash", model_id, reason)

    def _engine_crashed(self, model_id: str, reason: str) -> None:
        engine = self._engines.pop(model_id, None)
        self._crashed(model_id, reason)
        if engine is not None:  # reap its process without holding up the loop
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(engine.close))
            task.add_done_callback(lambda t: t.exception())

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        """``entry`` as the API lists it: loaded or not, and why its last worker died."""
        data = entry.to_api(loaded=self.is_loaded(entry.id))
        failure = self.failures.get(entry.id)
        if failure is not None:
            data["failure"] = failure.to_api()
        return data

    # --- discovery -----------------------------------------------------------------------
    def discover(self) -> list[ModelEntry]:
        entries = discover_models(self.settings)
        for entry in entries:  # a rescan does not forgive a model that crash-looped
            if entry.id in self._condemned:
                entry.error = self._condemned[entry.id]
        with self._lock:
            self._entries = {e.id: e for e in entries}
            self._default_id = self._pick_default(entries)
        log.info("found %d model(s); default: %s", len(entries), self._default_id)
        return entries

    def _pick_default(self, entries: list[ModelEntry]) -> str | None:
        wanted = self.settings.default_model
        if wanted:
            by_id = self._match(self._aliases.get(wanted, wanted), entries)
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
                wanted = self._aliases.get(model, model)
                found = self._entries.get(wanted) or self._entries.get(wanted.lower())
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

    def loaded_engines(self) -> list[Engine]:
        return list(self._engines.values())

    def loading_ids(self) -> list[str]:
        return list(self._loading)

    async def get_engine(
        self, model: str | None, *, keep_alive: float | None = None, wait: bool = True
    ) -> Engine:
        """The loaded engine for ``model``, loading it first if needed. ``keep_alive`` (seconds,
        0 = unload when idle, -1 = never) overrides the default for this model from now on, as
        Ollama's per-request keep_alive does. With ``wait=False`` a model that is still loading
        gives 503 model_loading instead of waiting."""
        entry = self.resolve(model)
        engine = self._engines.get(entry.id)
        if engine is not None:
            self._touch(engine, keep_alive)
            return engine
        task = self._loading.get(entry.id)
        if task is not None and not wait:
            raise ModelLoading(f"model '{entry.id}' is loading", retry_after=2)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(entry))
            self._loading[entry.id] = task
            task.add_done_callback(lambda _t: self._loading.pop(entry.id, None))
        # shield: one impatient client that disconnects must not abort a load others wait for
        engine = await asyncio.shield(task)
        self._touch(engine, keep_alive)
        return engine

    def _touch(self, engine: Engine, keep_alive: float | None) -> None:
        engine.last_used = time.monotonic()
        if keep_alive is not None:
            engine.keep_alive = keep_alive
            self._poke_reaper()

    async def _load(self, entry: ModelEntry) -> Engine:
        options = self.config.options_for(entry.id)
        await self._make_room(entry, options)
        log.info("loading %s from %s", entry.id, entry.path)
        loop = asyncio.get_running_loop()

        def idle(_model_id: str) -> None:  # called on the engine's worker thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._poke_reaper)

        def crashed(model_id: str, reason: str) -> None:  # called on the engine's thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._engine_crashed, model_id, reason)

        hooks = EngineHooks(
            on_finish=self._finished,
            on_idle=idle,
            on_load_progress=self._load_progress,
            on_crash=crashed,
        )
        load = functools.partial(self._engine_factory, entry, self.settings, options, hooks=hooks)
        try:
            engine = await asyncio.to_thread(load)
        except ModelCrashed as exc:
            self._crashed(entry.id, exc.details or exc.message)
            raise
        self.failures.pop(entry.id, None)
        self.load_counts[entry.id] = self.load_counts.get(entry.id, 0) + 1
        log.info("loaded %s in %.2fs", entry.id, engine.load_seconds)
        self._engines[entry.id] = engine
        self._poke_reaper()
        return engine

    def memory_budget(self) -> int:
        if self.settings.memory_budget is not None:
            return self.settings.memory_budget
        return int(psutil.virtual_memory().available * 0.9) + sum(
            e.memory_bytes for e in self._engines.values()
        )

    async def _make_room(self, entry: ModelEntry, options: ModelOptions) -> None:
        """Unload least-recently-used idle models until ``entry`` fits under both
        ``max_loaded_models`` and the memory budget; refuse rather than swap."""
        settings = self.settings.model_copy(update=options.settings_overrides())
        ctx = min(settings.ctx_size, entry.context_length or settings.ctx_size)
        needed = estimate_memory(entry, ctx * settings.parallel)
        budget = self.memory_budget()
        while True:
            used = sum(e.memory_bytes for e in self._engines.values())
            too_many = len(self._engines) >= self.settings.max_loaded_models
            too_big = used + needed > budget
            if not (too_many or too_big):
                return
            idle = [e for e in self._engines.values() if e.in_flight == 0]
            if not idle:
                if too_big:
                    raise InsufficientMemory(
                        f"loading '{entry.id}' needs about {needed / 2**30:.1f} GiB and the "
                        "loaded models are busy",
                        retry_after=5,
                    )
                return  # over the count but memory allows: serve rather than fail
            victim = min(idle, key=lambda e: e.last_used)
            await self.unload(victim.entry.id)
            if not self._engines and needed > budget:
                raise InsufficientMemory(
                    f"'{entry.id}' needs about {needed / 2**30:.1f} GiB but only "
                    f"{budget / 2**30:.1f} GiB may be used (memory_budget)"
                )

    # --- keep_alive ------------------------------------------------------------------------
    def start(self) -> None:
        """Start unloading idle models (call from the running event loop)."""
        if self._reaper is None:
            self._wake_reaper = asyncio.Event()
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    def _poke_reaper(self) -> None:
        if self._wake_reaper is not None:
            self._wake_reaper.set()

    def _expiry(self, engine: Engine) -> float | None:
        if engine.keep_alive < 0:
            return None
        return engine.last_used + max(engine.keep_alive, IDLE_GRACE_SECONDS)

    async def _reap_idle(self) -> None:
        assert self._wake_reaper is not None
        while True:
            now = time.monotonic()
            for engine in list(self._engines.values()):
                expiry = self._expiry(engine)
                if expiry is not None and expiry <= now and engine.in_flight == 0:
                    await self.unload(engine.entry.id)
            pending = [
                x for x in (self._expiry(e) for e in self._engines.values()) if x is not None
            ]
            timeout = max(0.05, min(pending) - time.monotonic()) if pending else None
            self._wake_reaper.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_reaper.wait(), timeout)

    async def unload(self, model_id: str) -> bool:
        engine = self._engines.pop(model_id, None)
        if engine is None:
            return False
        log.info("unloading %s", model_id)
        await asyncio.to_thread(engine.close)
        return True

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for task in list(self._loading.values()):
            task.cancel()
        for model_id in list(self._engines):
            await self.unload(model_id)

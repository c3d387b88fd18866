"""WorkerEngine: a model served by a worker process of its own, behind ``Engine``.

The server keeps what does not touch llama.cpp: the chat template (rendered from the GGUF's
header text), admission (it knows every request it sent), keep_alive. Everything that reads
the vocabulary or the weights happens in the worker, so an input that makes llama.cpp abort
ends that worker only. One reader thread per worker turns its messages into stream events and
call results; a worker that dies fails them all with ``ModelCrashed`` and tells the registry.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from shimmy.engine.local import chat_template_for
from shimmy.engine.protocol import EngineHooks, Stream
from shimmy.engine.stream import GenerationStream
from shimmy.engine.types import EmbeddingResult, FimTokens, Finished, GenerationRequest
from shimmy.engine.worker import wire
from shimmy.errors import ModelCrashed, ServerBusy, ShimmyError
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
STOP_TIMEOUT = 30.0  # seconds a worker may take to free its model before it is killed
# Lines of a dying worker's log that say why, in the order they are looked for.
_REASON_MARKERS = ("GGML_ASSERT", "what():", "terminate called", "error", "Error")
_BUILD_PATH = re.compile(r"/\S*/(?=[\w.-]+:\d+: )")


class WorkerEngine:
    """Implements ``shimmy.engine.protocol.Engine``. Made (blocking) in a thread; returns once
    the worker has loaded the model, or raises what the load raised (``ModelCrashed`` when
    the worker died doing it)."""

    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        options: ModelOptions | None = None,
        *,
        hooks: EngineHooks | None = None,
    ) -> None:
        self._hooks = hooks or EngineHooks()
        self.options = options or ModelOptions()
        self.entry = entry
        self.settings = settings.model_copy(update=self.options.settings_overrides())
        self.template = chat_template_for(entry, self.options, self.settings)
        self.keep_alive = self.settings.keep_alive
        self.last_used = time.monotonic()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the tables below and the socket's writes
        self._streams: dict[int, GenerationStream] = {}
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._stats: dict[str, Any] = {}
        self._rejected_busy = 0
        self._closing = False
        self._dead: ModelCrashed | None = None
        self._ready = threading.Event()
        self._load_error: ShimmyError | None = None
        self._facts: dict[str, Any] = {}
        self._log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

        ours, theirs = socket.socketpair()
        self._socket = ours
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shimmy.engine.worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C in the server's terminal must not reach it before the
            # server has drained its requests (it ignores SIGINT/SIGTERM as well).
            start_new_session=True,
            # ggml's abort would attach gdb to print a backtrace: seconds, and pages of log.
            env={**os.environ, "GGML_NO_BACKTRACE": "1"}
            if self.settings.log_level != "debug"
            else None,
        )
        theirs.close()
        self._log_reader = threading.Thread(
            target=self._read_log, name=f"worker-log-{entry.id}", daemon=True
        )
        self._log_reader.start()
        self._reader = threading.Thread(target=self._read, name=f"worker-{entry.id}", daemon=True)
        self._reader.start()
        # The worker applies the overrides itself (LocalEngine does), so it gets the originals.
        self._send("start", entry, settings.model_dump(mode="json"), self.options.model_dump())
        self._ready.wait()
        if self._load_error is not None:
            self._closing = True
            self._send("close")
            self._stop_process()
            raise self._load_error
        facts = self._facts
        self.n_ctx: int = facts["n_ctx"]
        self.n_parallel: int = facts["n_parallel"]
        self.n_gpu_layers: int = facts["n_gpu_layers"]
        self.load_seconds: float = facts["load_seconds"]
        self.loaded_at: float = facts["loaded_at"]
        self.memory_bytes: int = facts["memory_bytes"]
        self.fim_tokens: FimTokens | None = facts["fim_tokens"]
        self.eog_tokens: tuple[int, ...] = tuple(facts["eog_tokens"])
        self.pid: int = facts["pid"]

    # --- requests --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Stream:
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[Stream]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._closing:
                raise ServerBusy("the model is being unloaded", retry_after=1)
            # Admission here, where every request is known, so that a full engine answers 503
            # at once; the worker's scheduler applies the same limit.
            waiting = len(self._streams)
            if waiting + len(requests) > self.n_parallel + self.settings.max_queue:
                self._rejected_busy += 1
                raise ServerBusy(
                    f"all {self.n_parallel} slots are busy and "
                    f"{max(0, waiting - self.n_parallel)} requests are waiting",
                    retry_after=1,
                )
            ids = [next(self._ids) for _ in requests]
            streams = []
            for request_id in ids:
                stream = GenerationStream(loop, functools.partial(self._cancel, request_id))
                self._streams[request_id] = stream
                streams.append(stream)
            self.last_used = time.monotonic()
            self._send_locked("submit", ids, requests)
        return [*streams]

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._streams and self._dead is None:
                self._send_locked("cancel", request_id)

    # --- calls -----------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            call_id = next(self._ids)
            self._calls[call_id] = future
            self._send_locked("call", call_id, method, list(args))
        return future

    async def _acall(self, method: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._call(method, *args))

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        result: list[int] = await self._acall("tokenize", text, add_special)
        return result

    async def tokenize_literal(self, texts: list[str]) -> list[list[int]]:
        result: list[list[int]] = await self._acall("tokenize_literal", texts)
        return result

    async def detokenize(self, tokens: list[int]) -> str:
        result: str = await self._acall("detokenize", tokens)
        return result

    def count_tokens(self, text: str, *, add_special: bool = True) -> int:
        # Blocks for one round trip: only for callers that cannot await (the terminal chat).
        result: int = self._call("count_tokens", text, add_special).result(STOP_TIMEOUT)
        return result

    async def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult:
        result: EmbeddingResult = await self._acall("embed", list(texts))
        return result

    # --- state -----------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def stats(self) -> dict[str, Any]:
        in_flight = len(self._streams)
        stats = dict(self._stats)
        stats.update(
            busy=min(in_flight, self.n_parallel),
            queued=max(0, in_flight - self.n_parallel),
            rejected_busy=stats.get("rejected_busy", 0) + self._rejected_busy,
            worker_pid=self.pid,
        )
        return stats

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._dead is None:
                with contextlib.suppress(OSError):
                    self._send_locked("close")
        self._stop_process()
        self._fail_everything(ServerBusy("the model was unloaded", retry_after=1))

    # --- the worker's side -----------------------------------------------------------------
    def _send(self, *message: Any) -> None:
        with self._lock:
            self._send_locked(*message)

    def _send_locked(self, *message: Any) -> None:
        # A worker that is gone: the reader sees its end of file and fails what is waiting.
        with contextlib.suppress(OSError):
            self._socket.sendall(wire.pack(list(message)))

    def _read(self) -> None:
        unpacker = wire.unpacker()
        while True:
            try:
                data = self._socket.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            unpacker.feed(data)
            for message in unpacker:
                try:
                    self._dispatch(*message)
                except Exception:  # a broken hook must not stop the model's messages
                    log.exception("handling a message from %s's worker failed", self.entry.id)
        self._worker_ended()

    def _dispatch(self, kind: str, *args: Any) -> None:
        if kind == "event":
            request_id, event = args
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.push(event)
                if isinstance(event, Finished):
                    self._end(request_id)
        elif kind == "fail":
            request_id, error = args
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.push(error)
                self._end(request_id)
        elif kind in ("result", "error"):
            call_id, value = args
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is not None:
                if kind == "result":
                    future.set_result(value)
                else:
                    future.set_exception(value)
        elif kind == "finished":
            if self._hooks.on_finish is not None:
                self._hooks.on_finish(self.entry.id, *args)
        elif kind == "stats":
            self._stats = args[0]
        elif kind == "progress":
            if self._hooks.on_load_progress is not None:
                self._hooks.on_load_progress(self.entry.id, args[0])
        elif kind == "ready":
            self._facts = args[0]
            self._ready.set()
        elif kind == "load_failed":
            self._load_error = args[0]
            self._ready.set()

    def _end(self, request_id: int) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            idle = not self._streams
        self.last_used = time.monotonic()
        if idle and self._hooks.on_idle is not None:
            self._hooks.on_idle(self.entry.id)

    def _read_log(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._log_tail.append(line)
                log.warning("[%s worker] %s", self.entry.id, line)

    def _worker_ended(self) -> None:
        """The worker's socket closed: it exited, by request or not."""
        if self._closing:
            return
        code = self._wait_exit(5.0)
        self._log_reader.join(timeout=5.0)
        reason = self._reason(code)
        crash = ModelCrashed(reason)
        loading = not self._ready.is_set()
        with self._lock:
            self._dead = crash
        log.error("the worker of %s ended: %s", self.entry.id, reason)
        if loading:
            self._load_error = crash
            self._ready.set()
            return
        self._fail_everything(crash)
        if self._hooks.on_crash is not None:
            self._hooks.on_crash(self.entry.id, reason)

    def _reason(self, code: int | None) -> str:
        if code is None:
            how = "stopped answering"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        lines = list(self._log_tail)
        said = next(
            (line for marker in _REASON_MARKERS for line in reversed(lines) if marker in line),
            lines[-1] if lines else "",
        )
        # ggml names its sources by the path they were built at: a temporary folder.
        said = _BUILD_PATH.sub("", said)[-500:]
        return f"the model's worker process {how}" + (f": {said}" if said else "")

    def _fail_everything(self, error: ShimmyError) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        for stream in streams.values():
            stream.push(error)
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        if streams and self._hooks.on_idle is not None:
            self._hooks.on_idle(self.entry.id)

    def _wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _stop_process(self) -> None:
        if self._wait_exit(STOP_TIMEOUT) is None:
            log.warning("the worker of %s did not stop; killing it", self.entry.id)
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):  # wakes the reader if it still waits
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._reader.join(timeout=5.0)
        self._log_reader.join(timeout=5.0)

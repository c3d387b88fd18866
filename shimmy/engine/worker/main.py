"""The model worker process: ``python -m shimmy.engine.worker FD``.

It loads one model into a ``LocalEngine`` and serves it over the socket ``FD`` (see ``wire``).
It exits as soon as that socket reaches end of file: the server closed it or died (even by
SIGKILL, since only the server holds the other end), so a worker is never orphaned. SIGINT and
SIGTERM are ignored: a terminal's Ctrl-C or a service manager reaches the whole process group,
and the server, which drains its requests first, is the one to stop its workers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from shimmy.engine.local import LocalEngine
from shimmy.engine.protocol import EngineHooks, Stream
from shimmy.engine.types import Finished, GenerationRequest, Usage
from shimmy.engine.worker import wire
from shimmy.errors import GenerationFailed, ServerError, ShimmyError
from shimmy.models.config import ModelOptions
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings

log = logging.getLogger("shimmy.worker")


class WorkerServer:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._engine: LocalEngine | None = None
        self._streams: dict[int, Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, *message: Any) -> None:
        self._writer.write(wire.pack(list(message)))

    def send_threadsafe(self, *message: Any) -> None:
        self._loop.call_soon_threadsafe(self.send, *message)

    async def load(self, entry: ModelEntry, settings: Settings, options: ModelOptions) -> None:
        def finished(_model: str, usage: Usage, enqueued: float, first: float | None) -> None:
            self.send_threadsafe("finished", usage, enqueued, first)

        hooks = EngineHooks(
            on_finish=finished,
            on_load_progress=lambda _model, fraction: self.send_threadsafe("progress", fraction),
        )
        make = functools.partial(LocalEngine, entry, settings, options, hooks=hooks)
        try:
            engine = await asyncio.to_thread(make)
        except ShimmyError as exc:
            self.send("load_failed", exc)
            return
        except Exception as exc:
            log.exception("loading %s failed", entry.id)
            self.send("load_failed", ServerError(str(exc) or type(exc).__name__))
            return
        self._engine = engine
        self.send(
            "ready",
            {
                "n_ctx": engine.n_ctx,
                "n_parallel": engine.n_parallel,
                "n_gpu_layers": engine.n_gpu_layers,
                "load_seconds": engine.load_seconds,
                "loaded_at": engine.loaded_at,
                "memory_bytes": engine.memory_bytes,
                "fim_tokens": engine.fim_tokens,
                "eog_tokens": engine.eog_tokens,
                "pid": os.getpid(),
            },
        )
        self.send("stats", engine.stats())

    def submit(self, ids: list[int], requests: list[GenerationRequest]) -> None:
        assert self._engine is not None
        try:
            streams = self._engine.submit_many(requests)
        except ShimmyError as exc:
            for request_id in ids:
                self.send("fail", request_id, exc)
            return
        for request_id, stream in zip(ids, streams, strict=True):
            self._streams[request_id] = stream
            self._spawn(self._relay(request_id, stream))

    async def _relay(self, request_id: int, stream: Stream) -> None:
        try:
            async for event in stream:
                self.send("event", request_id, event)
                if isinstance(event, Finished):
                    break
                await self._writer.drain()
        except ShimmyError as exc:
            self.send("fail", request_id, exc)
        except Exception as exc:
            log.exception("generation failed")
            self.send("fail", request_id, GenerationFailed(str(exc) or type(exc).__name__))
        finally:
            self._streams.pop(request_id, None)
            if self._engine is not None:
                self.send("stats", self._engine.stats())

    def cancel(self, request_id: int) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def call(self, call_id: int, method: str, args: Sequence[Any]) -> None:
        self._spawn(self._answer(call_id, method, args))

    async def _answer(self, call_id: int, method: str, args: Sequence[Any]) -> None:
        engine = self._engine
        assert engine is not None
        try:
            if method == "tokenize":
                result: Any = await engine.tokenize(args[0], add_special=args[1])
            elif method == "tokenize_literal":
                result = await engine.tokenize_literal(args[0])
            elif method == "detokenize":
                result = await engine.detokenize(args[0])
            elif method == "count_tokens":
                result = await asyncio.to_thread(engine.count_tokens, args[0], add_special=args[1])
            elif method == "embed":
                result = await engine.embed(args[0])
            else:
                raise ServerError(f"a model worker has no method {method!r}")
        except ShimmyError as exc:
            self.send("error", call_id, exc)
        except Exception as exc:
            log.exception("%s failed", method)
            self.send("error", call_id, ServerError(str(exc) or type(exc).__name__))
        else:
            self.send("result", call_id, result)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.drain()


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    server = WorkerServer(writer)
    unpacker = wire.unpacker()
    loading: asyncio.Task[None] | None = None
    while True:
        data = await reader.read(1 << 16)
        if not data:  # the server is gone: nobody is left to answer
            os._exit(0)
        unpacker.feed(data)
        for kind, *args in unpacker:
            if kind == "start":
                entry, settings, options = args
                settings = Settings.model_validate(settings)
                # The server relays each line as a warning: only what is worth one, unless
                # debugging.
                debug = settings.log_level == "debug"
                logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)
                loading = asyncio.get_running_loop().create_task(
                    server.load(entry, settings, ModelOptions.model_validate(options))
                )
            elif kind == "submit":
                server.submit(*args)
            elif kind == "cancel":
                server.cancel(args[0])
            elif kind == "call":
                server.call(*args)
            elif kind == "close":
                if loading is not None:
                    await loading
                await server.close()
                os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # stderr is read by the server, which keeps its last lines as the reason if this dies.
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(args[0]))
    asyncio.run(serve(sock))

"""``/ws/generate``: many generations over one WebSocket connection.

Each text frame holding a JSON object with the ``/api/generate`` fields is a request (with
``prefix``/``suffix`` it fills in the middle). The server sends ``{"token": ...}`` per piece of
text and ends each request with ``{"done": true, "finish_reason", "usage"}``, or with
``{"error": {...}}`` (the connection stays open either way).

Without an ``id``, requests are answered one after another, in the order they arrived.
``{"cancel": true}`` stops the one that is running; it then ends with
``{"done": true, "finish_reason": "cancelled", ...}``. A cancel that arrives while nothing is
running is ignored, because it has usually just crossed paths with the final frame of the
generation it meant to stop. At most ``MAX_PENDING_FRAMES`` requests may wait; a client sending
more is closed with 1008 (policy violation).

With an ``id`` (a string or an integer), a request runs at once, alongside the others, and
every frame answering it carries its ``id``; ``{"cancel": true, "id": ...}`` stops that one.
A request with the ``id`` of one still running replaces it (cancel-and-replace): that one ends
with ``finish_reason`` "cancelled" before the new one's first frame. At most
``MAX_IN_FLIGHT`` may run at once; a client starting more is closed with 1008.

A dedicated task reads frames for the whole life of the connection, so a cancel (or the client
going away) is noticed while tokens are being sent.

Memory: the requests a connection has sent and not yet had answered (waiting or running) may
hold at most ``ws_max_queued_bytes`` of frames. A request past that is not kept: it is answered
at once (in its turn, without an ``id``) with the error ``server_busy``, and the connection stays
open, so a client can send it again once earlier ones are answered. A connection holding
nothing always takes one frame (up to ``ws_max_message_bytes``).

Shutdown: on SIGTERM the requests a connection has already sent are answered (their tokens and
done frame) within the grace period; new ones are refused with ``server_shutting_down``; what is
still running when the grace ends gets an error frame ``server_shutting_down``; then the
connection is closed with 1012 (service restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from shimmy.api.errors import ws_error_frame
from shimmy.api.native.protocol import GenerateRequest, parse_generate_request
from shimmy.api.protocol.common import parse_json
from shimmy.api.routing import websocket_route
from shimmy.engine.types import Finished, TextDelta
from shimmy.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServerBusy,
    ShimmyError,
    ShuttingDown,
    unexpected_error,
)
from shimmy.server.heap import trim_heap
from shimmy.serving.defaults import Dialect
from shimmy.serving.drain import Drain, Key, current_drain
from shimmy.serving.lanes import Lane, Lanes
from shimmy.serving.prepare import prepare
from shimmy.serving.run import frames, start

if TYPE_CHECKING:
    from shimmy.registry import ModelRegistry
    from shimmy.settings import Settings

logger = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 32
MAX_IN_FLIGHT = 32
MAX_ID_CHARS = 128
POLICY_VIOLATION = 1008

RequestId = str | int

# A connection that held this many bytes of frames gives the freed memory back when it ends.
TRIM_AFTER_BYTES = 1 << 20

# Sending to a client that has gone away raises one of these, depending on the server.
_SEND_FAILURES = (WebSocketDisconnect, RuntimeError, OSError)


class _ClientGone(Exception):
    """A send failed: the client has closed the connection."""


class _Disconnected:
    """Queue marker: the client closed the connection."""


@dataclass(frozen=True)
class _Frame:
    """A decoded frame: a request, an error to report, or a cancel; ``id`` None: in order."""

    id: RequestId | None = None
    request: GenerateRequest | None = None
    error: ShimmyError | None = None
    cancel: bool = False
    size: int = 0  # bytes of the frame, counted against ws_max_queued_bytes while it is held


class WsFrames:
    """``{"token"}`` frames, then ``{"done", "finish_reason", "usage"}`` or ``{"error"}``; each
    with the request's ``id`` when it has one."""

    def __init__(self, tag: Mapping[str, Any]) -> None:
        self.tag = tag

    def opening(self) -> Iterable[dict[str, Any]]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[dict[str, Any]]:
        return ({**self.tag, "token": event.text},) if event.text else ()

    def finished(self, event: Finished) -> Iterable[dict[str, Any]]:
        usage = event.usage.as_dict()
        return ({**self.tag, "done": True, "finish_reason": event.finish_reason, "usage": usage},)

    def error(self, err: ShimmyError) -> Iterable[dict[str, Any]]:
        return ({**self.tag, **ws_error_frame(err)},)

    def closing(self) -> Iterable[dict[str, Any]]:
        return ()


@dataclass
class _Connection:
    websocket: WebSocket
    settings: Settings
    registry: ModelRegistry
    key: Key | None  # the client's address: how the server's drain knows this connection
    drain: Drain = field(default_factory=current_drain)
    pending: asyncio.Queue[tuple[GenerateRequest, int] | ShimmyError | _Disconnected] = field(
        default_factory=asyncio.Queue
    )
    held_bytes: int = 0  # frames of requests received and not yet answered
    peak_bytes: int = 0
    job: Lane | None = None  # the request without an id being run
    closed: bool = False  # set by the reader: queued requests are then dropped, not run
    lanes: Lanes = field(default_factory=Lanes)  # requests with an id, by id
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read_frames())
        try:
            while True:
                item = await self.pending.get()
                if isinstance(item, _Disconnected) or self.closed:
                    return
                if isinstance(item, ShimmyError):
                    try:
                        await self._send(ws_error_frame(item))
                    finally:
                        self.drain.release(self.key)
                    continue
                request, size = item
                del item  # the frame's memory goes once it is answered
                self.job = Lane()
                try:
                    await self._run(request, self.job, {})
                finally:
                    self.job = None
                    del request
                    self._let_go(size)
        except _ClientGone:
            return
        finally:
            self._cancel_everything()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _let_go(self, size: int) -> None:
        self.held_bytes -= size
        self.drain.release(self.key)

    def _cancel_everything(self) -> None:
        if self.job is not None:
            self.job.cancel()
        self.lanes.cancel_all()

    async def _send(self, frame: dict[str, Any]) -> None:
        # Several requests answer at once: a frame goes out whole before the next one starts.
        async with self.send_lock:
            try:
                await self.websocket.send_json(frame)
            except _SEND_FAILURES as exc:
                raise _ClientGone from exc

    async def _run(self, request: GenerateRequest, lane: Lane, tag: Mapping[str, Any]) -> None:
        try:
            engine = await self.registry.get_engine(request.model, keep_alive=request.keep_alive)
            prepared = await prepare(engine, request.to_input(), Dialect.NATIVE, self.settings)
            started = await start(engine, prepared)
            lane.attach(started.stream)
            async for frame in frames(started, WsFrames(tag)):
                await self._send(frame)
        except ShimmyError as err:
            await self._send({**tag, **ws_error_frame(err)})
        except _ClientGone:
            raise
        except Exception as exc:
            await self._send({**tag, **ws_error_frame(unexpected_error(exc))})
        finally:
            lane.cancel()

    async def _run_tagged(self, request_id: RequestId, request: GenerateRequest, size: int) -> None:
        try:
            # Typed keys: the ids 1 and "1" are two requests.
            async with self.lanes.holding((type(request_id).__name__, request_id)) as lane:
                with contextlib.suppress(_ClientGone):  # the reader sees the disconnect too
                    await self._run(request, lane, {"id": request_id})
        finally:
            self._let_go(size)

    async def _send_tagged_error(self, request_id: RequestId, err: ShimmyError) -> None:
        try:
            with contextlib.suppress(_ClientGone):
                await self._send({"id": request_id, **ws_error_frame(err)})
        finally:
            self.drain.release(self.key)

    async def _read_frames(self) -> None:
        """Read every frame of the connection: cancel at once, start or queue the rest.

        However reading ends, the main task is told, so it never waits for frames forever.
        """
        try:
            await self._read_until_closed()
        except Exception:
            logger.exception("reading WebSocket frames failed")
        finally:
            self.closed = True
            self._cancel_everything()
            self.pending.put_nowait(_Disconnected())

    async def _read_until_closed(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = self._admit(self._decode(message))
            if frame.cancel:
                if frame.id is None:
                    if self.job is not None:
                        self.job.cancel()
                else:
                    self.lanes.cancel((type(frame.id).__name__, frame.id))
                continue
            if frame.id is not None:
                if not self._spawn(frame):
                    await self._close_for_policy("too many requests in flight")
                    return
                continue
            if self.pending.qsize() >= MAX_PENDING_FRAMES:
                await self._close_for_policy("too many pending requests")
                return
            self.drain.hold(self.key)
            if frame.request is not None:
                self._take(frame.size)
                self.pending.put_nowait((frame.request, frame.size))
            else:
                self.pending.put_nowait(frame.error or InvalidRequest())

    def _admit(self, frame: _Frame) -> _Frame:
        """``frame``, or an error in its place when the connection may not take it: the server
        is shutting down, or its bytes would take the connection past ws_max_queued_bytes."""
        if frame.request is None:
            return frame
        if self.drain.closing:
            return _Frame(id=frame.id, error=ShuttingDown("no new requests are taken"))
        cap = self.settings.ws_max_queued_bytes
        if self.held_bytes and self.held_bytes + frame.size > cap:
            err = ServerBusy(
                f"this connection's unanswered requests already hold {self.held_bytes} bytes "
                f"(ws_max_queued_bytes: {cap}); send it again once some are answered",
                retry_after=1,
            )
            return _Frame(id=frame.id, error=err)
        return frame

    def _take(self, size: int) -> None:
        self.held_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _spawn(self, frame: _Frame) -> bool:
        """Start answering a frame with an id; False when too many are in flight already."""
        assert frame.id is not None
        if len(self.tasks) >= MAX_IN_FLIGHT:
            return False
        self.drain.hold(self.key)
        if frame.request is not None:
            self._take(frame.size)
            work = self._run_tagged(frame.id, frame.request, frame.size)
        else:
            work = self._send_tagged_error(frame.id, frame.error or InvalidRequest())
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _close_for_policy(self, reason: str) -> None:
        with contextlib.suppress(*_SEND_FAILURES):
            await self.websocket.close(POLICY_VIOLATION, reason)

    def _decode(self, message: Mapping[str, Any]) -> _Frame:
        text = message.get("text")
        if text is None:
            return _Frame(
                error=InvalidRequest("Binary frames are not accepted; send JSON as a text frame")
            )
        limit = self.settings.ws_max_message_bytes
        # isascii() is O(1) on CPython's compact strings: encode only when it can matter.
        size = len(text) if text.isascii() else len(text.encode())
        if size > limit:
            return _Frame(error=PayloadTooLarge(f"A frame may hold at most {limit} bytes"))
        try:
            data = parse_json(text)
        except ShimmyError as err:
            return _Frame(error=err)
        request_id: RequestId | None = None
        if isinstance(data, dict) and "id" in data:
            try:
                request_id = _request_id(data["id"])
            except ShimmyError as err:
                return _Frame(error=err)  # with an unusable id it is answered in order
        if isinstance(data, dict) and data.get("cancel") is True:
            return _Frame(id=request_id, cancel=True)
        try:
            return _Frame(id=request_id, request=parse_generate_request(data), size=size)
        except ShimmyError as err:
            return _Frame(id=request_id, error=err)


def _request_id(value: Any) -> RequestId:
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    raise InvalidRequest(
        f"'id' must be a string of 1 to {MAX_ID_CHARS} characters or an integer", param="id"
    )


async def ws_generate(websocket: WebSocket) -> None:
    await websocket.accept()
    app_state = websocket.app.state
    client = websocket.scope.get("client")
    key = (str(client[0]), int(client[1])) if client else None
    connection = _Connection(websocket, app_state.settings, app_state.registry, key)
    try:
        await connection.serve()
    finally:
        connection.drain.forget(key)
    with contextlib.suppress(*_SEND_FAILURES):
        await websocket.close()
    if connection.peak_bytes >= TRIM_AFTER_BYTES:
        await asyncio.to_thread(trim_heap)


routes: list[BaseRoute] = [
    websocket_route(
        "/ws/generate",
        ws_generate,
        summary="Many generations over one connection",
        description="Takes `/api/generate` requests as JSON text frames (`prefix`/`suffix` fill "
        'in the middle) and answers `{"token": ...}` frames, then `{"done": true, '
        '"finish_reason", "usage"}` or `{"error": {"code", "message"}}`; `{"cancel": true}` '
        "stops the running generation. Requests are answered in order, except those with an "
        "`id`: they run at once, side by side, their frames carry the `id`, "
        '`{"cancel": true, "id": ...}` stops one, and a request reusing the `id` of a running '
        "one replaces it. With a rate limit, each request takes a token.",
        tags=["native"],
    )
]

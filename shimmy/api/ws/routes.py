"""``/ws/generate``: many generations over one WebSocket connection.

Each text frame holding a JSON object with the ``/api/generate`` fields is a request; requests
are answered one after another, in the order they arrived. The server sends ``{"token": ...}``
per piece of text and ends each request with ``{"done": true, "finish_reason", "usage"}``, or
with ``{"error": {...}}`` (the connection stays open either way).

``{"cancel": true}`` stops the generation that is running; it then ends with
``{"done": true, "finish_reason": "cancelled", ...}``. A cancel that arrives while nothing is
running is ignored, because it has usually just crossed paths with the final frame of the
generation it meant to stop. Requests sent while one is running wait their turn; at most
``MAX_PENDING_FRAMES`` may wait, a client sending more is closed with 1008 (policy violation).

A dedicated task reads frames for the whole life of the connection, so a cancel (or the client
going away) is noticed while tokens are being sent; everything is sent from the main task.
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
from shimmy.errors import InvalidRequest, PayloadTooLarge, ShimmyError, unexpected_error
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare
from shimmy.serving.run import frames, start

if TYPE_CHECKING:
    from shimmy.engine.protocol import Stream
    from shimmy.registry import ModelRegistry
    from shimmy.settings import Settings

logger = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 32
POLICY_VIOLATION = 1008

# Sending to a client that has gone away raises one of these, depending on the server.
_SEND_FAILURES = (WebSocketDisconnect, RuntimeError, OSError)


class _ClientGone(Exception):
    """A send failed: the client has closed the connection."""


class _Disconnected:
    """Queue marker: the client closed the connection."""


@dataclass
class _Job:
    """The generation being run; the reader cancels it from its own task."""

    stream: Stream | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()

    def attach(self, stream: Stream) -> None:
        self.stream = stream
        if self.cancelled:  # cancelled while the model was loading or the prompt rendering
            stream.cancel()


class WsFrames:
    """``{"token"}`` frames, then ``{"done", "finish_reason", "usage"}`` or ``{"error"}``."""

    def opening(self) -> Iterable[dict[str, Any]]:
        return ()

    def delta(self, event: TextDelta) -> Iterable[dict[str, Any]]:
        return ({"token": event.text},) if event.text else ()

    def finished(self, event: Finished) -> Iterable[dict[str, Any]]:
        usage = event.usage.as_dict()
        return ({"done": True, "finish_reason": event.finish_reason, "usage": usage},)

    def error(self, err: ShimmyError) -> Iterable[dict[str, Any]]:
        return (ws_error_frame(err),)

    def closing(self) -> Iterable[dict[str, Any]]:
        return ()


@dataclass
class _Connection:
    websocket: WebSocket
    settings: Settings
    registry: ModelRegistry
    pending: asyncio.Queue[GenerateRequest | ShimmyError | _Disconnected] = field(
        default_factory=asyncio.Queue
    )
    job: _Job | None = None
    closed: bool = False  # set by the reader: queued requests are then dropped, not run

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read_frames())
        try:
            while True:
                item = await self.pending.get()
                if isinstance(item, _Disconnected) or self.closed:
                    return
                if isinstance(item, ShimmyError):
                    await self._send(ws_error_frame(item))
                    continue
                await self._run(item)
        except _ClientGone:
            return
        finally:
            if self.job is not None:
                self.job.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _send(self, frame: dict[str, Any]) -> None:
        try:
            await self.websocket.send_json(frame)
        except _SEND_FAILURES as exc:
            raise _ClientGone from exc

    async def _run(self, request: GenerateRequest) -> None:
        job = self.job = _Job()
        try:
            engine = await self.registry.get_engine(request.model, keep_alive=request.keep_alive)
            prepared = await prepare(engine, request.to_input(), Dialect.NATIVE, self.settings)
            started = await start(engine, prepared)
            job.attach(started.stream)
            async for frame in frames(started, WsFrames()):
                await self._send(frame)
        except ShimmyError as err:
            await self._send(ws_error_frame(err))
        except _ClientGone:
            raise
        except Exception as exc:
            await self._send(ws_error_frame(unexpected_error(exc)))
        finally:
            self.job = None
            job.cancel()

    async def _read_frames(self) -> None:
        """Read every frame of the connection: cancel at once, queue everything else.

        However reading ends, the main task is told, so it never waits for frames forever.
        """
        try:
            await self._read_until_closed()
        except Exception:
            logger.exception("reading WebSocket frames failed")
        finally:
            self.closed = True
            if self.job is not None:
                self.job.cancel()
            self.pending.put_nowait(_Disconnected())

    async def _read_until_closed(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            item = self._decode(message)
            if item is None:
                if self.job is not None:
                    self.job.cancel()
                continue
            if self.pending.qsize() >= MAX_PENDING_FRAMES:
                with contextlib.suppress(*_SEND_FAILURES):
                    await self.websocket.close(POLICY_VIOLATION, "too many pending requests")
                return
            self.pending.put_nowait(item)

    def _decode(self, message: Mapping[str, Any]) -> GenerateRequest | ShimmyError | None:
        """A frame as a request, an error to report, or None for a cancel."""
        text = message.get("text")
        if text is None:
            return InvalidRequest("Binary frames are not accepted; send JSON as a text frame")
        limit = self.settings.ws_max_message_bytes
        # len(text) <= byte length <= 4 * len(text): encode only when it can matter.
        if len(text) > limit or (4 * len(text) > limit and len(text.encode()) > limit):
            return PayloadTooLarge(f"A frame may hold at most {limit} bytes")
        try:
            data = parse_json(text)
            if isinstance(data, dict) and data.get("cancel") is True:
                return None
            return parse_generate_request(data)
        except ShimmyError as err:
            return err


async def ws_generate(websocket: WebSocket) -> None:
    await websocket.accept()
    app_state = websocket.app.state
    connection = _Connection(websocket, app_state.settings, app_state.registry)
    await connection.serve()
    with contextlib.suppress(*_SEND_FAILURES):
        await websocket.close()


routes: list[BaseRoute] = [
    websocket_route(
        "/ws/generate",
        ws_generate,
        summary="Many generations over one connection",
        description="Takes `/api/generate` requests as JSON text frames and answers "
        '`{"token": ...}` frames, then `{"done": true, "finish_reason", "usage"}` or '
        '`{"error": {"code", "message"}}`; `{"cancel": true}` stops the running generation. '
        "Requests are answered in order; with a rate limit, each takes a token.",
        tags=["native"],
    )
]

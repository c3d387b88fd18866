"""Server-sent events: encoding and a response that notices when the client leaves.

``EventStreamResponse`` sends the events of an async iterator while, concurrently, listening
for the client's disconnect. Whichever happens first, the iterator is closed with ``aclose()``
before the response returns, so generators can release their work (cancel an engine stream) in
a ``finally`` block, deterministically, even while they are waiting for the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies buffer responses unless told not to, which defeats streaming.
    "X-Accel-Buffering": "no",
}


def sse_event(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One ``data:`` event holding ``data`` as compact JSON (UTF-8, no ASCII escaping), named
    ``event`` when given (Anthropic's and the Responses API's streams name every event)."""
    named = f"event: {event}\n".encode() if event is not None else b""
    return (
        named
        + b"data: "
        + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


class EventStreamResponse(Response):
    """A pure ASGI ``text/event-stream`` response over an async iterator of encoded events.

    The iterator must not raise for expected failures: errors that happen once streaming has
    begun are the iterator's to report as events. Anything it does raise is logged and ends the
    stream (the status line is already sent, so there is nothing better to do).
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: Mapping[str, str] | None = None,
        *,
        media_type: str = "text/event-stream",
    ) -> None:
        # Other line-oriented streams (NDJSON, plain text) need the same disconnect handling.
        self.events = events
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            for task in (pump, watch):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # The pump may have been cancelled mid-iteration; closing the generator runs its
            # ``finally`` now rather than whenever it is garbage-collected.
            await self.events.aclose()

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            return  # the client went away while we were writing
        except Exception:
            logger.exception("event stream failed after the response started")
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client closes the connection (call only once the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

"""A floor rate for request bodies: a client that sends its body too slowly gets 408.

The rule is Apache mod_reqtimeout's: the body must be complete before ``body_timeout`` seconds
plus one second per ``body_min_rate`` bytes received, counted from the app's first read. So a
fast body is never cut, a large one earns its time as it arrives, and a client sending a byte
now and then (which resets any per-read timeout) is cut after about ``body_timeout`` seconds.

It is measured here, while the app waits in ``receive()``, rather than in the protocol, so the
408 is an ordinary ``ShimmyError`` answered in the dialect of the path. The answer carries
``Connection: close``: the rest of the body is not worth waiting for, and the server's
lingering close lets the client read the answer.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shimmy.errors import RequestTimeout


class BodyRateMiddleware:
    def __init__(self, app: ASGIApp, grace: float, min_rate: int) -> None:
        self.app = app
        self.grace = grace
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: float | None = None
        received = 0
        complete = False
        timed_out = False

        async def timed_receive() -> Message:
            nonlocal started, received, complete, timed_out
            if complete:  # later reads only wait for a disconnect, which may take forever
                return await receive()
            now = time.monotonic()
            if started is None:
                started = now
            remaining = started + self.grace + received / self.min_rate - now
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise RequestTimeout(
                    f"the request body arrived slower than {self.min_rate} bytes per second"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        await self.app(scope, timed_receive, closing_send)

"""uvicorn's httptools protocol with the guards uvicorn lacks: a deadline for the request head,
a cap on open connections, and a lingering close.

- **Head deadline.** A connection must deliver a whole request head within ``header_timeout``
  of opening (or of its previous response): trickling one byte a second does not extend it.
  uvicorn itself only times out connections that are idle *after* a response.
- **Connection cap.** Past ``cap`` open connections, a new one makes room by closing the
  connection that has waited longest for its request head (an idle keep-alive or a slow
  client: neither has work in flight). When every connection is busy, the new one is answered
  503 ``server_busy`` once its head arrives, and beyond a small overflow it is closed at once:
  the descriptors it would need are the ones the server keeps for itself.
- **Lingering close.** When the server closes while the client is still sending its body (a
  413 or 408 answer before the body was read), a plain close makes the kernel reset the
  connection, and clients that send the whole body before reading (Python's urllib and
  requests) lose the answer. As nginx does, the write side is shut first and what the client
  still sends is read and thrown away, bounded in bytes and time, before the socket is closed.

The body's floor rate is kept by ``shimmy.api.body_rate`` in the app, which can answer in the
dialect of the path. This class relies on uvicorn's ``HttpToolsProtocol`` internals (its parser
callbacks, ``cycle``, ``flow``, ``server_state``); uvicorn is pinned to a range that has them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shimmy.api.errors import native_error_body
from shimmy.errors import RequestTimeout, ServerBusy, ShimmyError

# What a lingering close reads and discards at most before closing anyway.
LINGER_MAX_BYTES = 64 << 20
LINGER_SECONDS = 10.0
# Connections past the cap that may still wait for their head to be answered 503.
OVERFLOW = 16


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    cap: int


def plain_error_response(err: ShimmyError, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response for ``err`` in the native error shape, ending the
    connection: what is sent when there is no request (yet) to take a dialect from."""
    body = json.dumps(native_error_body(err)).encode()
    lines = [
        f"HTTP/1.1 {err.status} {_REASONS.get(err.status, '')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


class LingeringTransport(asyncio.Transport):
    """The transport uvicorn's code is given: everything goes to the socket's transport, but
    ``close`` asks the protocol first, which lingers while the request body is still coming."""

    def __init__(self, raw: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        super().__init__()
        self.raw = raw
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_politely()

    def is_closing(self) -> bool:
        return self.raw.is_closing() or self._protocol.lingering

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.raw.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.raw.writelines(list_of_data)

    def write_eof(self) -> None:
        self.raw.write_eof()

    def can_write_eof(self) -> bool:
        return self.raw.can_write_eof()

    def abort(self) -> None:
        self.raw.abort()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.raw.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.raw.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module docstring. ``limits`` is set on a subclass per server (``for_limits``):
    uvicorn creates protocols from a class and its own arguments only."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits(header_timeout=10.0, cap=1024)

    @classmethod
    def for_limits(cls, limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
        return type("GuardedHttpProtocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lingering = False
        self._raw: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None  # waiting for a request head since then
        self._head_started = False  # some bytes of that head have arrived
        self._body_open = False  # a request body is still arriving
        self._over_capacity = False  # answer 503 when the head arrives
        self._discarded = 0

    # --- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without deriving from it.
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        super().connection_made(LingeringTransport(raw, self))
        self._wait_for_head()
        open_now = len(self.connections)
        if open_now <= self.limits.cap:
            return
        victim = self._longest_waiting()
        if victim is not None:
            victim._give_up(evicted=True)
        elif open_now > self.limits.cap + OVERFLOW:
            raw.close()  # no descriptor to spare even for an answer
        else:
            self._over_capacity = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _longest_waiting(self) -> GuardedHttpProtocol | None:
        waiting = [
            connection
            for connection in self.connections
            if isinstance(connection, GuardedHttpProtocol)
            and connection is not self
            and connection._waiting_since is not None
            and not connection.transport.is_closing()
        ]
        return min(waiting, key=lambda c: c._waiting_since or 0.0, default=None)

    # --- the request head --------------------------------------------------------------------

    def _wait_for_head(self) -> None:
        self._cancel_head_timer()
        self._waiting_since = self.loop.time()
        self._head_started = False
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._give_up)

    def _give_up(self, *, evicted: bool = False) -> None:
        """The head did not come in time, or this waiting connection makes room for a new one:
        close it, telling a client that had started a request why."""
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if self._head_started:
            err: ShimmyError = (
                ServerBusy("the server has too many open connections", retry_after=1)
                if evicted
                else RequestTimeout(
                    f"the request head did not arrive within {self.limits.header_timeout:g}s"
                )
            )
            raw.write(plain_error_response(err))
        raw.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES and self._raw is not None:
                self._raw.close()
            return
        if self._waiting_since is not None:
            self._head_started = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._waiting_since = None
        self._body_open = True
        if self._over_capacity:
            self.app = _over_capacity_app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_open = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        answered = self.cycle is not None and self.cycle.response_complete
        if self._body_open and answered and not self.transport.is_closing():
            # Answered before its body was read (413, 408): the rest of it is not worth
            # parsing, and reading it to its end is unbounded. (With a pipelined request
            # waiting, the open body is that one's, which still has its answer to come.)
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait_for_head()  # for the next request on this keep-alive connection

    def handle_websocket_upgrade(self) -> None:
        # A WebSocket lives by its own rules (pings, message limits) and on the raw transport.
        self._cancel_timers()
        self._waiting_since = None
        self._body_open = False
        if self._raw is not None:
            self.transport = self._raw
        super().handle_websocket_upgrade()

    # --- closing -----------------------------------------------------------------------------

    def close_politely(self) -> None:
        raw = self._raw
        if raw is None or raw.is_closing() or self.lingering:
            return
        if not self._body_open or not raw.can_write_eof():
            raw.close()
            return
        self.lingering = True
        self._cancel_head_timer()
        raw.resume_reading()
        raw.write_eof()  # the answer goes out first, then FIN; reading goes on
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, raw.close)

    def eof_received(self) -> None:
        if self.lingering and self._raw is not None:
            self._raw.close()
        return None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None


async def _over_capacity_app(scope: Any, receive: Any, send: Any) -> None:
    """The answer of a connection that came when every connection had work in flight."""
    from starlette.requests import HTTPConnection

    from shimmy.api.errors import error_response

    err = ServerBusy("the server has too many open connections", retry_after=1)
    response = error_response(err, HTTPConnection(scope), {"Connection": "close"})
    await response(scope, receive, send)

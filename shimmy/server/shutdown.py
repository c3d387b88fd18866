"""Graceful shutdown for every transport, on top of uvicorn's.

On SIGTERM uvicorn stops accepting, lets HTTP responses run on for ``timeout_graceful_shutdown``
and then cancels what is left; a WebSocket, though, it closes with 1012 at once, whatever it is
in the middle of. Here:

- a WebSocket connection with requests to answer is closed (1012) only once they are answered
  (``DrainingWebSocketProtocol``); new requests meanwhile are refused with an error frame;
- when the grace runs out every generation still streaming is cut and ends with its dialect's
  error event (``server_shutting_down``), and uvicorn's own deadline comes ``CUT_MARGIN``
  later, so that those final frames are written before it cancels anything.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from shimmy.serving.drain import current_drain

# Time after the cut for the error frames to be written and the connections to close.
CUT_MARGIN = 2


class DrainingWebSocketProtocol(WebSocketsSansIOProtocol):
    def shutdown(self) -> None:
        drain = current_drain()
        drain.closing = True
        client = self.client
        if self.handshake_complete and not self.close_sent and drain.busy(client):
            assert client is not None
            drain.when_idle(client, self._shutdown_now)
            return
        super().shutdown()

    def _shutdown_now(self) -> None:
        if not self.disconnected:
            super().shutdown()


class DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = current_drain()
        drain.closing = True
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if grace is not None:
            timer = asyncio.get_running_loop().call_later(grace, drain.cut_all)
            self.config.timeout_graceful_shutdown = int(grace + CUT_MARGIN)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()
            self.config.timeout_graceful_shutdown = grace

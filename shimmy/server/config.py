"""The one uvicorn configuration, for ``shimmy serve`` and the tests' servers alike.

- The HTTP protocol is ``GuardedHttpProtocol`` (head deadline, connection cap, lingering close);
  the WebSocket one is ``DrainingWebSocketProtocol`` and the server a ``DrainingServer``
  (graceful shutdown for WebSockets too, ``shimmy.server.shutdown``).
- Forwarded headers (``X-Forwarded-For``/``-Proto``) are believed only from the proxies in
  ``forwarded_allow_ips``. uvicorn's default believes them from loopback peers, so any local
  process (or a proxy that passes the header through) could pick the address the rate limiter,
  the failed-key limit and the access log see.
- The connection cap is ``max_connections``, lowered to fit the process's descriptor limit:
  past it, accept() would fail with EMFILE and asyncio would stop accepting for a second at a
  time, so that nobody, /api/health included, could connect.
"""

from __future__ import annotations

import resource
from typing import Any

import uvicorn

from shimmy.server.protocol import OVERFLOW, ConnectionLimits, GuardedHttpProtocol
from shimmy.server.shutdown import DrainingWebSocketProtocol
from shimmy.settings import Settings

# Descriptors kept for everything but client connections: the listening sockets, model files,
# the event loop, log files, the sockets of a pull.
FD_RESERVE = 64


def connection_cap(settings: Settings) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, soft - FD_RESERVE - OVERFLOW))


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's Config for ``app`` under ``settings``; ``options`` are passed on (logging,
    lifespan, graceful shutdown)."""
    limits = ConnectionLimits(header_timeout=settings.header_timeout, cap=connection_cap(settings))
    trusted = settings.forwarded_allow_ips
    return uvicorn.Config(
        app,
        http=GuardedHttpProtocol.for_limits(limits),
        # websockets' sans-I/O protocol (the legacy one is deprecated), closing a connection on
        # shutdown only once its requests are answered.
        ws=DrainingWebSocketProtocol,
        # Compression would make the bytes on the wire no measure of memory: a frame of a few
        # KiB inflates to MiBs, and every frame read in one go is inflated and queued before
        # reading pauses. Without it the socket's flow control bounds what the server holds.
        ws_per_message_deflate=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=list(trusted) if trusted else None,
        server_header=False,
        **options,
    )

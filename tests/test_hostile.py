"""Hostile clients and hostile files against one real server.

Dozens of malformed, oversized, out-of-range, unauthorized and cross-site requests, requests
for broken GGUF files and garbage WebSocket frames all hit the same module-scoped server; each
must get its documented status and error code, and the last test checks that the server still
serves a normal request afterwards. Two more tests run servers of their own: a client that
stops reading a long stream is ended by ``request_timeout``, and SIGTERM lets a running stream
finish before the process exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings, run_server, ws_url
from conftest import ws_receive as ws_frame
from tiny_gguf import write_tiny_gguf
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

API_KEY = "hostile-suite-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ALLOWED_ORIGIN = "http://app.example"
MAX_BODY = 64 * 1024
WS_MAX_MESSAGE = 16 * 1024
MAX_TOKENS_CAP = 24
CTX_SIZE = 256

BROKEN_MODELS = ("empty", "garbage", "truncated", "badversion", "hugecount", "noweights")


def write_broken_models(folder: Path, good: Path) -> None:
    """GGUF files that are broken in different ways, next to a good one."""
    data = good.read_bytes()
    (folder / "empty.gguf").write_bytes(b"")
    (folder / "garbage.gguf").write_bytes(os.urandom(4096))
    (folder / "truncated.gguf").write_bytes(data[:3000])  # ends inside the vocabulary
    (folder / "badversion.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    # Counts that would make a naive reader allocate or loop for ages.
    (folder / "hugecount.gguf").write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 1 << 62) + bytes(64)
    )
    (folder / "noweights.gguf").write_bytes(data[: len(data) // 2])  # header fine, tensors cut


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("hostile")
    models = tmp / "models"
    models.mkdir()
    write_tiny_gguf(models / "tiny.gguf")
    write_broken_models(models, models / "tiny.gguf")
    settings = isolated_settings(
        models,
        tmp,
        api_keys=[API_KEY],
        # Dozens of deliberate 401s come from this one address; the lockout after failed keys
        # has tests of its own (test_hardening_http.py).
        auth_failures_per_minute=1000,
        cors_origins=[ALLOWED_ORIGIN],
        default_model="tiny",
        max_body_bytes=MAX_BODY,
        ws_max_message_bytes=WS_MAX_MESSAGE,
        max_tokens_cap=MAX_TOKENS_CAP,
        ctx_size=CTX_SIZE,
        parallel=2,
        threads=1,
    )
    with run_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(hostile_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_server, timeout=60) as http:
        yield http


# --- HTTP cases ---------------------------------------------------------------------------------

_UNSET = object()


@dataclass(frozen=True)
class Hostile:
    method: str
    path: str
    status: int
    code: str
    json: Any = _UNSET
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True


def gen(**body: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", "max_tokens": 4, **body}


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}


def deeply_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


G = "/api/generate"
C = "/v1/chat/completions"
BAD = "invalid_request"

CASES = {
    # malformed bodies
    "truncated-json": Hostile("POST", G, 400, BAD, content=b'{"prompt": '),
    "json-array": Hostile("POST", G, 400, BAD, json=[1, 2]),
    "json-string": Hostile("POST", G, 400, BAD, json="hello"),
    "empty-body": Hostile("POST", G, 400, BAD, content=b""),
    "bad-utf8": Hostile("POST", G, 400, BAD, content=b'{"prompt": "\xff\xfe\xfd"}'),
    "lone-surrogate": Hostile("POST", G, 400, BAD, content=b'{"prompt": "\\ud800"}'),
    "nul-in-json": Hostile("POST", G, 400, BAD, content=b'{"prompt":\x00 "x"}'),
    "deep-nesting": Hostile("POST", G, 400, BAD, content=deeply_nested(20_000)),
    # wrong types
    "prompt-number": Hostile("POST", G, 400, BAD, json=gen(prompt=5)),
    "max-tokens-string": Hostile("POST", G, 400, BAD, json=gen(max_tokens="50")),
    "max-tokens-float": Hostile("POST", G, 400, BAD, json=gen(max_tokens=4.5)),
    "stream-string": Hostile("POST", G, 400, BAD, json=gen(stream="yes")),
    "messages-content-number": Hostile(
        "POST", G, 400, BAD, json={"messages": [{"role": "user", "content": 5}]}
    ),
    "model-object": Hostile("POST", G, 400, BAD, json=gen(model={"$ne": 1})),
    "stop-too-many": Hostile("POST", G, 400, BAD, json=gen(stop=[f"s{i}" for i in range(100)])),
    "prompt-and-messages": Hostile(
        "POST", G, 400, BAD, json=gen(messages=[{"role": "user", "content": "x"}])
    ),
    "no-prompt": Hostile("POST", G, 400, BAD, json={"model": "tiny"}),
    "empty-messages": Hostile("POST", G, 400, BAD, json={"messages": []}),
    "keep-alive-word": Hostile("POST", G, 400, BAD, json=gen(keep_alive="forever")),
    # out-of-range numbers
    "temperature-nan": Hostile("POST", G, 400, BAD, content=b'{"prompt": "x", "temperature": NaN}'),
    "temperature-inf": Hostile(
        "POST", G, 400, BAD, content=b'{"prompt": "x", "temperature": Infinity}'
    ),
    "top-p-minus-inf": Hostile("POST", G, 400, BAD, content=b'{"prompt": "x", "top_p": -Infinity}'),
    "temperature-negative": Hostile("POST", G, 400, BAD, json=gen(temperature=-1)),
    "temperature-huge": Hostile("POST", G, 400, BAD, json=gen(temperature=1e308)),
    "top-p-above-one": Hostile("POST", G, 400, BAD, json=gen(top_p=1.5)),
    "top-k-negative": Hostile("POST", G, 400, BAD, json=gen(top_k=-5)),
    "top-k-beyond-c-int": Hostile("POST", G, 400, BAD, json=gen(top_k=2**40)),
    "penalty-zero": Hostile("POST", G, 400, BAD, json=gen(repetition_penalty=0)),
    "seed-negative": Hostile("POST", G, 400, BAD, json=gen(seed=-1)),
    "seed-beyond-u64": Hostile("POST", G, 400, BAD, json=gen(seed=2**70)),
    "max-tokens-zero": Hostile("POST", G, 400, BAD, json=gen(max_tokens=0)),
    "max-tokens-negative": Hostile("POST", G, 400, BAD, json=gen(max_tokens=-1)),
    # sizes
    "prompt-beyond-context": Hostile(
        "POST", G, 400, "context_length_exceeded", json=gen(prompt="word " * 5000)
    ),
    "body-over-limit": Hostile(
        "POST", G, 413, "payload_too_large", json=gen(prompt="x" * (MAX_BODY + 1))
    ),
    "messages-beyond-context": Hostile(
        "POST",
        C,
        400,
        "context_length_exceeded",
        json=chat(messages=[{"role": "user", "content": "word " * 5000}]),
    ),
    # models
    "unknown-model": Hostile("POST", G, 404, "model_not_found", json=gen(model="no-such")),
    "traversal-model-in-body": Hostile(
        "POST", G, 404, "model_not_found", json=gen(model="../../../etc/passwd")
    ),
    **{
        f"broken-model-{name}": Hostile("POST", G, 422, "model_unusable", json=gen(model=name))
        for name in BROKEN_MODELS
    },
    "broken-model-load": Hostile("POST", "/api/models/garbage/load", 422, "model_unusable"),
    "broken-model-openai": Hostile("POST", C, 422, "model_unusable", json=chat(model="truncated")),
    "broken-model-retrieve": Hostile("GET", "/v1/models/hugecount", 422, "model_unusable"),
    # path traversal in ids (percent-encoded so the client does not resolve the dots itself)
    "load-traversal": Hostile("POST", "/api/models/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/load", 400, BAD),
    "unload-traversal": Hostile("POST", "/api/models/..%2Fsecret/unload", 400, BAD),
    "load-absolute": Hostile("POST", "/api/models/%2Fetc%2Fpasswd/load", 400, BAD),
    "load-nul": Hostile("POST", "/api/models/tiny%00/load", 400, BAD),
    "load-dotfile": Hostile("POST", "/api/models/.hidden/load", 400, BAD),
    "load-backslash": Hostile("POST", "/api/models/..%5C..%5Cx/load", 400, BAD),
    "delete-traversal": Hostile("DELETE", "/api/models/%2E%2E%2Fsecret", 400, BAD),
    "delete-unknown": Hostile("DELETE", "/api/models/no-such-model", 404, "model_not_found"),
    "load-body-not-object": Hostile("POST", "/api/models/tiny/load", 400, BAD, json=[1]),
    # OpenAI dialect
    "openai-truncated-json": Hostile("POST", C, 400, BAD, content=b'{"messages": ['),
    "openai-no-messages": Hostile("POST", C, 400, BAD, json={"model": "tiny"}),
    "openai-temperature-3": Hostile("POST", C, 400, BAD, json=chat(temperature=3)),
    "openai-n-17": Hostile("POST", C, 400, BAD, json=chat(n=17)),
    "openai-bad-role": Hostile(
        "POST", C, 400, BAD, json=chat(messages=[{"role": "root", "content": "x"}])
    ),
    "openai-image-part": Hostile(
        "POST",
        C,
        400,
        BAD,
        json=chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
    ),
    "openai-unknown-model": Hostile("POST", C, 404, "model_not_found", json=chat(model="nope")),
    "openai-token-prompt-outside-vocabulary": Hostile(
        "POST", "/v1/completions", 400, BAD, json={"model": "tiny", "prompt": [1, 2, 10**6]}
    ),
    "openai-mixed-token-prompt": Hostile(
        "POST", "/v1/completions", 400, BAD, json={"model": "tiny", "prompt": [[1, "x"]]}
    ),
    # Anthropic dialect
    "anthropic-no-max-tokens": Hostile(
        "POST",
        "/v1/messages",
        400,
        "invalid_request_error",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
    ),
    "anthropic-image-block": Hostile(
        "POST",
        "/v1/messages",
        400,
        "invalid_request_error",
        json={
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
        },
    ),
    # Responses API
    "responses-unknown-previous": Hostile(
        "POST",
        "/v1/responses",
        404,
        "not_found",
        json={"model": "tiny", "input": "x", "previous_response_id": "resp_nope"},
    ),
    "openai-empty-embeddings": Hostile(
        "POST", "/v1/embeddings", 400, BAD, json={"model": "tiny", "input": []}
    ),
    "openai-body-over-limit": Hostile(
        "POST", C, 413, "payload_too_large", content=b"x" * (MAX_BODY + 1)
    ),
    # routing
    "wrong-method": Hostile("GET", G, 405, "method_not_allowed"),
    "unknown-endpoint": Hostile("GET", "/api/secrets", 404, "not_found"),
    # keys
    "no-key": Hostile("POST", G, 401, "unauthorized", json=gen(), auth=False),
    "wrong-key": Hostile(
        "POST",
        G,
        401,
        "unauthorized",
        json=gen(),
        auth=False,
        headers={"Authorization": "Bearer not-the-key"},
    ),
    "key-prefix": Hostile(
        "POST",
        G,
        401,
        "unauthorized",
        json=gen(),
        auth=False,
        headers={"Authorization": f"Bearer {API_KEY[:-1]}"},
    ),
    "basic-auth": Hostile(
        "GET",
        "/api/models",
        401,
        "unauthorized",
        auth=False,
        headers={"Authorization": f"Basic {API_KEY}"},
    ),
    "wrong-x-api-key": Hostile(
        "GET", "/v1/models", 401, "unauthorized", auth=False, headers={"X-Api-Key": "nope"}
    ),
    "no-key-openai": Hostile("POST", C, 401, "unauthorized", json=chat(), auth=False),
    "no-key-admin": Hostile("POST", "/api/models/tiny/unload", 401, "unauthorized", auth=False),
    "no-key-delete": Hostile("DELETE", "/api/models/tiny", 401, "unauthorized", auth=False),
    # hosts (DNS rebinding) and origins (cross-site pages)
    "rebinding-host": Hostile(
        "POST", G, 403, "forbidden", json=gen(), headers={"Host": "evil.example"}
    ),
    "rebinding-host-with-port": Hostile(
        "GET", "/v1/models", 403, "forbidden", headers={"Host": "evil.example:11435"}
    ),
    "host-userinfo": Hostile(
        "GET", "/api/models", 403, "forbidden", headers={"Host": "evil.example@localhost"}
    ),
    "host-lookalike": Hostile(
        "GET", "/api/models", 403, "forbidden", headers={"Host": "localhost.evil.example"}
    ),
    "host-on-health": Hostile(
        "GET", "/api/health", 403, "forbidden", headers={"Host": "evil.example"}
    ),
    "foreign-origin": Hostile(
        "POST", G, 403, "forbidden", json=gen(), headers={"Origin": "https://evil.example"}
    ),
    "null-origin": Hostile("POST", G, 403, "forbidden", json=gen(), headers={"Origin": "null"}),
    "foreign-origin-openai": Hostile(
        "POST", C, 403, "forbidden", json=chat(), headers={"Origin": "http://evil.example"}
    ),
    "foreign-preflight": Hostile(
        "OPTIONS",
        C,
        403,
        "forbidden",
        auth=False,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    ),
    "origin-prefix-of-allowed": Hostile(
        "GET", "/api/models", 403, "forbidden", headers={"Origin": ALLOWED_ORIGIN + ".evil.io"}
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_request_gets_its_error(client: httpx.Client, case: Hostile) -> None:
    headers = {**(AUTH if case.auth else {}), **case.headers}
    kwargs: dict[str, Any] = {"headers": headers}
    if case.json is not _UNSET:
        kwargs["json"] = case.json
    elif case.content is not None:
        kwargs["content"] = case.content
    response = client.request(case.method, case.path, **kwargs)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    error = body["error"]
    if case.path.startswith("/v1/messages"):
        # Anthropic's shape: the error's type is what the other dialects call its code.
        assert body["type"] == "error" and set(error) == {"type", "message"}
        assert error["type"] == case.code
    elif case.path.startswith("/v1/"):
        assert error["code"] == case.code
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert error["code"] == case.code
        assert set(error) == {"code", "message", "details"}
    assert "Traceback" not in response.text and API_KEY not in response.text
    if case.status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert "access-control-allow-origin" not in response.headers


def test_chunked_body_over_the_limit_is_cut(hostile_server: str) -> None:
    # No Content-Length: the limit must hold while the body streams in.
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * (MAX_BODY // 4)

    # A connection of its own: the server closes it after refusing the rest of the body, and
    # the shared client could pick that closing connection for the next test's request.
    with httpx.Client(base_url=hostile_server, timeout=60) as own:
        response = own.post(G, content=chunks(), headers=AUTH)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("max_tokens", [10**6, 2**64, 10**40])
def test_huge_max_tokens_is_clamped_not_refused(client: httpx.Client, max_tokens: int) -> None:
    response = client.post(G, json=gen(max_tokens=max_tokens), headers=AUTH)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS_CAP


def test_key_in_x_api_key_header_is_accepted(client: httpx.Client) -> None:
    response = client.post(G, json=gen(), headers={"X-Api-Key": API_KEY})
    assert response.status_code == 200, response.text


def test_health_needs_no_key(client: httpx.Client) -> None:
    assert client.get("/api/health").status_code == 200


def test_broken_models_are_listed_as_unusable(client: httpx.Client) -> None:
    models = {m["id"]: m for m in client.get("/api/models", headers=AUTH).json()["models"]}
    assert models["tiny"]["usable"] is True
    for name in BROKEN_MODELS:
        assert models[name]["usable"] is False and models[name]["error"]
    openai_ids = {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert openai_ids == {"tiny"}


# --- WebSocket ----------------------------------------------------------------------------------


def ws_final(ws: ClientConnection) -> dict[str, Any]:
    """Skip token frames; return the done or error frame that ends a request."""
    while "token" in (frame := ws_frame(ws)):
        pass
    return frame


@pytest.mark.parametrize(
    ("headers", "origin", "status"),
    [
        pytest.param({}, None, 401, id="no-key"),
        pytest.param({"Authorization": "Bearer wrong"}, None, 401, id="wrong-key"),
        pytest.param(AUTH, "https://evil.example", 403, id="foreign-origin"),
        pytest.param(AUTH, "null", 403, id="null-origin"),
        pytest.param({**AUTH, "Host": "evil.example"}, None, 403, id="second-host-header"),
    ],
)
def test_websocket_handshake_is_refused(
    hostile_server: str, headers: dict[str, str], origin: str | None, status: int
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(
            ws_url(hostile_server),
            additional_headers=headers,
            origin=None if origin is None else Origin(origin),
        )
    assert refused.value.response.status_code == status
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == ("unauthorized" if status == 401 else "forbidden")


def test_websocket_handshake_for_a_rebinding_host_is_refused(hostile_server: str) -> None:
    # The URI names the attacker's host (so the client sends it as Host); the socket goes to us.
    port = int(hostile_server.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        pytest.raises(InvalidStatus) as refused,
    ):
        connect(f"ws://evil.example:{port}/ws/generate", sock=sock, additional_headers=AUTH)
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "forbidden"


WS_GARBAGE = {
    "not-json": ("{{{", "invalid_request"),
    "json-array": ("[1, 2, 3]", "invalid_request"),
    "nan": ('{"prompt": "x", "temperature": NaN}', "invalid_request"),
    "wrong-type": (json.dumps({"prompt": ["x"]}), "invalid_request"),
    "deep-nesting": (deeply_nested(5000).decode(), "invalid_request"),
    "oversized": (json.dumps({"prompt": "x" * WS_MAX_MESSAGE}), "payload_too_large"),
    "unknown-model": (json.dumps(gen(model="no-such")), "model_not_found"),
    "broken-model": (json.dumps(gen(model="noweights")), "model_unusable"),
    "beyond-context": (json.dumps(gen(prompt="word " * 1000)), "context_length_exceeded"),
}


def test_websocket_garbage_gets_errors_and_the_connection_survives(hostile_server: str) -> None:
    with connect(ws_url(hostile_server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(b"\x00\x01binary")
        assert ws_final(ws)["error"]["code"] == "invalid_request"
        for frame, code in WS_GARBAGE.values():
            ws.send(frame)
            assert ws_final(ws)["error"]["code"] == code, frame[:80]
        ws.send(json.dumps(gen()))
        final = ws_final(ws)
        assert final["done"] is True and final["usage"]["completion_tokens"] >= 1


def test_websocket_from_a_local_page_is_allowed(hostile_server: str) -> None:
    with connect(
        ws_url(hostile_server),
        additional_headers=AUTH,
        origin=Origin("http://localhost:5173"),
    ) as ws:
        ws.send(json.dumps(gen()))
        assert ws_final(ws)["done"] is True


# --- a client that never reads ------------------------------------------------------------------

POLL_INTERVAL = 0.1
POLL_LIMIT_SECONDS = 60


def wait_until_idle(url: str) -> bool:
    """Poll /api/health until no slot is busy; False if that never happens within the cap."""
    deadline = time.monotonic() + POLL_LIMIT_SECONDS
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            if http.get("/api/health").json()["slots"]["busy"] == 0:
                return True
            time.sleep(POLL_INTERVAL)
    return False


def test_a_reader_that_stalls_is_cut_by_the_request_timeout(
    long_server: Callable[..., str],
) -> None:
    # A context so long that generating all of it takes far longer than the timeout (attention
    # cost grows with every token), so only the timeout can free the slot in time.
    url = long_server(threads=1, request_timeout=2.0)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(gen(max_tokens=LONG_CONTEXT, stream=True)).encode()
    request = (
        f"POST {G} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(60)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(request)
        # The client reads nothing while the slot is busy; health answers on other connections.
        assert wait_until_idle(url), "the stalled request still holds its slot"
        received = b""
        while not received.endswith(b"0\r\n\r\n"):  # the end of the chunked response
            chunk = stalled.recv(65536)
            assert chunk, "the server closed the stream before its end"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    # The deadline ends the stream like max_tokens would: its text kept, "length", no error.
    assert b'data: {"error"' not in received
    assert b'"finish_reason":"length"' in received.replace(b" ", b"")
    assert b"data: [DONE]" in received


# --- graceful shutdown --------------------------------------------------------------------------

SHUTDOWN_MAX_TOKENS = 300


def test_sigterm_lets_a_running_stream_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHIMMY_")}
    env.update({"SHIMMY_CACHE_DIR": str(tmp_path / "cache"), "SHIMMY_THREADS": "1"})
    command = [
        sys.executable,
        "-m",
        "shimmy",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--model-dirs",
        str(tiny_model_dir),
        "--models-dir",
        str(tmp_path / "own"),
        "--no-user-caches",
        "--no-starter",
    ]
    server = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert server.stderr is not None
        url = None
        while url is None:  # the banner is printed once the socket listens
            line = server.stderr.readline().decode()
            assert line, "serve exited before listening"
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        events: list[bytes] = []
        with (
            httpx.Client(base_url=url, timeout=60) as http,
            http.stream(
                "POST", G, json=gen(max_tokens=SHUTDOWN_MAX_TOKENS, stream=True, temperature=1.0)
            ) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line:
                    continue
                events.append(line.encode())
                if len(events) == 1:
                    server.send_signal(signal.SIGTERM)
        err = server.stderr.read()
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert events[-1] == b"data: [DONE]"
    final = json.loads(events[-2][len(b"data: ") :])
    assert final["choices"][0]["finish_reason"] in ("length", "stop")
    streamed = sum(1 for event in events[:-2] if b'"text"' in event)
    assert final["usage"]["completion_tokens"] >= streamed >= 1
    assert b"Traceback" not in err
    assert server.returncode == 0, err.decode()


# --- after all of it ----------------------------------------------------------------------------


def test_server_still_serves_normally_after_the_hostile_suite(
    client: httpx.Client, hostile_server: str
) -> None:
    response = client.post(G, json=gen(max_tokens=8), headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    chat_response = client.post(C, json=chat(max_tokens=4), headers=AUTH)
    assert chat_response.status_code == 200, chat_response.text
    assert chat_response.json()["object"] == "chat.completion"
    with connect(ws_url(hostile_server), additional_headers=AUTH) as ws:
        ws.send(json.dumps(gen()))
        assert ws_final(ws)["done"] is True
    health = client.get("/api/health").json()
    assert health["status"] == "healthy"
    assert health["slots"]["busy"] == 0 and health["slots"]["queued"] == 0

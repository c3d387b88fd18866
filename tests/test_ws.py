"""/ws/generate over a real uvicorn with the ``websockets`` client."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, ws_url
from conftest import ws_receive as receive
from websockets.sync.client import ClientConnection, connect

from shimmy.settings import Settings

LONG_REQUEST = {"model": "tiny", "prompt": "go", "max_tokens": LONG_CONTEXT - 100}
# Far below the client's default 10 s: a close the server does not answer fails the test.
CLOSE_TIMEOUT = 3


def run_request(ws: ClientConnection, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Send one request; return the concatenated tokens and the final done/error frame."""
    ws.send(json.dumps({"model": "tiny", **body}))
    return read_until_end(ws)


def read_until_end(ws: ClientConnection) -> tuple[str, dict[str, Any]]:
    pieces: list[str] = []
    while True:
        frame = receive(ws)
        if "token" in frame:
            assert set(frame) == {"token"}
            assert isinstance(frame["token"], str) and frame["token"]
            frame["token"].encode("utf-8")  # whole characters only
            pieces.append(frame["token"])
            continue
        return "".join(pieces), frame


def busy_slots(http_url: str) -> int:
    busy: int = httpx.get(f"{http_url}/api/health", timeout=30).json()["slots"]["busy"]
    return busy


@pytest.fixture
def ws_to(tiny_server: str) -> Iterator[Callable[..., ClientConnection]]:
    """Open WebSocket connections (to the tiny server unless told); all closed after the test."""
    with contextlib.ExitStack() as stack:

        def open_connection(http_url: str = tiny_server, **options: Any) -> ClientConnection:
            connection: ClientConnection = stack.enter_context(
                connect(ws_url(http_url), open_timeout=30, **options)
            )
            return connection

        yield open_connection


def test_two_requests_on_one_connection(ws_to: Callable[..., ClientConnection]) -> None:
    ws = ws_to()
    for max_tokens in (7, 13):
        text, done = run_request(
            ws, {"prompt": "hello", "max_tokens": max_tokens, "temperature": 0}
        )
        assert done["done"] is True
        assert done["finish_reason"] == "length"
        usage = done["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens
        assert text


def test_tokens_match_the_http_text_for_the_same_seed(
    tiny_server: str, ws_to: Callable[..., ClientConnection]
) -> None:
    body = {"prompt": "seeded", "max_tokens": 60, "temperature": 0.9, "seed": 42}
    text, done = run_request(ws_to(), body)
    http = httpx.post(f"{tiny_server}/api/generate", json={"model": "tiny", **body}, timeout=60)
    assert http.json()["choices"][0]["text"] == text
    assert http.json()["usage"] == done["usage"]


def test_messages_requests_work(ws_to: Callable[..., ClientConnection]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "system": "be brief", "max_tokens": 4}
    _, done = run_request(ws_to(), body)
    assert done["done"] is True and done["usage"]["prompt_tokens"] > 4


def test_pipelined_requests_are_answered_in_order(ws_to: Callable[..., ClientConnection]) -> None:
    ws = ws_to()
    ws.send(json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 5}))
    ws.send(json.dumps({"model": "nope", "prompt": "b"}))
    ws.send(json.dumps({"model": "tiny", "prompt": "c", "max_tokens": 9}))
    _, first = read_until_end(ws)
    _, second = read_until_end(ws)
    _, third = read_until_end(ws)
    assert first["usage"]["completion_tokens"] == 5
    assert second["error"]["code"] == "model_not_found"
    assert third["usage"]["completion_tokens"] == 9


def test_error_then_success_on_the_same_connection(ws_to: Callable[..., ClientConnection]) -> None:
    ws = ws_to()
    _, error = run_request(ws, {"model": "invalid-model", "prompt": "x"})
    assert set(error) == {"error"}
    assert error["error"]["code"] == "model_not_found"
    assert "invalid-model" in error["error"]["message"]

    _, error = run_request(ws, {"prompt": "x", "temperature": 5})
    assert error["error"]["code"] == "invalid_request"
    assert "temperature" in error["error"]["message"]

    _, error = run_request(ws, {"prompt": "a b " * 500})
    assert error["error"]["code"] == "context_length_exceeded"

    _, done = run_request(ws, {"prompt": "fine", "max_tokens": 3})
    assert done["done"] is True and done["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json at all", "invalid_request"),
        ("[1, 2, 3]", "invalid_request"),
        ('{"prompt": "x", "temperature": NaN}', "invalid_request"),
        (b'{"prompt": "binary"}', "invalid_request"),
    ],
)
def test_bad_frames_get_an_error_and_the_connection_stays_open(
    ws_to: Callable[..., ClientConnection], frame: str | bytes, code: str
) -> None:
    ws = ws_to()
    ws.send(frame)
    error = receive(ws)
    assert error["error"]["code"] == code
    _, done = run_request(ws, {"prompt": "still here", "max_tokens": 2})
    assert done["done"] is True


def test_oversized_frame_is_rejected(
    tiny_settings: Settings,
    server_factory: Callable[[Settings], str],
    ws_to: Callable[..., ClientConnection],
) -> None:
    url = server_factory(tiny_settings.model_copy(update={"ws_max_message_bytes": 1024}))
    ws = ws_to(url)
    ws.send(json.dumps({"model": "tiny", "prompt": "é" * 600}))  # 600 chars, 1200 bytes
    error = receive(ws)
    assert error["error"]["code"] == "payload_too_large"
    _, done = run_request(ws, {"prompt": "small", "max_tokens": 2})
    assert done["done"] is True


def test_cancel_when_idle_is_ignored(ws_to: Callable[..., ClientConnection]) -> None:
    ws = ws_to()
    ws.send(json.dumps({"cancel": True}))
    _, done = run_request(ws, {"prompt": "after cancel", "max_tokens": 4})
    assert done["done"] is True and done["finish_reason"] == "length"


def test_cancel_stops_the_running_generation(
    long_server: Callable[..., str], ws_to: Callable[..., ClientConnection]
) -> None:
    url = long_server()
    ws = ws_to(url)
    ws.send(json.dumps(LONG_REQUEST))
    assert "token" in receive(ws)
    ws.send(json.dumps({"cancel": True}))
    _, done = read_until_end(ws)
    assert done["done"] is True
    assert done["finish_reason"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < LONG_REQUEST["max_tokens"]  # type: ignore[operator]
    assert busy_slots(url) == 0  # the slot is free before "done" is sent

    _, done = run_request(ws, {"prompt": "next", "max_tokens": 3})
    assert done["finish_reason"] == "length"


def assert_closed_by_handshake(ws: ClientConnection) -> None:
    """The server answered the client's close frame: the connection ended normally instead of
    being dropped when the client's close_timeout ran out (1006, no close frame received)."""
    assert ws.protocol.close_rcvd is not None
    assert ws.protocol.close_rcvd.code == 1000
    assert ws.close_code == 1000


def test_close_when_idle_completes_the_handshake(ws_to: Callable[..., ClientConnection]) -> None:
    ws = ws_to(close_timeout=CLOSE_TIMEOUT)
    run_request(ws, {"prompt": "hi", "max_tokens": 2})
    ws.close()
    assert_closed_by_handshake(ws)


def test_disconnect_cancels_the_running_generation(
    long_server: Callable[..., str], ws_to: Callable[..., ClientConnection]
) -> None:
    url = long_server()
    # The client keeps reading while it closes (no max_queue): with its default limit it stops
    # reading once 16 frames wait unread, never sees the server's close frame behind the tokens
    # and drops the connection after close_timeout.
    ws = ws_to(url, max_queue=None, close_timeout=CLOSE_TIMEOUT)
    ws.send(json.dumps(LONG_REQUEST))
    assert "token" in receive(ws)
    assert busy_slots(url) == 1
    ws.close()
    assert_closed_by_handshake(ws)
    # Each poll is a real request; no sleeps. A generation that kept running would stay busy
    # far longer than these polls take.
    assert any(busy_slots(url) == 0 for _ in range(200))


@pytest.mark.starter
def test_starter_over_websocket(starter_server: str) -> None:
    with connect(ws_url(starter_server), open_timeout=60) as ws:
        text, done = run_request(
            ws,
            {
                "model": "default",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 30,
            },
        )
    assert text.strip()
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] > 0

"""WebSocket hardening: SIGTERM lets the generations of a connection finish (and cuts what the
grace period cannot wait for with an error frame, streams with an error event), and the bytes of
unanswered request frames a connection may hold are capped."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, ws_url
from conftest import ws_receive as receive
from serve_helpers import serve_env, served
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

SERVICE_RESTART = 1012


def _until_final(ws: ClientConnection) -> tuple[int, dict[str, Any]]:
    """Read token frames up to the done or error frame: (tokens seen, that frame)."""
    tokens = 0
    while True:
        frame = receive(ws)
        if "token" not in frame:
            return tokens, frame
        tokens += 1


def _closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


def test_sigterm_lets_a_websocket_generation_finish(long_model_dir: Path, tmp_path: Path) -> None:
    env = serve_env(
        tmp_path,
        SHIMMY_MODEL_PATHS=str(long_model_dir),
        SHIMMY_CTX_SIZE=str(LONG_CONTEXT),
        SHIMMY_MAX_TOKENS_CAP=str(LONG_CONTEXT),
    )
    # Long enough to be running still when the shutdown begins, far shorter than its grace.
    body = {"model": "tiny", "prompt": "go", "max_tokens": 2000, "temperature": 1.0}
    with served(["--graceful-timeout", "120"], env) as server:
        with connect(ws_url(server.url), open_timeout=30) as ws:
            ws.send(json.dumps(body))
            assert "token" in receive(ws)
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log(lambda log: "Shutting down" in log)
            # Sent once the shutdown has begun: refused (in its turn), not left unanswered.
            ws.send(json.dumps({"model": "tiny", "prompt": "again", "max_tokens": 3}))
            tokens, final = _until_final(ws)
            # Today the connection is closed with 1012 here, before any done frame.
            assert final.get("done") is True, final
            assert final["usage"]["completion_tokens"] >= tokens + 1
            assert receive(ws)["error"]["code"] == "server_shutting_down"
            assert _closed_with(ws) == SERVICE_RESTART
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.log()


def test_the_end_of_the_grace_period_ends_generations_with_an_error(
    long_model_dir: Path, tmp_path: Path
) -> None:
    env = serve_env(
        tmp_path,
        SHIMMY_MODEL_PATHS=str(long_model_dir),
        SHIMMY_CTX_SIZE=str(LONG_CONTEXT),
        SHIMMY_PARALLEL="2",
        SHIMMY_MAX_TOKENS_CAP=str(LONG_CONTEXT),
    )
    # Both run far longer than the grace period: a whole long context, one token at a time.
    body = {"model": "tiny", "prompt": "Once", "max_tokens": LONG_CONTEXT - 100, "stream": True}
    with (
        served(["--graceful-timeout", "1"], env) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/api/generate", json=body) as stream,
        connect(ws_url(server.url), open_timeout=30) as ws,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        ws.send(json.dumps(body))
        assert "token" in receive(ws)
        server.process.send_signal(signal.SIGTERM)
        _, final = _until_final(ws)
        assert final["error"]["code"] == "server_shutting_down", final
        assert _closed_with(ws) == SERVICE_RESTART
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "server_shutting_down"
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.log()


CAP = 64 * 1024
# Valid JSON padded with whitespace: a frame of about 40 KiB whose prompt is two tokens.
PAD = " " * (40 * 1024)


def test_frames_past_the_queued_bytes_cap_get_an_error_and_the_connection_goes_on(
    long_server: Callable[..., str],
) -> None:
    url = long_server(ws_max_queued_bytes=CAP, parallel=2)
    long = {"model": "tiny", "prompt": "Once", "max_tokens": LONG_CONTEXT - 100}
    with connect(ws_url(url), open_timeout=30) as ws:
        ws.send(json.dumps({**long, "id": "a"}) + PAD)
        first = receive(ws)
        assert first["id"] == "a" and "token" in first
        # "a" is running and holds its 40 KiB: another 40 KiB would pass the 64 KiB cap.
        ws.send(json.dumps({**long, "id": "b"}) + PAD)
        frame = _next_for(ws, "b")
        assert frame["error"]["code"] == "server_busy", frame
        assert "ws_max_queued_bytes" in frame["error"]["message"]
        # Small requests still fit beside "a".
        ws.send(json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3, "id": "c"}))
        assert _next_for(ws, "c", final=True)["done"] is True
        ws.send(json.dumps({"cancel": True, "id": "a"}))
        assert _next_for(ws, "a", final=True)["finish_reason"] == "cancelled"
        # With "a" answered its bytes are free again: the same big frame is now taken.
        ws.send(json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 5}) + PAD)
        _, done = _until_final(ws)
        assert done["done"] is True and done["usage"]["completion_tokens"] == 5


def _next_for(ws: ClientConnection, request_id: str, *, final: bool = False) -> dict[str, Any]:
    """The next frame answering ``request_id`` (its done or error frame with ``final``); frames
    of the other requests running beside it are skipped."""
    while True:
        frame = receive(ws)
        if frame.get("id") == request_id and not (final and "token" in frame):
            return frame

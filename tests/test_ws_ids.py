"""/ws/generate with request ids: several generations at once on one connection, each
cancelled or replaced on its own, over a real uvicorn with the ``websockets`` client."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, ws_url
from conftest import ws_receive as receive
from websockets.sync.client import ClientConnection, connect

LONG = {"model": "tiny", "prompt": "go", "max_tokens": LONG_CONTEXT - 100}


@pytest.fixture
def ws(long_server: Callable[..., str]) -> Iterator[tuple[ClientConnection, str]]:
    url = long_server(parallel=3)
    with connect(ws_url(url), open_timeout=30, max_queue=None) as conn:
        yield conn, url


def send(conn: ClientConnection, frame: dict[str, Any]) -> None:
    conn.send(json.dumps(frame))


def until_done(conn: ClientConnection, wanted: Any, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read frames (recording them in ``seen``) until the end frame of request ``wanted``."""
    while True:
        frame = receive(conn)
        seen.append(frame)
        if frame.get("id") == wanted and ("done" in frame or "error" in frame):
            return frame


def test_requests_with_ids_run_side_by_side_and_cancel_alone(
    ws: tuple[ClientConnection, str],
) -> None:
    conn, url = ws
    send(conn, {**LONG, "id": "long"})
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1].get("id") != "long":  # the long one is generating...
        seen.append(receive(conn))
    send(conn, {"model": "tiny", "prompt": "short", "max_tokens": 5, "id": 2})
    short = until_done(conn, 2, seen)
    # ...and the short one, sent later, finished while the long one still runs.
    assert short["done"] is True and short["usage"]["completion_tokens"] == 5
    assert not any(f.get("id") == "long" and "done" in f for f in seen)
    assert httpx.get(f"{url}/api/health", timeout=30).json()["slots"]["busy"] == 1
    send(conn, {"cancel": True, "id": "long"})
    cancelled = until_done(conn, "long", seen)
    assert cancelled["finish_reason"] == "cancelled"
    assert all(f.get("id") in ("long", 2) for f in seen)  # every frame says whose it is
    assert {f["id"] for f in seen if "token" in f} == {"long", 2}


def test_a_request_reusing_a_running_id_replaces_it(ws: tuple[ClientConnection, str]) -> None:
    conn, url = ws
    send(conn, {**LONG, "id": "cursor"})
    assert "token" in receive(conn)
    send(conn, {"model": "tiny", "prompt": "go on", "max_tokens": 4, "id": "cursor"})
    seen: list[dict[str, Any]] = []
    old = until_done(conn, "cursor", seen)
    new = until_done(conn, "cursor", seen)
    # The replaced one ends first, and only then does the new one answer.
    assert old["finish_reason"] == "cancelled"
    assert new["finish_reason"] == "length" and new["usage"]["completion_tokens"] == 4
    first_new_token = seen.index(old) + 1
    assert all("token" in f for f in seen[first_new_token:-1])
    assert httpx.get(f"{url}/api/health", timeout=30).json()["slots"]["busy"] == 0


def test_frames_without_an_id_keep_their_order_beside_ones_with_ids(
    ws: tuple[ClientConnection, str],
) -> None:
    conn, _ = ws
    send(conn, {"model": "tiny", "prompt": "a", "max_tokens": 3})
    send(conn, {"model": "tiny", "prompt": "b", "max_tokens": 2, "id": "x"})
    send(conn, {"model": "tiny", "prompt": "c", "max_tokens": 6})
    frames: list[dict[str, Any]] = []
    while sum("done" in f for f in frames) < 3:
        frames.append(receive(conn))
    untagged = [f for f in frames if "id" not in f and "done" in f]
    assert [f["usage"]["completion_tokens"] for f in untagged] == [3, 6]
    tagged = [f for f in frames if f.get("id") == "x" and "done" in f]
    assert [f["usage"]["completion_tokens"] for f in tagged] == [2]


def test_errors_carry_the_id_and_bad_ids_are_refused(ws: tuple[ClientConnection, str]) -> None:
    conn, _ = ws
    send(conn, {"model": "tiny", "prompt": "x", "temperature": 9, "id": 7})
    error = receive(conn)
    assert error["id"] == 7 and error["error"]["code"] == "invalid_request"
    for bad in (True, 1.5, "", "x" * 129, [1]):
        send(conn, {"model": "tiny", "prompt": "x", "id": bad})
        refused = receive(conn)
        assert "id" not in refused and "'id'" in refused["error"]["message"]
    send(conn, {"cancel": True, "id": "nobody"})  # crossed paths with an end: ignored
    send(conn, {"model": "tiny", "prompt": "fine", "max_tokens": 2, "id": "1"})
    done = until_done(conn, "1", [])
    assert done["done"] is True

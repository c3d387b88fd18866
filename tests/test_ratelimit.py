"""Token-bucket rate limiting: the bucket arithmetic on a fake clock, the middleware on its own,
then a real server over HTTP and WebSocket."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings
from starlette.types import Message, Receive, Scope, Send
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from shimmy.api.app import route_table
from shimmy.api.ratelimit import RateLimitMiddleware, TokenBucketLimiter, is_cancel_frame
from shimmy.api.routing import RouteAccess
from shimmy.settings import Settings

ServerFactory = Callable[[Settings], str]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the buckets --------------------------------------------------------------------------------


def test_burst_then_refusal_then_refill() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=60, burst=3, clock=clock)
    remaining = [limiter.take(["a"]).remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    refused = limiter.take(["a"])
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == pytest.approx(1.0)  # one token per second
    assert refused.reset_seconds == pytest.approx(3.0)
    clock.advance(0.5)
    assert not limiter.take(["a"]).allowed
    clock.advance(0.5)
    assert limiter.take(["a"]).allowed
    clock.advance(3600)
    assert limiter.take(["a"]).remaining == 2  # refilled to the burst, never beyond


def test_clients_have_their_own_buckets() -> None:
    limiter = TokenBucketLimiter(per_minute=1, burst=1, clock=FakeClock())
    assert limiter.take(["a"]).allowed
    assert not limiter.take(["a"]).allowed
    assert limiter.take(["b"]).allowed


def test_a_request_takes_from_every_bucket_or_from_none() -> None:
    limiter = TokenBucketLimiter(per_minute=1, burst=2, clock=FakeClock())
    assert limiter.take(["addr", "key"]).allowed
    assert limiter.take(["addr2", "key"]).allowed
    refused = limiter.take(["addr3", "key"])  # the key is spent, the new address is not
    assert not refused.allowed
    assert limiter.take(["addr3"]).remaining == 1  # the refused request took nothing


def test_rates_below_one_per_minute_and_retry_after() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=0.5, burst=1, clock=clock)
    assert limiter.take(["a"]).allowed
    refused = limiter.take(["a"])
    assert refused.retry_after == pytest.approx(120.0)
    assert refused.headers() == {
        "RateLimit-Limit": "1",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "120",
    }


def test_a_clock_that_steps_back_neither_drains_nor_fills() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=60, burst=2, clock=clock)
    limiter.take(["a"])
    clock.advance(-100)
    assert limiter.take(["a"]).remaining == 0
    assert not limiter.take(["a"]).allowed


def test_memory_is_bounded_least_recently_used_first() -> None:
    limiter = TokenBucketLimiter(per_minute=1, burst=1, max_clients=100, clock=FakeClock())
    limiter.take(["kept"])
    for n in range(1000):
        limiter.take([f"client-{n}"])
        if n % 10 == 0:
            assert not limiter.take(["kept"]).allowed  # recently used: still remembered
    assert len(limiter) == 100
    assert limiter.take(["client-0"]).allowed  # evicted long ago: a fresh bucket


@pytest.mark.parametrize(
    ("per_minute", "burst", "max_clients"), [(0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)]
)
def test_nonsense_limits_are_refused(per_minute: float, burst: int, max_clients: int) -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(per_minute, burst, max_clients=max_clients)


@pytest.mark.parametrize(
    ("text", "cancel"),
    [
        ('{"cancel": true}', True),
        ('{ "cancel" : true }', True),
        ('{"cancel": false}', False),
        ('{"cancel": 1}', False),
        ('{"prompt": "x"}', False),
        ("not json", False),
        ('{"cancel": true, "id": "' + "x" * 128 + '"}', True),  # the longest id there is
        ('{"cancel": true, "pad": "' + "x" * 300 + '"}', False),
    ],
)
def test_cancel_frames_are_recognized(text: str, cancel: bool) -> None:
    assert is_cancel_frame({"type": "websocket.receive", "text": text}) is cancel
    assert not is_cancel_frame({"type": "websocket.receive", "bytes": text.encode()})


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().rate_limit is None and Settings().rate_burst == 10
    monkeypatch.setenv("SHIMMY_RATE_LIMIT", "90")
    monkeypatch.setenv("SHIMMY_RATE_BURST", "4")
    settings = Settings()
    assert settings.rate_limit == 90 and settings.rate_burst == 4
    monkeypatch.setenv("SHIMMY_RATE_LIMIT", "0")
    with pytest.raises(ValueError):
        Settings()


# --- the middleware on its own ------------------------------------------------------------------


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(
    app: RateLimitMiddleware, path: str = "/api/models", client: str = "10.0.0.1", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        "client": (client, 40000),
        "server": ("127.0.0.1", 11435),
        "scheme": "http",
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, b"".join(m.get("body", b"") for m in sent[1:])


def limited(clock: FakeClock, **settings: Any) -> RateLimitMiddleware:
    config = Settings(**settings)
    access = RouteAccess.of(route_table(config))  # what create_app passes: the routes' facts
    return RateLimitMiddleware(ok_app, config, access=access, clock=clock)


async def test_middleware_refuses_with_429_and_headers() -> None:
    clock = FakeClock()
    app = limited(clock, rate_limit=6, rate_burst=2)
    first = await call(app)
    assert first[0] == 200
    assert first[1]["ratelimit-limit"] == "2" and first[1]["ratelimit-remaining"] == "1"
    assert (await call(app))[0] == 200
    status, headers, body = await call(app)
    assert status == 429
    assert headers["retry-after"] == "10"  # 6 per minute: a token every 10 s
    assert headers["ratelimit-remaining"] == "0"
    assert json.loads(body)["error"]["code"] == "rate_limited"
    openai_status, _, openai_body = await call(app, path="/v1/models")
    assert openai_status == 429
    assert json.loads(openai_body)["error"]["type"] == "rate_limit_error"
    clock.advance(10)
    assert (await call(app))[0] == 200


async def test_retry_after_is_whole_seconds_rounded_up() -> None:
    clock = FakeClock()
    app = limited(clock, rate_limit=7, rate_burst=1)  # a token every 8.57 s
    await call(app)
    clock.advance(0.1)
    _, headers, _ = await call(app)
    assert headers["retry-after"] == str(math.ceil(60 / 7 - 0.1)) == "9"


async def test_health_is_exempt_and_off_means_off() -> None:
    clock = FakeClock()
    app = limited(clock, rate_limit=1, rate_burst=1)
    for _ in range(5):
        status, headers, _ = await call(app, path="/api/health")
        assert status == 200 and "ratelimit-limit" not in headers
    unlimited = limited(clock)
    for _ in range(50):
        status, headers, _ = await call(unlimited)
        assert status == 200 and "ratelimit-limit" not in headers


async def test_a_key_is_limited_as_a_whole_and_an_address_across_keys() -> None:
    clock = FakeClock()
    app = limited(clock, rate_limit=1, rate_burst=2, api_keys=["k1", "k2"])
    key = {"authorization": "Bearer k1"}
    assert (await call(app, client="10.0.0.1", **key))[0] == 200
    assert (await call(app, client="10.0.0.2", **key))[0] == 200
    assert (await call(app, client="10.0.0.3", **key))[0] == 429  # the key is spent
    assert (await call(app, client="10.0.0.3", x_api_key="k2"))[0] == 200
    assert (await call(app, client="10.0.0.3", authorization="Bearer guess"))[0] == 200
    assert (await call(app, client="10.0.0.3", authorization="Bearer guess2"))[0] == 429


async def test_without_keys_a_bearer_token_does_not_buy_a_fresh_bucket() -> None:
    clock = FakeClock()
    app = limited(clock, rate_limit=1, rate_burst=1)
    assert (await call(app))[0] == 200
    assert (await call(app, authorization="Bearer anything"))[0] == 429


# --- a real server ------------------------------------------------------------------------------


def test_server_limits_http_and_exempts_health(
    server_factory: ServerFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = server_factory(
        isolated_settings(tiny_model_dir, tmp_path, rate_limit=1, rate_burst=3, threads=1)
    )
    with httpx.Client(base_url=url, timeout=60) as http:
        remaining = [http.get("/api/models").headers["ratelimit-remaining"] for _ in range(3)]
        assert remaining == ["2", "1", "0"]
        refused = http.post("/api/generate", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert int(refused.headers["ratelimit-reset"]) >= int(refused.headers["retry-after"])
        for _ in range(3):
            assert http.get("/api/health").status_code == 200
        for path in ("/", "/ui/app.js", "/ui/app.css", "/", "/ui/sse.js"):  # the chat page
            assert http.get(path).status_code == 200
        assert http.post("/", content=b"x").status_code == 429  # only reading it is free
        with pytest.raises(InvalidStatus) as ws_refused:
            connect(url.replace("http://", "ws://", 1) + "/ws/generate")
        assert ws_refused.value.response.status_code == 429
        assert ws_refused.value.response.headers["Retry-After"]


def test_websocket_requests_wait_for_their_token_instead_of_failing(
    server_factory: ServerFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # One token a second and no burst to speak of: the handshake takes the only token, so each
    # request frame has to wait for one. They must all be answered, in order, with no error.
    url = server_factory(
        isolated_settings(tiny_model_dir, tmp_path, rate_limit=60, rate_burst=1, threads=1)
    )
    with connect(url.replace("http://", "ws://", 1) + "/ws/generate") as ws:
        assert ws.response is not None
        assert ws.response.headers["RateLimit-Limit"] == "1"
        for n in range(2):
            ws.send(json.dumps({"model": "tiny", "prompt": f"request {n}", "max_tokens": 2}))
        finals: list[dict[str, Any]] = []
        while len(finals) < 2:
            frame = json.loads(ws.recv(timeout=60))
            if "token" not in frame:
                finals.append(frame)
        assert all(frame.get("done") is True for frame in finals), finals

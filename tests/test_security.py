"""API keys, the Host check, Origin checks and CORS: the policies themselves, then a real server.

The hostile suite (test_hostile.py) covers the refusals request by request; this module checks
what is *allowed*, the CORS answers, where keys come from, and the pieces one by one.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings
from starlette.types import Message, Scope
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from shimmy.api import security
from shimmy.api.security import (
    ApiKeyMiddleware,
    HostOriginMiddleware,
    HostPolicy,
    KeyChecker,
    OriginPolicy,
    insecure_bind_warning,
    is_loopback_host,
    load_api_keys,
    parse_host,
    presented_credentials,
)
from shimmy.errors import InvalidRequest
from shimmy.settings import Settings

KEY = "sk-test-1234567890"
ORIGIN = "http://app.example:3000"

ServerFactory = Callable[[Settings], str]


# --- keys ---------------------------------------------------------------------------------------


def test_keys_come_from_the_list_the_single_key_and_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# shimmy keys\n\n  from-file-1  \nfrom-file-2\n# from-file-3\nk1\n")
    settings = Settings(api_keys=["k1", "k2"], api_key="single", api_key_file=key_file)
    assert load_api_keys(settings) == ("k1", "k2", "single", "from-file-1", "from-file-2")


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("filed\n")
    monkeypatch.setenv("SHIMMY_API_KEYS", "a, b ,")
    monkeypatch.setenv("SHIMMY_API_KEY", "one")
    monkeypatch.setenv("SHIMMY_API_KEY_FILE", str(key_file))
    assert load_api_keys(Settings()) == ("a", "b", "one", "filed")


def test_no_keys_by_default() -> None:
    assert load_api_keys(Settings()) == ()
    assert not security.keys_configured(Settings())


def test_a_key_file_without_keys_is_an_error_not_an_open_server(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# nothing yet\n\n")
    with pytest.raises(InvalidRequest, match="holds no key"):
        load_api_keys(Settings(api_key_file=key_file))


def test_a_missing_key_file_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="api_key_file"):
        Settings(api_key_file=tmp_path / "absent")


def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InvalidRequest, match="cannot read the API key file"):
        load_api_keys(Settings(api_key_file=key_file))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": f"Bearer {KEY}"}, [KEY]),
        ({"authorization": f"bearer   {KEY}  "}, [KEY]),
        ({"x-api-key": KEY}, [KEY]),
        ({"authorization": "Bearer a", "x-api-key": "b"}, ["a", "b"]),
        ({"authorization": f"Basic {KEY}"}, []),
        ({"authorization": "Bearer "}, []),
        ({}, []),
    ],
)
def test_presented_credentials(headers: dict[str, str], expected: list[str]) -> None:
    from starlette.datastructures import Headers

    assert presented_credentials(Headers(headers=headers)) == expected


def test_key_check_compares_with_every_key_without_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checker = KeyChecker.for_keys(["first", "second", "third"])
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting_compare)
    for credentials, accepted in [(["first"], True), (["third"], True), (["nope"], False)]:
        calls.clear()
        assert checker.accepts(credentials) is accepted
        # The same work whichever key matches (or none): no early exit to time.
        assert len(calls) == 3
        assert {len(a) for a, _ in calls} == {32}  # fixed-size digests, not the raw keys
    assert not checker.accepts([])
    assert not KeyChecker.for_keys([]).enabled


# --- hosts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("localhost:11435", "localhost"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8080", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("example.com.", "example.com"),
        ("evil@localhost", None),
        ("localhost/path", None),
        ("[::1", None),
        ("host:port", None),
        ("", None),
    ],
)
def test_parse_host(header: str, host: str | None) -> None:
    assert parse_host(header) == host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("app.localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def host_policy(**overrides: Any) -> HostPolicy:
    return HostPolicy.from_settings(Settings(**overrides))


@pytest.mark.parametrize(
    "header",
    ["localhost", "localhost:11435", "127.0.0.1:11435", "[::1]:11435", "ui.localhost", None],
)
def test_loopback_hosts_are_allowed_by_default(header: str | None) -> None:
    assert host_policy().allows(header)


@pytest.mark.parametrize("header", ["10.0.0.7:11435", "[fe80::1]", "192.168.1.5"])
def test_ip_literals_are_allowed_since_they_cannot_be_rebound(header: str) -> None:
    assert host_policy().allows(header)


@pytest.mark.parametrize(
    "header",
    ["evil.example", "localhost.evil.example", "evil.example:11435", "my-nas", "x@localhost"],
)
def test_other_names_are_refused_by_default(header: str) -> None:
    assert not host_policy().allows(header)


def test_allowed_hosts_patterns() -> None:
    policy = host_policy(allowed_hosts=["llm.lan", ".corp.example", "*.dev.example", "[fd00::2]"])
    assert policy.allows("llm.lan:11435")
    assert policy.allows("corp.example") and policy.allows("a.b.corp.example")
    assert policy.allows("x.dev.example") and not policy.allows("dev.example")
    assert not policy.allows("notcorp.example") and not policy.allows("llm.lan.evil")
    assert host_policy(allowed_hosts=["*"]).allows("anything.example")


def test_the_bind_host_is_allowed() -> None:
    assert host_policy(host="my-box.lan").allows("my-box.lan:11435")


# --- origins ------------------------------------------------------------------------------------


def test_origin_policy() -> None:
    policy = OriginPolicy.from_settings(Settings(cors_origins=[ORIGIN + "/"]))
    assert policy.listed(ORIGIN) and policy.listed(ORIGIN.upper())
    assert not policy.listed("http://app.example")  # another port is another origin
    assert policy.allows_http("http://127.0.0.1:11435", "127.0.0.1:11435")  # same origin
    assert not policy.allows_http("http://localhost:5173", "127.0.0.1:11435")
    assert policy.allows_websocket("http://localhost:5173", "127.0.0.1:11435")
    assert policy.allows_websocket("https://127.0.0.1", "127.0.0.1:11435")
    assert not policy.allows_websocket("http://localhost.evil.example", "127.0.0.1:11435")
    assert not policy.allows_websocket("null", "127.0.0.1:11435")
    anyone = OriginPolicy.from_settings(Settings(cors_origins=["*"]))
    assert anyone.allows_http("https://anywhere.example", "127.0.0.1:11435")


# --- warnings -----------------------------------------------------------------------------------


def test_insecure_bind_warning() -> None:
    assert insecure_bind_warning(Settings(host="127.0.0.1")) is None
    assert insecure_bind_warning(Settings(host="::1")) is None
    assert insecure_bind_warning(Settings(host="0.0.0.0", api_keys=[KEY])) is None
    warning = insecure_bind_warning(Settings(host="0.0.0.0"))
    assert warning is not None and "0.0.0.0" in warning and "API key" in warning


# --- the middleware on its own: a server without the denial extension ----------------------------


async def run_websocket_handshake(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def websocket_scope(headers: list[tuple[bytes, bytes]], extensions: dict[str, Any]) -> Scope:
    return {
        "type": "websocket",
        "path": "/ws/generate",
        "raw_path": b"/ws/generate",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:11435"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 11435),
        "scheme": "ws",
        "extensions": extensions,
    }


async def never_called(scope: Scope, receive: Any, send: Any) -> None:
    raise AssertionError("the app must not see a refused handshake")


async def test_refused_handshake_closes_1008_without_the_denial_extension() -> None:
    app = ApiKeyMiddleware(never_called, Settings(api_keys=[KEY]))
    sent = await run_websocket_handshake(app, websocket_scope([], extensions={}))
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_refused_handshake_is_an_http_response_with_the_extension() -> None:
    app = HostOriginMiddleware(never_called, Settings())
    scope = websocket_scope([(b"origin", b"https://evil.example")], {"websocket.http.response": {}})
    sent = await run_websocket_handshake(app, scope)
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 403
    assert json.loads(sent[1]["body"])["error"]["code"] == "forbidden"


# --- a real server ------------------------------------------------------------------------------


@pytest.fixture
def secured_server(server_factory: ServerFactory, tiny_model_dir: Path, tmp_path: Path) -> str:
    return server_factory(
        isolated_settings(
            tiny_model_dir, tmp_path, api_keys=[KEY], cors_origins=[ORIGIN], threads=1
        )
    )


def test_no_cors_headers_by_default(tiny_server: str) -> None:
    response = httpx.get(f"{tiny_server}/api/models")
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight = httpx.options(
        f"{tiny_server}/api/generate",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers


def test_same_origin_requests_are_not_cross_site(tiny_server: str) -> None:
    response = httpx.get(f"{tiny_server}/api/models", headers={"Origin": tiny_server})
    assert response.status_code == 200


def test_preflight_for_an_allowed_origin_needs_no_key(secured_server: str) -> None:
    response = httpx.options(
        f"{secured_server}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert methods == {"GET", "POST", "DELETE", "OPTIONS"}
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "x-api-key"} <= {h.strip() for h in allowed.split(",")}
    assert int(response.headers["access-control-max-age"]) > 0
    assert "origin" in response.headers["vary"].lower()


def test_allowed_origin_gets_cors_headers_on_answers_and_errors(secured_server: str) -> None:
    headers = {"Origin": ORIGIN}
    ok = httpx.get(
        f"{secured_server}/v1/models", headers={**headers, "Authorization": f"Bearer {KEY}"}
    )
    refused = httpx.get(f"{secured_server}/v1/models", headers=headers)
    for response, status in ((ok, 200), (refused, 401)):
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in response.headers["access-control-expose-headers"].lower()
    assert refused.json()["error"]["type"] == "authentication_error"


def test_key_unlocks_every_endpoint_and_health_and_openapi_are_public(
    secured_server: str,
) -> None:
    with httpx.Client(base_url=secured_server, timeout=60) as http:
        assert http.get("/api/health").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        for path in ("/api/models", "/api/models/loaded", "/v1/models", "/v1/models/tiny"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert http.get(path, headers={"X-Api-Key": KEY}).status_code == 200
        generated = http.post(
            "/api/generate",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert generated.status_code == 200


def test_key_file_keys_are_accepted(
    server_factory: ServerFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nalice-key\nbob-key\n")
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, api_key_file=key_file))
    for key, status in (("bob-key", 200), ("alice-key", 200), ("# team keys", 401)):
        response = httpx.get(f"{url}/api/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == status, key


def test_websocket_needs_the_key_and_accepts_local_and_listed_origins(
    secured_server: str,
) -> None:
    ws_url = secured_server.replace("http://", "ws://", 1) + "/ws/generate"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url)
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {KEY}"}
    for origin in (None, ORIGIN, "http://localhost:8080", "http://127.0.0.1:5173"):
        with connect(
            ws_url, additional_headers=auth, origin=None if origin is None else Origin(origin)
        ) as ws:
            ws.send(json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}))
            while "token" in (frame := json.loads(ws.recv(timeout=60))):
                pass
            assert frame["done"] is True


def test_allowed_hosts_setting_reaches_the_server(
    server_factory: ServerFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = server_factory(
        isolated_settings(tiny_model_dir, tmp_path, allowed_hosts=[".llm.example"])
    )
    assert httpx.get(f"{url}/api/health", headers={"Host": "box.llm.example"}).status_code == 200
    assert httpx.get(f"{url}/api/health", headers={"Host": "llm.example.evil"}).status_code == 403

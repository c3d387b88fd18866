"""Every error the native API can return, in the contract's shape, on a real uvicorn."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import isolated_settings, run_server
from tiny_gguf import write_tiny_gguf

from shimmy.api.app import create_app
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings


def post_raw(url: str, content: bytes | str, path: str = "/api/generate") -> httpx.Response:
    return httpx.post(
        f"{url}{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


def assert_native_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    return error


def assert_still_serving(url: str) -> None:
    response = httpx.post(
        f"{url}/api/generate", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# --- malformed bodies ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{bad json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"prompt": "x",}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_malformed_bodies_are_invalid_request(tiny_server: str, raw: bytes, expected: str) -> None:
    error = assert_native_error(post_raw(tiny_server, raw), 400, "invalid_request")
    assert expected in error["details"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 5.0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "model": 3}, "model"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}, "messages"),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_wrong_types_name_the_field(tiny_server: str, body: dict[str, Any], field: str) -> None:
    error = assert_native_error(
        httpx.post(f"{tiny_server}/api/generate", json=body), 400, "invalid_request"
    )
    assert error["details"].startswith(field), error["details"]


@pytest.mark.parametrize(
    ("body", "details"),
    [
        ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
        ({"temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
        ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_out_of_range_values_are_rejected(
    tiny_server: str, body: dict[str, Any], details: str
) -> None:
    response = httpx.post(f"{tiny_server}/api/generate", json={"prompt": "x", **body})
    error = assert_native_error(response, 400, "invalid_request")
    assert error["details"].startswith(details), error["details"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(tiny_server: str, value: str) -> None:
    raw = f'{{"prompt": "x", "temperature": {value}}}'
    error = assert_native_error(post_raw(tiny_server, raw), 400, "invalid_request")
    assert error["details"] == "temperature: Input should be a finite number"


def test_prompt_or_messages_is_required(tiny_server: str) -> None:
    error = assert_native_error(
        httpx.post(f"{tiny_server}/api/generate", json={"max_tokens": 5}), 400, "invalid_request"
    )
    assert error["details"] == "Either 'prompt' or 'messages' is required"
    both = {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}
    error = assert_native_error(
        httpx.post(f"{tiny_server}/api/generate", json=both), 400, "invalid_request"
    )
    assert "not both" in error["details"]


# --- models and context -------------------------------------------------------------------
def test_unknown_model_is_404(tiny_server: str) -> None:
    response = httpx.post(
        f"{tiny_server}/api/generate", json={"model": "invalid-model", "prompt": "x"}
    )
    error = assert_native_error(response, 404, "model_not_found")
    assert error["message"] == "The specified model was not found"
    assert error["details"] == "Model 'invalid-model' is not available"


def test_unusable_model_file_is_reported(
    tiny_model_path: Path, tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(tiny_model_path.read_bytes())
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    url = server_factory(isolated_settings(folder, tmp_path))
    response = httpx.post(f"{url}/api/generate", json={"model": "broken", "prompt": "x"})
    assert_native_error(response, 422, "model_unusable")
    assert_still_serving(url)


def test_prompt_longer_than_the_context_is_rejected(tiny_server: str) -> None:
    response = httpx.post(
        f"{tiny_server}/api/generate",
        json={"model": "tiny", "prompt": "a b " * 500},
        timeout=60,
    )
    error = assert_native_error(response, 400, "context_length_exceeded")
    assert error["details"]


# --- transport-level errors ----------------------------------------------------------------
def test_oversized_bodies_are_413(
    tiny_settings: Settings, server_factory: Callable[[Settings], str]
) -> None:
    url = server_factory(tiny_settings.model_copy(update={"max_body_bytes": 1024}))
    big = b'{"prompt": "' + b"x" * 4000 + b'"}'
    error = assert_native_error(post_raw(url, big), 413, "payload_too_large")
    assert "1024" in error["details"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is only known by counting
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    response = httpx.post(
        f"{url}/api/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_native_error(response, 413, "payload_too_large")
    assert_still_serving(url)


def test_unknown_path_is_404_in_the_dialect_of_its_prefix(tiny_server: str) -> None:
    error = assert_native_error(httpx.get(f"{tiny_server}/api/nope"), 404, "not_found")
    assert error["details"]
    assert_native_error(httpx.get(f"{tiny_server}/nope"), 404, "not_found")

    response = httpx.get(f"{tiny_server}/v1/nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "not_found"

    response = httpx.delete(f"{tiny_server}/v1/models")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_wrong_method_is_405_with_allow(tiny_server: str) -> None:
    response = httpx.get(f"{tiny_server}/api/generate")
    assert_native_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    response = httpx.post(f"{tiny_server}/api/health")
    assert_native_error(response, 405, "method_not_allowed")


def test_server_keeps_serving_after_errors(tiny_server: str) -> None:
    post_raw(tiny_server, b"{bad")
    post_raw(tiny_server, b'{"prompt": "x", "temperature": NaN}')
    httpx.post(f"{tiny_server}/api/generate", json={"model": "nope", "prompt": "x"})
    httpx.get(f"{tiny_server}/api/nope")
    assert_still_serving(tiny_server)


# --- unexpected failures ------------------------------------------------------------------
SECRET = "internal-detail-that-must-not-leak"


class ExplodingRegistry:
    """A registry whose model loading fails with an unexpected (non-shimmy) exception."""

    default_id = "boom"

    def __init__(self, entry: ModelEntry) -> None:
        self.entries = [entry]

    def discover(self) -> list[ModelEntry]:
        return self.entries

    def resolve(self, model: str | None) -> ModelEntry:
        return self.entries[0]

    async def get_engine(self, model: str | None, **_options: Any) -> Any:
        raise RuntimeError(SECRET)

    def start(self) -> None:
        return None

    def is_loaded(self, model_id: str) -> bool:
        return False

    def loaded_count(self) -> int:
        return 0

    def loaded_engines(self) -> list[Any]:
        return []

    def observe(self, hooks: Any) -> Callable[[], None]:
        return lambda: None

    async def aclose(self) -> None:
        return None


def test_unexpected_exceptions_are_500_without_internals(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    entry = ModelEntry(id="boom", path=tmp_path / "boom.gguf", source="models_dir")
    with run_server(tiny_settings, ExplodingRegistry(entry)) as url:
        for stream in (False, True):
            response = httpx.post(
                f"{url}/api/generate", json={"prompt": "x", "stream": stream}, timeout=60
            )
            error = assert_native_error(response, 500, "server_error")
            assert SECRET not in response.text
            assert "RuntimeError" not in response.text
            assert error["message"] == "Internal server error"
        assert httpx.get(f"{url}/api/health").json()["status"] == "healthy"


def test_startup_fails_clearly_for_a_missing_default_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = isolated_settings(tiny_model_dir, tmp_path, default_model="does-not-exist")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    with pytest.raises(SystemExit):
        server.run(sockets=[sock])  # uvicorn exits when the lifespan startup fails
    sock.close()


def test_default_model_setting_selects_the_model(
    tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    write_tiny_gguf(folder / "alpha.gguf")
    write_tiny_gguf(folder / "beta.gguf", seed=99)
    url = server_factory(isolated_settings(folder, tmp_path, default_model="beta"))
    assert httpx.get(f"{url}/api/models").json()["default"] == "beta"
    response = httpx.post(f"{url}/api/generate", json={"prompt": "x", "max_tokens": 1})
    assert response.json()["model"] == "beta"

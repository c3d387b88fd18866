"""The access log: one ``shimmy.access`` record per HTTP request, from a real server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from shimmy.api.access_log import ACCESS_LOGGER, AccessLogMiddleware
from shimmy.logging_setup import JsonLineFormatter


@pytest.fixture
def access_records(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def only(records: list[logging.LogRecord], path: str) -> logging.LogRecord:
    matching = [record for record in records if getattr(record, "path", None) == path]
    assert len(matching) == 1, [record.getMessage() for record in records]
    return matching[0]


def test_a_generation_is_logged_once_with_model_and_tokens(
    client: httpx.Client, access_records: list[logging.LogRecord]
) -> None:
    response = client.post(
        "/api/generate/batch", json={"model": "tiny", "prompts": ["a", "b"], "max_tokens": 3}
    )
    assert response.status_code == 200
    usage = response.json()["usage"]
    record = only(access_records, "/api/generate/batch")
    assert record.levelno == logging.INFO
    fields = record.__dict__
    assert fields["method"] == "POST"
    assert fields["status"] == 200
    assert fields["model"] == "tiny"
    assert fields["prompt_tokens"] == usage["prompt_tokens"]
    assert fields["completion_tokens"] == usage["completion_tokens"]
    assert fields["duration_ms"] >= 0
    assert fields["client"] == "127.0.0.1"
    message = record.getMessage()
    assert '"POST /api/generate/batch" 200 model=tiny' in message
    assert f"tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" in message
    assert message.endswith("ms")


def test_requests_without_a_model_leave_it_out(
    client: httpx.Client, access_records: list[logging.LogRecord]
) -> None:
    client.get("/api/health")
    client.get("/nowhere")
    health = only(access_records, "/api/health")
    assert health.__dict__["status"] == 200
    assert not hasattr(health, "model")
    assert not hasattr(health, "prompt_tokens")
    assert "model=" not in health.getMessage()
    missing = only(access_records, "/nowhere")
    assert missing.__dict__["status"] == 404


def test_a_stream_is_logged_once_when_it_ends(
    client: httpx.Client, access_records: list[logging.LogRecord]
) -> None:
    body = {"prompt": "hi", "max_length": 4, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        response.read()
    record = only(access_records, "/generate")
    assert record.__dict__["model"] == "tiny"
    assert 1 <= record.__dict__["completion_tokens"] <= 4


def test_errors_made_by_the_app_are_logged(
    client: httpx.Client, access_records: list[logging.LogRecord]
) -> None:
    response = client.post("/api/generate", content=b"{not json")
    assert response.status_code == 400
    assert only(access_records, "/api/generate").__dict__["status"] == 400


def test_the_json_formatter_writes_one_object_per_line(
    client: httpx.Client, access_records: list[logging.LogRecord]
) -> None:
    client.get("/api/health")
    line = JsonLineFormatter().format(only(access_records, "/api/health"))
    assert "\n" not in line
    data = json.loads(line)
    assert data["logger"] == ACCESS_LOGGER
    assert '"GET /api/health" 200' in data["message"]


def test_a_response_cut_short_is_logged_as_incomplete(
    access_records: list[logging.LogRecord],
) -> None:
    async def breaks_mid_response(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("the stream broke")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: Scope = {"type": "http", "method": "GET", "path": "/stream", "client": ("::1", 5)}
    middleware = AccessLogMiddleware(breaks_mid_response)
    with pytest.raises(RuntimeError):
        asyncio.run(middleware(scope, receive, send))
    record = only(access_records, "/stream")
    assert record.__dict__["status"] == 200
    assert record.__dict__["incomplete"] is True
    assert "incomplete" in record.getMessage()
    assert len(sent) == 2

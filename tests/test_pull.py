"""Pulling models over real HTTP from a loopback server that plays a plain mirror and the
Hugging Face Hub (its ``/{repo}/resolve/{revision}/{file}`` layout and metadata headers)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest

from shimmy.errors import InvalidRequest
from shimmy.models import pull
from shimmy.models.discovery import discover_models
from shimmy.models.pull import (
    ProgressThrottle,
    PullError,
    PullEvent,
    PullProgress,
    PullSuccess,
    PullVerifying,
    PullWaiting,
    parse_source,
    pull_model,
)
from shimmy.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import write_tiny_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/tiny-GGUF"
BREAK_AFTER = 100_000


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int = 0
    if_range: str | None = None


@dataclass
class MirrorState:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    hf_files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (repo, path) -> body
    requests: list[Request] = field(default_factory=list)
    honour_range: bool = True
    broken_gets: int = 0  # GETs still to cut off after BREAK_AFTER bytes
    hf_etag: str | None = None  # instead of the real sha256
    hf_size: int | None = None  # instead of the real size
    validators: bool = True  # send ETag and Last-Modified, and honour If-Range
    redirects: dict[str, str] = field(default_factory=dict)  # URL path -> where it moved
    no_length: bool = False  # announce no size (HEAD refused, GET without Content-Length)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self) -> list[Request]:
        return [request for request in self.requests if request.method == "GET"]


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), MirrorHandler)
        self.state = MirrorState()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MirrorServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, *, send_body: bool) -> None:
        state = self.server.state
        request = Request(
            self.command,
            self.path,
            self.headers.get("Range"),
            if_range=self.headers.get("If-Range"),
        )
        with state.lock:
            state.requests.append(request)
        path = urlsplit(self.path).path
        if path in state.redirects:
            request.status = 302
            self.send_response(302)
            self.send_header("Location", state.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        extra: dict[str, str] = {}
        hub = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if hub is not None:
            body = state.hf_files.get((hub["repo"], unquote(hub["file"])))
            if body is not None:
                sha = state.hf_etag or hashlib.sha256(body).hexdigest()
                # What the Hub sends for an LFS file (what get_hf_file_metadata reads).
                extra = {
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{sha}"',
                    "ETag": f'"{sha}"',
                    "X-Linked-Size": str(state.hf_size or len(body)),
                }
        else:
            body = state.files.get(path)
        if body is None:
            request.status = 404
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if state.validators:
            # A version tag of the content, as a static file server's ETag is of its file.
            extra.setdefault("ETag", f'"{hashlib.sha256(body).hexdigest()[:16]}"')
            extra["Last-Modified"] = "Mon, 01 Jan 2024 00:00:00 GMT"
        if state.no_length:
            self._answer_without_length(body, send_body=send_body)
            return
        start, status = 0, 200
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (extra.get("ETag"), extra.get("Last-Modified")):
            wanted = None  # the file changed since: all of it (RFC 9110, 13.1.5)
        if wanted is not None and state.honour_range:
            start, status = int(wanted[1]), 206
            if start >= len(body):
                request.status = 416
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        request.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if not send_body:
            return
        with state.lock:
            cut = state.broken_gets > 0
            state.broken_gets -= cut
        if cut:
            # Send part of the body, then hang up: what a dropped connection looks like.
            self.wfile.write(body[start : start + BREAK_AFTER])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def _answer_without_length(self, body: bytes, *, send_body: bool) -> None:
        if not send_body:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Connection", "close")  # the end of the body is the end of it
        self.end_headers()
        self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def hub(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> MirrorServer:
    """The mirror as the Hugging Face endpoint. huggingface_hub fixes offline mode at import;
    a CI that sets HF_HUB_OFFLINE to keep tests off the internet must not block the loopback."""
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return mirror


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        model_paths=[],
        scan_user_caches=False,
        starter_model=False,
        allow_private_pull=True,  # the mirror is on loopback
    )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "RETRY_DELAY", 0.0)


async def collect(events: AsyncIterator[PullEvent]) -> list[dict[str, Any]]:
    """The events as they go over the wire."""
    return [event.as_dict() async for event in events]


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [event["status"] for event in events]


def folder_listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- plain http ------------------------------------------------------------------------------


async def test_http_pull_streams_progress_and_lands_the_exact_file(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/Tiny_Q8.gguf"] = tiny_model_bytes
    events = await collect(pull_model(f"{mirror.url}/files/Tiny_Q8.gguf", settings))

    kinds = statuses(events)
    assert kinds[-2:] == ["verifying", "success"]
    assert set(kinds[:-2]) == {"downloading"}
    downloading = events[:-2]
    assert downloading[0]["completed"] == 0
    assert downloading[-1]["completed"] == downloading[-1]["total"] == len(tiny_model_bytes)
    completed = [event["completed"] for event in downloading]
    assert completed == sorted(completed)
    assert all(event["total"] == len(tiny_model_bytes) for event in downloading)

    target = settings.models_dir / "Tiny_Q8.gguf"
    assert events[-1] == {"status": "success", "id": "tiny-q8", "path": str(target.resolve())}
    assert target.read_bytes() == tiny_model_bytes
    assert folder_listing(settings.models_dir) == ["Tiny_Q8.gguf", "Tiny_Q8.gguf.verified"]
    assert [request.range for request in mirror.state.gets()] == [None]
    assert [entry.id for entry in discover_models(settings)] == ["tiny-q8"]


async def test_a_published_sha256_fragment_is_checked(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    url = f"{mirror.url}/files/tiny.gguf#sha256={sha256(tiny_model_bytes).upper()}"
    events = await collect(pull_model(url, settings))
    assert events[-1]["status"] == "success"
    assert [request.path for request in mirror.state.gets()] == ["/files/tiny.gguf"]


async def test_a_sha256_mismatch_leaves_nothing_behind(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    url = f"{mirror.url}/files/tiny.gguf#sha256={sha256(b'something else')}"
    events = await collect(pull_model(url, settings))
    assert events[-1]["status"] == "error"
    assert events[-1]["error"]["code"] == "download_corrupt"
    assert "sha256" in events[-1]["error"]["message"]
    assert folder_listing(settings.models_dir) == []


async def test_a_file_that_is_not_gguf_is_rejected_and_removed(
    mirror: MirrorServer, settings: Settings
) -> None:
    mirror.state.files["/files/page.gguf"] = b"<html>a login page, not a model</html>" * 50
    events = await collect(pull_model(f"{mirror.url}/files/page.gguf", settings))
    assert events[-1]["status"] == "error"
    assert events[-1]["error"]["code"] == "model_unusable"
    assert "page.gguf" in events[-1]["error"]["message"]
    assert folder_listing(settings.models_dir) == []


async def test_a_missing_file_is_not_found(mirror: MirrorServer, settings: Settings) -> None:
    events = await collect(pull_model(f"{mirror.url}/files/absent.gguf", settings))
    assert events == [
        {
            "status": "error",
            "error": {
                "code": "not_found",
                "message": f"absent.gguf was not found at 127.0.0.1:{mirror.server_address[1]}",
            },
        }
    ]
    assert mirror.state.gets() == []


# --- interrupted downloads -------------------------------------------------------------------


async def test_a_dropped_connection_is_resumed_with_a_range_request(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    mirror.state.broken_gets = 1
    events = await collect(pull_model(f"{mirror.url}/files/tiny.gguf", settings))
    assert events[-1]["status"] == "success"
    gets = mirror.state.gets()
    assert [(request.range, request.status) for request in gets] == [
        (None, 200),
        (f"bytes={BREAK_AFTER}-", 206),
    ]
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes


async def test_an_interrupted_pull_is_continued_by_the_next_pull(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    mirror.state.broken_gets = 1
    source = f"{mirror.url}/files/tiny.gguf"

    first = await collect(pull_model(source, settings, attempts=1))
    assert first[-1]["status"] == "error"
    assert first[-1]["error"]["code"] == "download_failed"
    assert "pull again" in first[-1]["error"]["message"]
    partial = settings.models_dir / "tiny.gguf.partial"
    assert partial.read_bytes() == tiny_model_bytes[:BREAK_AFTER]
    # The lock is released; the validators of what the partial file holds are kept.
    assert folder_listing(settings.models_dir) == ["tiny.gguf.partial", "tiny.gguf.partial.json"]
    assert discover_models(settings) == []  # half a model is never listed

    second = await collect(pull_model(source, settings))
    assert second[-1]["status"] == "success"
    assert second[0]["completed"] == BREAK_AFTER  # progress starts where it left off
    assert mirror.state.gets()[-1].range == f"bytes={BREAK_AFTER}-"
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes
    assert not partial.exists()


async def test_a_server_that_ignores_range_restarts_from_zero(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    mirror.state.broken_gets = 1
    source = f"{mirror.url}/files/tiny.gguf"
    assert (await collect(pull_model(source, settings, attempts=1)))[-1]["status"] == "error"
    mirror.state.honour_range = False
    events = await collect(pull_model(source, settings))
    assert events[-1]["status"] == "success"
    assert [(r.range, r.status) for r in mirror.state.gets()] == [
        (None, 200),
        (f"bytes={BREAK_AFTER}-", 200),
    ]
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes


async def test_a_partial_file_without_validators_is_not_continued(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    settings.models_dir.mkdir()
    # Nothing says where these bytes came from: continuing them could glue two files together.
    (settings.models_dir / "tiny.gguf.partial").write_bytes(b"\xff" * 5000)
    events = await collect(pull_model(f"{mirror.url}/files/tiny.gguf", settings))
    assert events[-1]["status"] == "success"
    assert [(r.range, r.status) for r in mirror.state.gets()] == [(None, 200)]
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes


async def test_closing_the_stream_early_keeps_the_partial_and_frees_the_lock(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    source = f"{mirror.url}/files/tiny.gguf"
    events = pull_model(source, settings)
    assert isinstance(await anext(events), PullProgress)
    await events.aclose()  # a client that went away
    assert "tiny.gguf.lock" not in folder_listing(settings.models_dir)
    assert "tiny.gguf" not in folder_listing(settings.models_dir)
    done = await collect(pull_model(source, settings))
    assert done[-1]["status"] == "success"
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes


# --- Hugging Face ----------------------------------------------------------------------------


async def test_hf_pull_uses_hub_metadata_and_the_pinned_commit(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "sub/tiny-Q8_0.gguf")] = tiny_model_bytes
    events = await collect(pull_model(f"hf://{REPO}/sub/tiny-Q8_0.gguf", settings))
    assert events[-1] == {
        "status": "success",
        "id": "tiny-q8-0",
        "path": str((settings.models_dir / "tiny-Q8_0.gguf").resolve()),
    }
    assert (settings.models_dir / "tiny-Q8_0.gguf").read_bytes() == tiny_model_bytes
    assert [(request.method, request.path) for request in hub.state.requests] == [
        ("HEAD", f"/{REPO}/resolve/main/sub/tiny-Q8_0.gguf"),
        ("GET", f"/{REPO}/resolve/{COMMIT}/sub/tiny-Q8_0.gguf"),
    ]


async def test_hf_pull_at_a_revision(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "tiny.gguf")] = tiny_model_bytes
    events = await collect(pull_model(f"hf://{REPO}/tiny.gguf@v1.0", settings))
    assert events[-1]["status"] == "success"
    assert hub.state.requests[0].path == f"/{REPO}/resolve/v1.0/tiny.gguf"


async def test_hf_etag_mismatch_is_a_corrupt_download(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "tiny.gguf")] = tiny_model_bytes
    hub.state.hf_etag = sha256(b"what the hub says it should be")
    events = await collect(pull_model(f"hf://{REPO}/tiny.gguf", settings))
    assert events[-1]["error"]["code"] == "download_corrupt"
    assert folder_listing(settings.models_dir) == []


async def test_hf_size_mismatch_is_a_corrupt_download(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "tiny.gguf")] = tiny_model_bytes
    hub.state.hf_size = len(tiny_model_bytes) + 10
    events = await collect(pull_model(f"hf://{REPO}/tiny.gguf", settings))
    assert events[-1]["error"]["code"] == "download_corrupt"
    assert folder_listing(settings.models_dir) == []


async def test_hf_missing_file_is_not_found(hub: MirrorServer, settings: Settings) -> None:
    events = await collect(pull_model(f"hf://{REPO}/absent.gguf", settings))
    assert events[-1]["error"]["code"] == "not_found"
    assert hub.state.gets() == []


async def test_a_file_bigger_than_the_free_space_is_refused_before_downloading(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "huge.gguf")] = tiny_model_bytes
    hub.state.hf_size = 1 << 60
    events = await collect(pull_model(f"hf://{REPO}/huge.gguf", settings))
    assert events[-1]["error"]["code"] == "insufficient_storage"
    assert "is free" in events[-1]["error"]["message"]
    assert hub.state.gets() == []


async def test_offline_mode_is_reported(
    hub: MirrorServer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    events = await collect(pull_model(f"hf://{REPO}/tiny.gguf", settings))
    assert events[-1]["error"]["code"] == "offline"
    assert "HF_HUB_OFFLINE" in events[-1]["error"]["message"]
    assert hub.state.requests == []


# --- files already there ---------------------------------------------------------------------


async def test_pulling_again_is_a_no_op(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    source = f"{mirror.url}/files/tiny.gguf"
    assert (await collect(pull_model(source, settings)))[-1]["status"] == "success"
    again = await collect(pull_model(source, settings))
    assert statuses(again) == ["verifying", "success"]
    assert len(mirror.state.gets()) == 1


async def test_an_identical_file_already_there_matches_the_hub_sha(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    hub.state.hf_files[(REPO, "tiny.gguf")] = tiny_model_bytes
    settings.models_dir.mkdir()
    (settings.models_dir / "tiny.gguf").write_bytes(tiny_model_bytes)  # copied in by hand
    events = await collect(pull_model(f"hf://{REPO}/tiny.gguf", settings))
    assert statuses(events) == ["verifying", "success"]
    assert hub.state.gets() == []


@pytest.mark.parametrize("where", ["http", "hf"])
async def test_a_different_file_of_the_same_name_is_never_overwritten(
    hub: MirrorServer, settings: Settings, tiny_model_bytes: bytes, where: str
) -> None:
    hub.state.files["/files/tiny.gguf"] = tiny_model_bytes
    hub.state.hf_files[(REPO, "tiny.gguf")] = tiny_model_bytes
    settings.models_dir.mkdir()
    mine = settings.models_dir / "tiny.gguf"
    mine.write_bytes(b"GGUF my own model")
    source = f"{hub.url}/files/tiny.gguf" if where == "http" else f"hf://{REPO}/tiny.gguf"
    events = await collect(pull_model(source, settings))
    assert events[-1]["error"]["code"] == "already_exists"
    assert mine.read_bytes() == b"GGUF my own model"
    assert hub.state.gets() == []


async def test_a_second_pull_of_the_same_file_waits_for_the_first(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    source = f"{mirror.url}/files/tiny.gguf"
    first = pull_model(source, settings)
    first_events = [(await anext(first)).as_dict()]  # holds the lock from here on
    second_events: list[dict[str, Any]] = []

    async def drain(events: AsyncIterator[PullEvent], into: list[dict[str, Any]]) -> None:
        into.extend(await collect(events))

    await asyncio.gather(
        drain(first, first_events), drain(pull_model(source, settings), second_events)
    )
    assert first_events[-1]["status"] == "success"
    assert second_events[0]["status"] == "waiting"
    assert second_events[-1] == first_events[-1]
    assert len(mirror.state.gets()) == 1
    assert (settings.models_dir / "tiny.gguf").read_bytes() == tiny_model_bytes


# --- split models ----------------------------------------------------------------------------


async def test_naming_one_part_of_a_split_model_pulls_all_parts(
    mirror: MirrorServer, settings: Settings, tmp_path: Path
) -> None:
    parts = {}
    for index in (1, 2, 3):
        name = f"Big-{index:05d}-of-00003.gguf"
        parts[name] = write_tiny_gguf(tmp_path / name, seed=index).read_bytes()
        mirror.state.files[f"/files/{name}"] = parts[name]
    events = await collect(pull_model(f"{mirror.url}/files/Big-00002-of-00003.gguf", settings))
    assert events[-1]["status"] == "success"
    assert events[-1]["id"] == "big"
    assert events[-2] == {"status": "verifying"}
    assert events[-3]["completed"] == events[-3]["total"] == sum(map(len, parts.values()))
    for name, data in parts.items():
        assert (settings.models_dir / name).read_bytes() == data
    (entry,) = discover_models(settings)
    assert entry.usable and len(entry.shards) == 3


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "",
        "   ",
        "tiny",
        "tiny.gguf",
        "/etc/passwd",
        "file:///etc/passwd",
        "ftp://example.invalid/x.gguf",
        "hf://owner/x.gguf",
        "hf://owner/repo",
        "hf://owner/repo/model.bin",
        "hf://owner/repo/.hidden.gguf",
        "hf://owner/repo/../x.gguf",
        "hf://../repo/x.gguf",
        "hf://owner/re--po/x.gguf",
        "hf://owner/repo/sub/../../x.gguf",
        "hf://owner/repo/x.gguf@",
        "hf://owner/repo/x.gguf@../../main",
        "hf://owner/repo/x.gguf\x00",
        "hf://owner/repo/x-00004-of-00003.gguf",
        "https:///x.gguf",
        "https://user:secret@example.invalid/x.gguf",
        "https://example.invalid:99999/x.gguf",
        "https://example.invalid/x.bin",
        "https://example.invalid/",
        "https://example.invalid/x.gguf#md5=abc",
        "https://example.invalid/x.gguf#sha256=xyz",
        "https://example.invalid/a/..%2F..%2Fx.gguf",
        "https://example.invalid/a/%2e%2e%5cx.gguf",
        "http://example.invalid/big-00001-of-00002.gguf#sha256=" + "0" * 64,
        "https://example.invalid/" + "x" * 3000 + ".gguf",
    ],
    ids=repr,
)
async def test_invalid_sources_are_refused_before_any_event(
    mirror: MirrorServer, settings: Settings, source: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await anext(pull_model(source, settings))
    assert caught.value.param == "model"
    assert mirror.state.requests == []
    assert not settings.models_dir.exists()


def test_parse_source_understands_the_accepted_forms() -> None:
    hf = parse_source("hf://Org/Repo-GGUF/Q4_K_M/model-Q4_K_M.gguf@refs/pr/1")
    assert (hf.kind, hf.repo_id, hf.path_in_repo, hf.revision, hf.filename) == (
        "hf",
        "Org/Repo-GGUF",
        "Q4_K_M/model-Q4_K_M.gguf",
        "refs/pr/1",
        "model-Q4_K_M.gguf",
    )
    url = parse_source("HTTPS://mirror.example/m/x.gguf?sig=1#sha256=" + "AB" * 32)
    assert (url.kind, url.url, url.sha256, url.filename) == (
        "url",
        "https://mirror.example/m/x.gguf?sig=1",
        "ab" * 32,
        "x.gguf",
    )
    parts = parse_source("hf://o/r/big-00002-of-00002.gguf").parts()
    assert [part.path_in_repo for part in parts] == [
        "big-00001-of-00002.gguf",
        "big-00002-of-00002.gguf",
    ]


def test_progress_throttle_lets_through_about_ten_a_second() -> None:
    now = [0.0]
    throttle = ProgressThrottle(0.1, clock=lambda: now[0])
    passed = []
    for step in range(1000):  # one call per millisecond for one second
        now[0] = step / 1000
        passed.append(throttle.due())
    assert passed[0] is True
    assert sum(passed) == 10


@pytest.mark.parametrize(
    "pasted",
    [
        "https://huggingface.co/Org/Repo-GGUF/blob/main/Q4/model-Q4_K_M.gguf",
        "https://huggingface.co/Org/Repo-GGUF/resolve/main/Q4/model-Q4_K_M.gguf?download=true",
        "https://hf.co/Org/Repo-GGUF/resolve/main/Q4/model-Q4_K_M.gguf",
    ],
)
def test_a_hugging_face_file_url_is_pulled_from_the_hub(pasted: str) -> None:
    # The blob URL is the file's HTML page: fetched as is, it would never be a model.
    assert parse_source(pasted) == parse_source("hf://Org/Repo-GGUF/Q4/model-Q4_K_M.gguf@main")


def test_other_urls_on_the_hub_host_stay_plain_downloads() -> None:
    source = parse_source("https://huggingface.co/datasets/x/y/raw/main/a.gguf")
    assert source.kind == "url"


# --- events and errors -----------------------------------------------------------------------


async def test_a_pull_yields_typed_events(
    mirror: MirrorServer, settings: Settings, tiny_model_bytes: bytes
) -> None:
    mirror.state.files["/files/tiny.gguf"] = tiny_model_bytes
    events = [event async for event in pull_model(f"{mirror.url}/files/tiny.gguf", settings)]
    *downloading, verifying, success = events
    assert all(isinstance(event, PullProgress) for event in downloading)
    assert verifying == PullVerifying()
    target = (settings.models_dir / "tiny.gguf").resolve()
    assert success == PullSuccess(id="tiny", path=str(target))


def test_each_event_renders_its_wire_form() -> None:
    assert PullWaiting("busy").as_dict() == {"status": "waiting", "message": "busy"}
    assert PullProgress(total=None, completed=5, file="a.gguf").as_dict() == {
        "status": "downloading",
        "total": None,
        "completed": 5,
        "file": "a.gguf",
    }
    assert PullVerifying().as_dict() == {"status": "verifying"}
    assert PullSuccess(id="a", path="/m/a.gguf").as_dict() == {
        "status": "success",
        "id": "a",
        "path": "/m/a.gguf",
    }
    assert PullError("not_found", "gone").as_dict() == {
        "status": "error",
        "error": {"code": "not_found", "message": "gone"},
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_request", 400),
        ("forbidden", 403),
        ("not_found", 404),
        ("already_exists", 409),
        ("model_unusable", 422),
        ("server_error", 500),
        ("download_failed", 502),
        ("download_corrupt", 502),
        ("offline", 502),
        ("insufficient_storage", 507),
    ],
)
def test_a_pull_error_becomes_an_error_of_its_own_code_and_status(code: str, status: int) -> None:
    error = PullError(code, "what happened").to_error()
    assert (error.code, error.status, error.details) == (code, status, "what happened")
    assert pull.PULL_ERROR_STATUS[code] == status

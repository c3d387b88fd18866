"""Downloading GGUF models into shimmy's own folder (``settings.models_dir``).

A pull is a stream of NDJSON-ready events, so the API can forward it line by line and the CLI
can draw a progress bar from it::

    {"status": "waiting", "message": ...}                   only while another pull holds the file
    {"status": "downloading", "total": N, "completed": M, "file": NAME}   about 10 per second
    {"status": "verifying"}
    {"status": "success", "id": ID, "path": PATH}
    {"status": "error", "error": {"code": CODE, "message": MESSAGE}}      always the last one

``total`` is null while the size is unknown (a server that announces none); ``completed``
counts every byte of every part, including those a previous pull left.

Bytes go to ``<file>.partial`` (never ``*.gguf``, so discovery cannot list half a model) and are
renamed into place only once the size, the sha256 (when the source publishes one) and the GGUF
header have been checked. An interrupted pull leaves the partial file behind and the next one
continues it with an HTTP Range request. ``<file>.lock`` (flock) keeps two pulls of one file
apart; ``<file>.verified`` remembers what a finished file is and where it came from, so pulling
it again is a no-op and a different file of the same name is never overwritten.

Split models (``name-00001-of-00003.gguf``) are pulled whole: naming any part fetches them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from shimmy.errors import InvalidRequest, ModelUnusable, ShimmyError
from shimmy.models.discovery import SHARD_PATTERN, discover_models, normalize_model_id
from shimmy.models.gguf_info import human_size, read_gguf_info
from shimmy.models.safepath import resolve_inside, safe_filename
from shimmy.settings import Settings

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
VERIFIED_SUFFIX = ".verified"
SIDE_FILE_SUFFIXES = (PARTIAL_SUFFIX, LOCK_SUFFIX, VERIFIED_SUFFIX)

PROGRESS_INTERVAL = 0.1  # seconds between "downloading" events
DOWNLOAD_ATTEMPTS = 3  # per file, resuming from what arrived
RETRY_DELAY = 1.0  # seconds, times the attempt number
LOCK_POLL_INTERVAL = 0.25
MAX_SOURCE_CHARS = 2048
MAX_REVISION_CHARS = 255
WRITE_BUFFER_BYTES = 1 << 20
HASH_BLOCK_BYTES = 1 << 20
MAX_VERIFIED_RECORD_BYTES = 1 << 16
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
GGUF_MAGIC = b"GGUF"

# HTTP status for each error code, for callers that answer with one response instead of a
# stream (e.g. ``"stream": false``).
PULL_ERROR_STATUS = MappingProxyType(
    {
        "invalid_request": 400,
        "forbidden": 403,
        "not_found": 404,
        "already_exists": 409,
        "model_unusable": 422,
        "server_error": 500,
        "download_failed": 502,
        "download_corrupt": 502,
        "offline": 503,
        "insufficient_storage": 507,
    }
)

_HF_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REPO_FOLDER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_SHA256_FRAGMENT = re.compile(r"sha256=(?P<hex>[0-9a-fA-F]{64})")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

SOURCE_FORMS = (
    "hf://OWNER/REPO/FILE.gguf (optionally @REVISION), https://HOST/.../FILE.gguf"
    " (optionally #sha256=HEX) or http://HOST/.../FILE.gguf"
)


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullSource:
    """Where one model file comes from. ``text`` is its canonical spelling, recorded next to the
    finished file so that pulling the same source again is recognized."""

    kind: Literal["hf", "url"]
    text: str
    filename: str  # the file name it will have in models_dir
    url: str = ""  # kind "url": the URL without its fragment
    repo_id: str = ""  # kind "hf": OWNER/REPO
    path_in_repo: str = ""  # kind "hf": e.g. "sub/FILE.gguf"
    revision: str | None = None  # kind "hf": branch, tag or commit; None = the default branch
    sha256: str | None = None  # published checksum, lowercase hex (kind "url": '#sha256=')

    def parts(self) -> list[PullSource]:
        """The files to fetch: every shard of a split model, in order; otherwise just this."""
        match = SHARD_PATTERN.match(self.filename)
        if match is None:
            return [self]
        count = int(match["count"])
        return [
            self.with_filename(_shard_name(self.filename, index)) for index in range(1, count + 1)
        ]

    def with_filename(self, filename: str) -> PullSource:
        if self.kind == "hf":
            folder = self.path_in_repo.rpartition("/")[0]
            path_in_repo = f"{folder}/{filename}" if folder else filename
            text = f"hf://{self.repo_id}/{path_in_repo}"
            if self.revision is not None:
                text += f"@{self.revision}"
            return replace(self, text=text, filename=filename, path_in_repo=path_in_repo)
        parts = urlsplit(self.url)
        folder = parts.path.rpartition("/")[0]
        url = urlunsplit(parts._replace(path=f"{folder}/{quote(filename)}"))
        return replace(self, text=url, filename=filename, url=url)


def parse_source(text: object, *, param: str = "model") -> PullSource:
    """Read a pull source; ``InvalidRequest`` (naming ``param``) for anything else. Accepted:
    ``hf://OWNER/REPO/[FOLDER/...]FILE.gguf[@REVISION]``, ``https://.../FILE.gguf[#sha256=HEX]``
    and ``http://...`` (a local mirror)."""
    if not isinstance(text, str):
        raise InvalidRequest("the source must be a string", param=param)
    text = text.strip()
    if not text:
        raise InvalidRequest(f"the source is empty; use {SOURCE_FORMS}", param=param)
    if len(text) > MAX_SOURCE_CHARS:
        raise InvalidRequest(
            f"the source is longer than {MAX_SOURCE_CHARS} characters", param=param
        )
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise InvalidRequest("the source contains control characters", param=param)
    lowered = text.lower()
    if lowered.startswith("hf://"):
        source = _parse_hf(text[len("hf://") :], param)
    elif lowered.startswith(("https://", "http://")):
        hub_path = _hub_file_path(text)
        source = _parse_hf(hub_path, param) if hub_path else _parse_url(text, param)
    else:
        raise InvalidRequest(f"unsupported source {text[:80]!r}; use {SOURCE_FORMS}", param=param)
    match = SHARD_PATTERN.match(source.filename)
    if match is not None:
        index, count = int(match["index"]), int(match["count"])
        if not 1 <= index <= count:
            raise InvalidRequest(f"{source.filename} is not a valid part name", param=param)
        if source.sha256 is not None and count > 1:
            raise InvalidRequest(
                f"#sha256= checks one file, but {source.filename} is one of {count} parts",
                param=param,
            )
    return source


# A file's page or download link as copied from the Hugging Face website:
# https://huggingface.co/OWNER/REPO/blob|resolve/REVISION/PATH.gguf[?download=true]
_HUB_FILE_URL = re.compile(
    r"https://(?:huggingface\.co|hf\.co)/(?P<repo>[^/?#]+/[^/?#]+)/(?:blob|resolve)/"
    r"(?P<revision>[^/?#]+)/(?P<path>[^?#]+\.gguf)(?:\?[^#]*)?",
    re.IGNORECASE,
)


def _hub_file_path(url: str) -> str | None:
    """``OWNER/REPO/PATH.gguf@REVISION`` for a Hugging Face file URL: pulled as ``hf://`` it
    is resumable, honours ``HF_ENDPOINT`` and is checked against the hub's checksum, where
    the ``blob`` page itself would be an HTML page, not the model."""
    match = _HUB_FILE_URL.fullmatch(url)
    if match is None:
        return None
    return f"{match['repo']}/{match['path']}@{match['revision']}"


def _parse_hf(rest: str, param: str) -> PullSource:
    path_text, revision = rest, None
    before, at, after = rest.rpartition("@")
    if at and before.lower().endswith(".gguf"):
        path_text, revision = before, after
        if (
            not revision
            or len(revision) > MAX_REVISION_CHARS
            or _REVISION.fullmatch(revision) is None
            or ".." in revision
        ):
            raise InvalidRequest(f"invalid revision {revision!r}", param=param)
    pieces = path_text.split("/")
    if len(pieces) < 3:
        raise InvalidRequest(
            "a Hugging Face source looks like hf://OWNER/REPO/FILE.gguf", param=param
        )
    owner, repo, *inner = pieces
    for name in (owner, repo):
        if _HF_NAME.fullmatch(name) is None or ".." in name or "--" in name:
            raise InvalidRequest(f"invalid Hugging Face repository name {name!r}", param=param)
    for folder in inner[:-1]:
        if _REPO_FOLDER.fullmatch(folder) is None or ".." in folder:
            raise InvalidRequest(f"invalid folder {folder!r} in the repository path", param=param)
    filename = safe_filename(inner[-1], param=param)
    repo_id, path_in_repo = f"{owner}/{repo}", "/".join(inner)
    text = f"hf://{repo_id}/{path_in_repo}" + (f"@{revision}" if revision else "")
    return PullSource(
        "hf", text, filename, repo_id=repo_id, path_in_repo=path_in_repo, revision=revision
    )


def _parse_url(text: str, param: str) -> PullSource:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as exc:
        raise InvalidRequest(f"invalid URL: {exc}", param=param) from exc
    if not parts.hostname:
        raise InvalidRequest("the URL has no host", param=param)
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("credentials in the URL are not supported", param=param)
    sha256 = None
    if parts.fragment:
        match = _SHA256_FRAGMENT.fullmatch(parts.fragment)
        if match is None:
            raise InvalidRequest(
                "the only URL fragment understood is #sha256=<64 hex digits>", param=param
            )
        sha256 = match["hex"].lower()
    last = unquote(parts.path.rpartition("/")[2])
    if "/" in last or "\\" in last:
        raise InvalidRequest("the URL's file name contains an encoded path separator", param=param)
    filename = safe_filename(last, param=param)
    url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path, parts.query, ""))
    return PullSource("url", url, filename, url=url, sha256=sha256)


def _shard_name(filename: str, index: int) -> str:
    match = SHARD_PATTERN.match(filename)
    assert match is not None
    return f"{match['base']}-{index:05d}-of-{match['count']}{filename[-len('.gguf') :]}"


# --- events ----------------------------------------------------------------------------------


class _PullFailed(Exception):
    """Ends a pull with an error event; raised anywhere below ``pull_model``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProgressThrottle:
    """Lets an event through at most once per ``interval`` seconds; the first always passes."""

    def __init__(
        self, interval: float = PROGRESS_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        now = self._clock()
        if self._last is None or now - self._last >= self._interval:
            self._last = now
            return True
        return False


@dataclass
class _Progress:
    """Bytes of all files of one pull, for "downloading" events."""

    sizes: list[int | None]
    done: list[int]
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    last_sent: tuple[int | None, int] | None = None

    @property
    def total(self) -> int | None:
        return None if None in self.sizes else sum(size or 0 for size in self.sizes)

    def event(self, filename: str, *, force: bool = False) -> dict[str, Any] | None:
        numbers = (self.total, sum(self.done))
        if numbers == self.last_sent or not (self.throttle.due() or force):
            return None
        self.last_sent = numbers
        return {
            "status": "downloading",
            "total": numbers[0],
            "completed": numbers[1],
            "file": filename,
        }


def _error_event(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"code": code, "message": message}}


# --- the pull --------------------------------------------------------------------------------


@dataclass
class _RemoteFile:
    source: PullSource
    target: Path  # the finished model file
    partial: Path
    verified: Path
    url: str = ""  # what to GET
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None  # the published one
    present: bool = False  # an identical file is already in place


async def pull_model(
    source: str | PullSource, settings: Settings, *, attempts: int = DOWNLOAD_ATTEMPTS
) -> AsyncGenerator[dict[str, Any], None]:
    """Download ``source`` into ``settings.models_dir``, yielding progress events (see the
    module docstring). An invalid source raises ``InvalidRequest`` before the first event, so
    callers can answer 400; after that, every failure is the last event, never an exception.
    Closing the iterator early (a client gone) stops the download and keeps the partial file
    for the next pull to continue."""
    parsed = source if isinstance(source, PullSource) else parse_source(source)
    attempts = max(1, attempts)
    lock: _TargetLock | None = None
    try:
        models_dir = settings.models_dir.expanduser().absolute()
        models_dir.mkdir(parents=True, exist_ok=True)
        lock = _TargetLock(_side_path(models_dir, parsed.parts()[0].filename, LOCK_SUFFIX))
        if not lock.try_acquire():
            yield {"status": "waiting", "message": f"another pull of {parsed.filename} is running"}
            await lock.acquire()
        async for event in _pull_locked(parsed, settings, models_dir, attempts):
            yield event
    except _PullFailed as exc:
        yield _error_event(exc.code, exc.message)
    except ShimmyError as exc:
        yield _error_event(exc.code, exc.details or exc.message)
    except httpx.HTTPError as exc:  # e.g. too many redirects, an unsupported redirect target
        yield _error_event("download_failed", f"downloading {parsed.filename} failed: {exc}")
    except OSError as exc:
        logger.warning("pull of %s failed: %s", parsed.text, exc)
        yield _error_event("server_error", f"file system error: {exc.strerror or exc}")
    except Exception:
        logger.exception("pull of %s failed", parsed.text)
        yield _error_event("server_error", "the pull failed unexpectedly; see the server log")
    finally:
        if lock is not None:
            lock.release()


async def _pull_locked(
    source: PullSource, settings: Settings, models_dir: Path, attempts: int
) -> AsyncIterator[dict[str, Any]]:
    async with httpx.AsyncClient(follow_redirects=True, timeout=HTTP_TIMEOUT) as client:
        files = [await _describe(client, part, models_dir) for part in source.parts()]
        for remote in files:
            if remote.target.exists():
                yield {"status": "verifying"}
                remote.present = await _matches_existing(remote)
        pending = [remote for remote in files if not remote.present]
        _check_free_space(models_dir, pending)
        progress = _Progress(
            sizes=[remote.size for remote in pending], done=[_file_size(r.partial) for r in pending]
        )
        for index, remote in enumerate(pending):
            async for event in _download(client, remote, progress, index, attempts):
                yield event
        if pending:
            final = progress.event(pending[-1].source.filename, force=True)
            if final is not None:
                yield final
    if pending:
        yield {"status": "verifying"}
    digests = [await _verify(remote, first=remote is files[0]) for remote in pending]
    # Only now, with every part checked, do the files become visible to discovery.
    for remote, digest in zip(pending, digests, strict=True):
        _move_into_place(remote, digest)
    model_id = await asyncio.to_thread(_model_id_for, files[0].target, settings)
    yield {"status": "success", "id": model_id, "path": str(files[0].target)}


async def _describe(client: httpx.AsyncClient, source: PullSource, models_dir: Path) -> _RemoteFile:
    """Where the file goes, and what the source says about it (size, checksum, final URL)."""
    remote = _RemoteFile(
        source=source,
        target=resolve_inside(models_dir, source.filename, param="model"),
        partial=_side_path(models_dir, source.filename, PARTIAL_SUFFIX),
        verified=_side_path(models_dir, source.filename, VERIFIED_SUFFIX),
        sha256=source.sha256,
    )
    if source.kind == "hf":
        await asyncio.to_thread(_describe_hf_file, remote)
    else:
        remote.url = source.url
        await _describe_url(client, remote)
    return remote


def _describe_hf_file(remote: _RemoteFile) -> None:
    # Imported here: huggingface_hub is slow to import and only pulls need it.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers

    source = remote.source
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per pull honours a mirror
    # configured later in the process too.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    revision = source.revision
    url = hf_hub_url(source.repo_id, source.path_in_repo, revision=revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url)
    except OfflineModeIsEnabled as exc:
        raise _PullFailed("offline", f"{exc} (HF_HUB_OFFLINE is set)") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise _hf_http_failure(source, status) from exc
    except Exception as exc:  # network errors of huggingface_hub's own HTTP stack
        raise _PullFailed("download_failed", f"cannot reach the Hugging Face Hub: {exc}") from exc
    remote.size = metadata.size
    etag = (metadata.etag or "").lower()
    # LFS files (every real GGUF) have their sha256 as ETag; small git files a sha1, no use here.
    if _SHA256_HEX.fullmatch(etag):
        remote.sha256 = etag
    # Download exactly the commit the metadata describes, even if the branch moves meanwhile.
    pinned = metadata.commit_hash or revision
    remote.url = hf_hub_url(source.repo_id, source.path_in_repo, revision=pinned, endpoint=endpoint)
    remote.headers = build_hf_headers(library_name="shimmy")


def _hf_http_failure(source: PullSource, status: int) -> _PullFailed:
    where = f"{source.path_in_repo} in {source.repo_id}"
    if status in (401, 403):
        return _PullFailed(
            "forbidden",
            f"access to {source.repo_id} is restricted (gated or private); log in"
            " with `hf auth login` or set HF_TOKEN after accepting its terms",
        )
    if status == 404:
        return _PullFailed(
            "not_found", f"{where} was not found (check owner, repo, file, revision)"
        )
    return _PullFailed("download_failed", f"the Hub answered HTTP {status} for {where}")


async def _describe_url(client: httpx.AsyncClient, remote: _RemoteFile) -> None:
    try:
        response = await client.head(remote.url, headers={"Accept-Encoding": "identity"})
    except httpx.HTTPError as exc:
        raise _PullFailed("download_failed", f"cannot reach {_host(remote.url)}: {exc}") from exc
    if response.status_code in (401, 403, 404, 410):
        raise _http_failure(remote, response.status_code)
    if response.is_success:
        remote.size = _int_header(response, "Content-Length")
    # Servers that refuse HEAD still get their GET; the size is then learnt from it.


def _http_failure(remote: _RemoteFile, status: int) -> _PullFailed:
    name = remote.source.filename
    if status in (401, 403):
        return _PullFailed("forbidden", f"{_host(remote.url)} refused access to {name}")
    if status in (404, 410):
        return _PullFailed("not_found", f"{name} was not found at {_host(remote.url)}")
    return _PullFailed("download_failed", f"{_host(remote.url)} answered HTTP {status} for {name}")


def _check_free_space(models_dir: Path, pending: list[_RemoteFile]) -> None:
    needed = sum(max((r.size or 0) - _file_size(r.partial), 0) for r in pending)
    free = shutil.disk_usage(models_dir).free
    if needed > free:
        raise _PullFailed(
            "insufficient_storage",
            f"the download needs {human_size(needed)} but only {human_size(free)} is free"
            f" in {models_dir}",
        )


# --- bytes -----------------------------------------------------------------------------------


class _Retry(Exception):
    """A failure worth another attempt (network trouble, 5xx, a confused Range answer)."""


async def _download(
    client: httpx.AsyncClient, remote: _RemoteFile, progress: _Progress, index: int, attempts: int
) -> AsyncIterator[dict[str, Any]]:
    for attempt in range(1, attempts + 1):
        try:
            async for event in _download_once(client, remote, progress, index):
                yield event
            return
        except _PullFailed as exc:
            if exc.code == "download_corrupt":
                remote.partial.unlink(missing_ok=True)
            raise
        except (_Retry, httpx.TransportError) as exc:
            reason = str(exc) or type(exc).__name__
            if attempt == attempts:
                raise _PullFailed(
                    "download_failed",
                    f"downloading {remote.source.filename} failed after {attempts} attempt(s):"
                    f" {reason}; pull again to continue where it stopped",
                ) from exc
            logger.info("download of %s interrupted (%s); resuming", remote.source.filename, reason)
            await asyncio.sleep(RETRY_DELAY * attempt)


async def _download_once(
    client: httpx.AsyncClient, remote: _RemoteFile, progress: _Progress, index: int
) -> AsyncIterator[dict[str, Any]]:
    name = remote.source.filename
    offset = _file_size(remote.partial)
    if remote.size is not None and offset > remote.size:
        offset = _truncate(remote.partial)  # left over from another version of the file
    progress.done[index] = offset
    if remote.size is not None and offset == remote.size and offset > 0:
        return  # complete already: verification will tell whether it is right
    headers = {**remote.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    async with client.stream("GET", remote.url, headers=headers) as response:
        status = response.status_code
        if status == 416 and offset:
            _truncate(remote.partial)
            raise _Retry("the server refused to continue the partial file; starting over")
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}")
        if not response.is_success:
            raise _http_failure(remote, status)
        if offset and status != 206:
            offset = _truncate(remote.partial)  # the server ignored Range and sends it all
        elif offset and _content_range_start(response) != offset:
            _truncate(remote.partial)
            raise _Retry("the server answered the Range request with other bytes")
        progress.done[index] = offset
        _learn_size(remote, response, offset, progress, index)
        event = progress.event(name)
        if event is not None:
            yield event
        with open(remote.partial, "ab" if offset else "wb", opener=_no_follow) as file:
            buffer = bytearray()
            try:
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    progress.done[index] += len(chunk)
                    if remote.size is not None and progress.done[index] > remote.size:
                        raise _PullFailed(
                            "download_corrupt", f"the server sent more than {remote.size} bytes"
                        )
                    if len(buffer) >= WRITE_BUFFER_BYTES:
                        # Emptied before the await: if the task is cancelled during the write,
                        # the finally below must not write these bytes a second time.
                        data = bytes(buffer)
                        buffer.clear()
                        await asyncio.to_thread(file.write, data)
                    event = progress.event(name)
                    if event is not None:
                        yield event
            finally:
                # Whatever arrived is kept, even when the connection broke: the next attempt
                # continues from it.
                file.write(buffer)
            await asyncio.to_thread(_flush_to_disk, file)


def _learn_size(
    remote: _RemoteFile, response: httpx.Response, offset: int, progress: _Progress, index: int
) -> None:
    length = _int_header(response, "Content-Length")
    announced = None if length is None else offset + length
    if response.status_code == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        announced = int(total) if total.isdigit() else announced
    if remote.size is None:
        remote.size = announced
        progress.sizes[index] = announced
        if announced is not None:
            _check_free_space(remote.partial.parent, [remote])
    elif announced is not None and announced != remote.size:
        raise _PullFailed(
            "download_corrupt",
            f"{remote.source.filename} should be {remote.size} bytes but the server sends"
            f" {announced}",
        )


def _content_range_start(response: httpx.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return None if match is None else int(match[1])


# --- checks and the final move ---------------------------------------------------------------


async def _verify(remote: _RemoteFile, *, first: bool) -> str:
    """The sha256 of the downloaded ``remote.partial``, after checking its size, published
    checksum and GGUF header. A bad file is deleted."""
    path = remote.partial
    try:
        actual = path.stat().st_size
        if remote.size is not None and actual != remote.size:
            raise _PullFailed(
                "download_corrupt",
                f"{remote.source.filename} is {actual} bytes; the source says {remote.size}",
            )
        digest = await asyncio.to_thread(_sha256_of, path)
        if remote.sha256 is not None and digest != remote.sha256:
            raise _PullFailed(
                "download_corrupt",
                f"{remote.source.filename} does not match its published sha256"
                f" (expected {remote.sha256}, got {digest})",
            )
        await asyncio.to_thread(_check_gguf, path, remote.source.filename, first)
    except _PullFailed:
        path.unlink(missing_ok=True)
        raise
    return digest


def _check_gguf(path: Path, filename: str, first: bool) -> None:
    try:
        if first:
            read_gguf_info(path)
            return
        # Later parts of a split model carry tensors but not the model's metadata.
        with open(path, "rb") as file:
            if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelUnusable("not a GGUF file")
    except ModelUnusable as exc:
        raise _PullFailed(
            "model_unusable", f"the downloaded {filename} is not a usable GGUF model: {exc.details}"
        ) from exc


async def _matches_existing(remote: _RemoteFile) -> bool:
    """Whether the file already in place is the one asked for; ``already_exists`` when it is
    something else, which is never overwritten."""
    if not remote.target.is_file():
        raise _PullFailed("already_exists", f"{remote.target} exists and is not a file")
    record = _read_verified_record(remote)
    if remote.sha256 is not None:
        existing = (
            str(record["sha256"])
            if record is not None
            else await asyncio.to_thread(_sha256_of, remote.target)
        )
        if existing == remote.sha256:
            return True
    elif (
        record is not None
        and record.get("source") == remote.source.text
        and remote.size in (None, record.get("size"))
    ):
        return True
    raise _PullFailed(
        "already_exists",
        f"{remote.target.name} already exists in {remote.target.parent} with other content;"
        " remove it first",
    )


def _move_into_place(remote: _RemoteFile, digest: str) -> None:
    if os.path.lexists(remote.target):
        raise _PullFailed("already_exists", f"{remote.target.name} appeared while downloading")
    os.replace(remote.partial, remote.target)
    stat = remote.target.stat()
    record = {
        "source": remote.source.text,
        "sha256": digest,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    with open(remote.verified, "w", encoding="utf-8", opener=_no_follow) as file:
        json.dump(record, file)


def _read_verified_record(remote: _RemoteFile) -> dict[str, Any] | None:
    """What ``_move_into_place`` wrote, if it still describes the file (same size and mtime)."""
    try:
        if remote.verified.stat().st_size > MAX_VERIFIED_RECORD_BYTES:
            return None
        record = json.loads(remote.verified.read_text(encoding="utf-8"))
        stat = remote.target.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record


def _model_id_for(target: Path, settings: Settings) -> str:
    """The id discovery gives the new file (it may carry a -2 suffix when a model elsewhere
    already has the name)."""
    for entry in discover_models(settings):
        with contextlib.suppress(OSError):
            if os.path.samefile(entry.path, target):
                return entry.id
    match = SHARD_PATTERN.match(target.name)
    return normalize_model_id(match["base"] if match else target.name[: -len(".gguf")])


# --- locking ---------------------------------------------------------------------------------


class _TargetLock:
    """An exclusive ``flock`` on ``<file>.lock`` for the time of one pull. flock (unlike POSIX
    record locks) also keeps two pulls of one process apart. The file is removed on release."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The previous holder unlinks the file as it finishes; a lock on that orphaned
            # inode would protect nothing, so take it again on the file now at the path.
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                os.close(fd)
                continue
            self._fd = fd
            return True

    async def acquire(self) -> None:
        # Polled rather than a blocking flock in a thread: a waiting pull whose client goes
        # away must be able to stop.
        while not self.try_acquire():
            await asyncio.sleep(LOCK_POLL_INTERVAL)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def pull_in_progress(model_file: Path) -> bool:
    """Whether a pull currently holds the lock of ``model_file`` (for removal)."""
    lock_path = model_file.with_name(model_file.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- small helpers ---------------------------------------------------------------------------


def _side_path(models_dir: Path, filename: str, suffix: str) -> Path:
    return resolve_inside(models_dir, filename + suffix, param="model")


def _no_follow(path: str, flags: int) -> int:
    # A symlink planted at a partial or record path must not redirect our writes.
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _truncate(path: Path) -> int:
    with open(path, "r+b", opener=_no_follow) as file:
        file.truncate(0)
    return 0


def _flush_to_disk(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "")
    return int(value) if value.isdigit() else None


def _host(url: str) -> str:
    return urlsplit(url).netloc or url

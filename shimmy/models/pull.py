"""Downloading GGUF models into shimmy's own folder (``settings.models_dir``).

``pull_model`` yields typed events (``shimmy.models.pull_events``: waiting, progress,
verifying, then success or an error, always the last one), so the API can forward them as NDJSON
and the CLI can draw a progress bar from them.

Bytes go to ``<file>.partial`` (never ``*.gguf``, so discovery cannot list half a model) and are
renamed into place only once the size, the sha256 (when the source publishes one) and the GGUF
header have been checked (``pull_checks``). An interrupted pull leaves the partial file behind
and the next one continues it with an HTTP Range request, guarded by ``If-Range`` with the
validators kept in ``<file>.partial.json`` (``pull_records``): a file that changed upstream is
downloaded again from its first byte. Where a pull may connect is ``pull_policy``'s business
(public https by default). A full disk ends the pull as 507 and removes the partial file.
``<file>.lock`` (flock, ``pull_lock``) keeps two pulls
of one file apart; ``<file>.verified`` remembers what a finished file is and where it came from,
so pulling it again is a no-op and a different file of the same name is never overwritten.

Split models (``name-00001-of-00003.gguf``) are pulled whole: naming any part fetches them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import IO

import httpx

from shimmy.errors import ServerError, ShimmyError, UpstreamFailed
from shimmy.models.discovery import SHARD_PATTERN, discover_models, normalize_model_id
from shimmy.models.gguf_info import human_size
from shimmy.models.pull_checks import (
    continuable,
    discard_partial,
    matches_existing,
    move_into_place,
    verify,
)
from shimmy.models.pull_events import (
    PULL_ERROR_STATUS,
    DownloadCorrupt,
    InsufficientStorage,
    ProgressCounter,
    ProgressThrottle,
    PullError,
    PullEvent,
    PullProgress,
    PullSuccess,
    PullVerifying,
    PullWaiting,
)
from shimmy.models.pull_lock import LOCK_SUFFIX, TargetLock, pull_in_progress
from shimmy.models.pull_policy import GuardedTransport
from shimmy.models.pull_records import (
    RESUME_SUFFIX,
    Validators,
    read_validators,
    write_validators,
)
from shimmy.models.pull_remote import (
    PARTIAL_SUFFIX,
    VERIFIED_SUFFIX,
    RemoteFile,
    describe,
    http_failure,
    int_header,
    side_path,
)
from shimmy.models.pull_source import PullSource, parse_source
from shimmy.settings import Settings

__all__ = [
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "PULL_ERROR_STATUS",
    "RESUME_SUFFIX",
    "SIDE_FILE_SUFFIXES",
    "VERIFIED_SUFFIX",
    "ProgressThrottle",
    "PullError",
    "PullEvent",
    "PullProgress",
    "PullSource",
    "PullSuccess",
    "PullVerifying",
    "PullWaiting",
    "parse_source",
    "pull_in_progress",
    "pull_model",
]

logger = logging.getLogger(__name__)

SIDE_FILE_SUFFIXES = (PARTIAL_SUFFIX, RESUME_SUFFIX, LOCK_SUFFIX, VERIFIED_SUFFIX)
# A full disk or quota: the pull cannot go on, and its partial file is only in the way.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

DOWNLOAD_ATTEMPTS = 3  # per file, resuming from what arrived
RETRY_DELAY = 1.0  # seconds, times the attempt number
WRITE_BUFFER_BYTES = 1 << 20
HASH_BLOCK_BYTES = 1 << 20
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
GGUF_MAGIC = b"GGUF"


async def pull_model(
    source: str | PullSource, settings: Settings, *, attempts: int = DOWNLOAD_ATTEMPTS
) -> AsyncGenerator[PullEvent, None]:
    """Download ``source`` into ``settings.models_dir``, yielding progress events (see
    ``pull_events``). An invalid source raises ``InvalidRequest`` before the first event, so
    callers can answer 400; after that, every failure is the last event, never an exception.
    Closing the iterator early (a client gone) stops the download and keeps the partial file
    for the next pull to continue."""
    parsed = source if isinstance(source, PullSource) else parse_source(source)
    attempts = max(1, attempts)
    lock: TargetLock | None = None
    try:
        models_dir = settings.models_dir.expanduser().absolute()
        models_dir.mkdir(parents=True, exist_ok=True)
        lock = TargetLock(side_path(models_dir, parsed.parts()[0].filename, LOCK_SUFFIX))
        if not lock.try_acquire():
            yield PullWaiting(f"another pull of {parsed.filename} is running")
            await lock.acquire()
        async for event in _pull_locked(parsed, settings, models_dir, attempts):
            yield event
    except ShimmyError as exc:
        yield PullError.of(exc)
    except httpx.HTTPError as exc:  # e.g. too many redirects, an unsupported redirect target
        logger.info("pull of %s failed: %s", parsed.text, exc)
        yield PullError.of(UpstreamFailed(f"downloading {parsed.filename} failed"))
    except OSError as exc:
        logger.warning("pull of %s failed: %s", parsed.text, exc)
        yield PullError.of(ServerError(f"file system error: {exc.strerror or exc}"))
    except Exception:
        logger.exception("pull of %s failed", parsed.text)
        yield PullError.of(ServerError("the pull failed unexpectedly; see the server log"))
    finally:
        if lock is not None:
            lock.release()


async def _pull_locked(
    source: PullSource, settings: Settings, models_dir: Path, attempts: int
) -> AsyncIterator[PullEvent]:
    transport = GuardedTransport(allow_private=settings.allow_private_pull)
    async with httpx.AsyncClient(
        follow_redirects=True, timeout=HTTP_TIMEOUT, transport=transport
    ) as client:
        allow_private = settings.allow_private_pull
        files = [
            await describe(client, part, models_dir, allow_private=allow_private)
            for part in source.parts()
        ]
        for remote in files:
            if remote.target.exists():
                yield PullVerifying()
                remote.present = await matches_existing(remote)
        pending = [remote for remote in files if not remote.present]
        _check_free_space(models_dir, pending)
        progress = ProgressCounter(
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
        yield PullVerifying()
    digests = [await verify(remote, first=remote is files[0]) for remote in pending]
    # Only now, with every part checked, do the files become visible to discovery.
    for remote, digest in zip(pending, digests, strict=True):
        move_into_place(remote, digest)
    model_id = await asyncio.to_thread(_model_id_for, files[0].target, settings)
    yield PullSuccess(model_id, str(files[0].target))


def _check_free_space(models_dir: Path, pending: list[RemoteFile]) -> None:
    needed = sum(max((r.size or 0) - _file_size(r.partial), 0) for r in pending)
    free = shutil.disk_usage(models_dir).free
    if needed > free:
        raise InsufficientStorage(
            f"the download needs {human_size(needed)} but only {human_size(free)} is free"
            f" in {models_dir}",
        )


# --- bytes -----------------------------------------------------------------------------------


class _Retry(Exception):
    """A failure worth another attempt (network trouble, 5xx, a confused Range answer)."""


async def _download(
    client: httpx.AsyncClient,
    remote: RemoteFile,
    progress: ProgressCounter,
    index: int,
    attempts: int,
) -> AsyncIterator[PullProgress]:
    for attempt in range(1, attempts + 1):
        try:
            async for event in _download_once(client, remote, progress, index):
                yield event
            return
        except DownloadCorrupt:
            discard_partial(remote)
            raise
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            discard_partial(remote)
            raise InsufficientStorage(
                f"the disk of {remote.partial.parent} filled up while downloading"
                f" {remote.source.filename}; the partial file was removed",
            ) from exc
        except (_Retry, httpx.TransportError) as exc:
            # Which transport error it was (refused, reset, timed out) stays in the log.
            reason = str(exc) if isinstance(exc, _Retry) else "the connection failed"
            if attempt == attempts:
                raise UpstreamFailed(
                    f"downloading {remote.source.filename} failed after {attempts} attempt(s):"
                    f" {reason}; pull again to continue where it stopped",
                ) from exc
            logger.info("download of %s interrupted (%s); resuming", remote.source.filename, reason)
            await asyncio.sleep(RETRY_DELAY * attempt)


async def _download_once(
    client: httpx.AsyncClient, remote: RemoteFile, progress: ProgressCounter, index: int
) -> AsyncIterator[PullProgress]:
    name = remote.source.filename
    offset = _file_size(remote.partial)
    kept = read_validators(remote.resume) if offset else None
    if offset and not continuable(remote, kept):
        offset = _truncate(remote.partial)  # no telling whether it is the same file upstream
    if remote.size is not None and offset > remote.size:
        offset = _truncate(remote.partial)  # left over from another version of the file
    progress.done[index] = offset
    if remote.size is not None and offset == remote.size and offset > 0:
        return  # complete already: verification will tell whether it is right
    headers = {**remote.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = kept.if_range() if kept is not None else None
        if validator is not None:
            # A server whose file changed answers 200 with all of the new one: start over.
            headers["If-Range"] = validator
    async with client.stream("GET", remote.url, headers=headers) as response:
        status = response.status_code
        if status == 416 and offset:
            _truncate(remote.partial)
            raise _Retry("the server refused to continue the partial file; starting over")
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}")
        if not response.is_success:
            raise http_failure(remote, status)
        if offset and status != 206:
            offset = _truncate(remote.partial)  # a changed file, or Range ignored: all of it
        elif offset and _content_range_start(response) != offset:
            _truncate(remote.partial)
            raise _Retry("the server answered the Range request with other bytes")
        if not offset:
            await asyncio.to_thread(
                write_validators, remote.resume, Validators.of(remote.url, response)
            )
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
                        raise DownloadCorrupt(f"the server sent more than {remote.size} bytes")
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
    remote: RemoteFile, response: httpx.Response, offset: int, progress: ProgressCounter, index: int
) -> None:
    length = int_header(response, "Content-Length")
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
        raise DownloadCorrupt(
            f"{remote.source.filename} should be {remote.size} bytes but the server sends"
            f" {announced}",
        )


def _content_range_start(response: httpx.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return None if match is None else int(match[1])


def _model_id_for(target: Path, settings: Settings) -> str:
    """The id discovery gives the new file (it may carry a -2 suffix when a model elsewhere
    already has the name)."""
    for entry in discover_models(settings):
        with contextlib.suppress(OSError):
            if os.path.samefile(entry.path, target):
                return entry.id
    match = SHARD_PATTERN.match(target.name)
    return normalize_model_id(match["base"] if match else target.name[: -len(".gguf")])


# --- small helpers ---------------------------------------------------------------------------


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

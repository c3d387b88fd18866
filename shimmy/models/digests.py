"""sha256 digests of model files, computed once in the background and remembered.

Ollama's clients show and compare a digest per model. Hashing a model file takes seconds per
gigabyte, so a request never waits for it: ``DigestCache.get`` answers at once with the digest
when it is known and None otherwise, and queues the file for a background thread. Known right
away, without hashing: an Ollama blob (its file name is its digest) and a file ``shimmy pull``
verified (its ``.verified`` record holds the digest).

Digests are kept in a JSON file keyed by the files' identity (device, inode, size, mtime), so a
restart does not hash again and a file that changes is hashed anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from shimmy.models.entry import ModelEntry
from shimmy.models.pull_remote import VERIFIED_SUFFIX

logger = logging.getLogger(__name__)

HASH_BLOCK_BYTES = 1 << 20
MAX_RECORD_BYTES = 1 << 16
MAX_CACHE_FILE_BYTES = 16 << 20
_OLLAMA_BLOB = re.compile(r"sha256-([0-9a-f]{64})")
_SHA256 = re.compile(r"[0-9a-f]{64}")

HashFiles = Callable[[Sequence[Path]], str]


def sha256_of_files(paths: Sequence[Path]) -> str:
    """The sha256 of the files' bytes, one after the other (a split model as a whole)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            while block := file.read(HASH_BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()


def _identity(paths: Sequence[Path]) -> str:
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _known_without_hashing(paths: Sequence[Path]) -> str | None:
    if len(paths) != 1:
        return None
    path = paths[0]
    if (match := _OLLAMA_BLOB.fullmatch(path.name)) is not None:
        return match[1]
    # What ``shimmy pull`` recorded, if it still describes this file.
    record_path = path.with_name(path.name + VERIFIED_SUFFIX)
    try:
        if record_path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(record_path.read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    digest = record.get("sha256")
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None


class DigestCache:
    """Digests by file identity, filled by one background thread that runs while there is
    work and ends when there is none."""

    def __init__(self, cache_file: Path, hash_files: HashFiles = sha256_of_files) -> None:
        self._file = cache_file
        self._hash = hash_files
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._known: dict[str, str] = self._read()
        self._queue: dict[str, tuple[Path, ...]] = {}  # identity -> files, in arrival order
        self._worker: threading.Thread | None = None

    def get(self, entry: ModelEntry) -> str | None:
        """The digest of ``entry``'s files if known; otherwise None, and it is computed soon."""
        paths = tuple(entry.shards or [entry.path])
        try:
            identity = _identity(paths)
        except OSError:
            return None
        with self._lock:
            if identity in self._known:
                return self._known[identity]
        known = _known_without_hashing(paths)
        with self._lock:
            if known is not None:
                self._known[identity] = known
                return known
            self._queue.setdefault(identity, paths)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="shimmy-digests", daemon=True
                )
                self._worker.start()
        return None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being hashed (for callers that must know)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._worker is None, timeout)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    self._idle.notify_all()
                    return
                identity, paths = next(iter(self._queue.items()))
            digest: str | None = None
            try:
                digest = self._hash(paths)
            except OSError as exc:
                logger.warning("cannot hash %s: %s", paths[0], exc)
            with self._lock:
                self._queue.pop(identity, None)
                if digest is not None:
                    self._known[identity] = digest
                    known = dict(self._known)
            if digest is not None:
                self._write(known)

    def _read(self) -> dict[str, str]:
        try:
            if self._file.stat().st_size > MAX_CACHE_FILE_BYTES:
                return {}
            data = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            key: value
            for key, value in data.items()
            if isinstance(key, str) and isinstance(value, str) and _SHA256.fullmatch(value)
        }

    def _write(self, known: dict[str, str]) -> None:
        # Written whole and renamed into place: a crash never leaves half a file.
        temporary: str | None = None
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self._file.parent, prefix=".digests-")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(known, out)
            os.replace(temporary, self._file)
        except OSError as exc:
            logger.warning("cannot save model digests to %s: %s", self._file, exc)
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)

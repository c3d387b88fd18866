"""The small JSON files a pull leaves next to its files.

- ``<file>.verified``: what a finished file is (its sha256, size, mtime, source) and whether it
  was checked against a checksum the source *published* (``verified``). A file whose source
  published none (a plain URL without ``#sha256=``) is only known to be what arrived: it is
  listed with ``verified: false`` in /api/models, never as verified.
- ``<file>.partial.json``: the validators of the download that ``<file>.partial`` holds part of
  (the URL, its strong ETag and Last-Modified). The next attempt sends them in ``If-Range``, so
  a server whose file changed meanwhile answers with the whole new file instead of its tail
  glued to the old file's head; without a validator a partial file is not continued at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RESUME_SUFFIX = ".partial.json"
MAX_RECORD_BYTES = 1 << 16


def _no_follow(path: str, flags: int) -> int:
    # A symlink planted at a record path must not redirect our writes.
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8", opener=_no_follow) as file:
        json.dump(data, file)


# --- finished files ----------------------------------------------------------------------------


def write_verified_record(
    record_path: Path, target: Path, *, source: str, sha256: str, published: bool
) -> None:
    stat = target.stat()
    write_json(
        record_path,
        {
            "source": source,
            "sha256": sha256,
            "verified": published,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        },
    )


def read_verified_record(record_path: Path, target: Path) -> dict[str, Any] | None:
    """The record, if it still describes ``target`` (same size and mtime)."""
    record = _read_json(record_path)
    try:
        stat = target.stat()
    except OSError:
        return None
    if record is None or not isinstance(record.get("sha256"), str):
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record


def is_verified(model_file: Path) -> bool:
    """Whether ``model_file`` was pulled and matched the checksum its source published."""
    record = read_verified_record(model_file.with_name(model_file.name + ".verified"), model_file)
    return record is not None and record.get("verified") is True


# --- partial files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Validators:
    """What identifies one version of a remote file."""

    url: str
    etag: str | None = None  # strong ETags only: If-Range refuses weak ones
    last_modified: str | None = None

    @classmethod
    def of(cls, url: str, response: httpx.Response) -> Validators:
        etag = response.headers.get("ETag")
        if etag is not None and (etag.startswith("W/") or not etag.startswith('"')):
            etag = None
        return cls(url, etag, response.headers.get("Last-Modified"))

    def if_range(self) -> str | None:
        return self.etag or self.last_modified

    def contradicts(self, current: Validators) -> bool:
        """Whether ``current`` (from a HEAD just now) names another version than this."""
        return (self.etag is not None and current.etag not in (None, self.etag)) or (
            self.last_modified is not None
            and current.last_modified not in (None, self.last_modified)
        )


def read_validators(path: Path) -> Validators | None:
    data = _read_json(path)
    if data is None or not isinstance(data.get("url"), str):
        return None
    etag, modified = data.get("etag"), data.get("last_modified")
    return Validators(
        data["url"],
        etag if isinstance(etag, str) else None,
        modified if isinstance(modified, str) else None,
    )


def write_validators(path: Path, validators: Validators) -> None:
    write_json(
        path,
        {"url": validators.url, "etag": validators.etag, "last_modified": validators.last_modified},
    )

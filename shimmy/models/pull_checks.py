"""The checks a pull makes before a file becomes a model, and the move that makes it one.

A downloaded ``<file>.partial`` is checked against the size and the sha256 its source
announced and read as a GGUF header; only then is it renamed into place, with a
``<file>.verified`` record beside it (``pull_records``). Anything that fails is deleted with its
resume record. A file already in place is never overwritten by another of the same name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from shimmy.errors import Conflict, ModelUnusable, ShimmyError
from shimmy.models.gguf_info import read_gguf_info
from shimmy.models.pull_events import DownloadCorrupt
from shimmy.models.pull_records import (
    Validators,
    read_verified_record,
    write_verified_record,
)
from shimmy.models.pull_remote import RemoteFile

HASH_BLOCK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"


async def verify(remote: RemoteFile, *, first: bool) -> str:
    """The sha256 of the downloaded ``remote.partial``, after checking its size, published
    checksum and GGUF header. A bad file is deleted."""
    path = remote.partial
    try:
        actual = path.stat().st_size
        if remote.size is not None and actual != remote.size:
            raise DownloadCorrupt(
                f"{remote.source.filename} is {actual} bytes; the source says {remote.size}",
            )
        digest = await asyncio.to_thread(sha256_of, path)
        if remote.sha256 is not None and digest != remote.sha256:
            raise DownloadCorrupt(
                f"{remote.source.filename} does not match its published sha256"
                f" (expected {remote.sha256}, got {digest})",
            )
        await asyncio.to_thread(check_gguf, path, remote.source.filename, first)
    except ShimmyError:
        discard_partial(remote)
        raise
    return digest


def continuable(remote: RemoteFile, kept: Validators | None) -> bool:
    """Whether the partial file may be continued: it is of this URL, and either the file
    cannot have changed (a commit and a checksum) or a validator lets the server tell."""
    if kept is None or kept.url != remote.url:
        return False
    if remote.immutable:
        return True
    if kept.if_range() is None:
        return False
    return remote.current is None or not kept.contradicts(remote.current)


def discard_partial(remote: RemoteFile) -> None:
    remote.partial.unlink(missing_ok=True)
    remote.resume.unlink(missing_ok=True)


def check_gguf(path: Path, filename: str, first: bool) -> None:
    try:
        if first:
            read_gguf_info(path)
            return
        # Later parts of a split model carry tensors but not the model's metadata.
        with open(path, "rb") as file:
            if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelUnusable("not a GGUF file")
    except ModelUnusable as exc:
        raise ModelUnusable(
            f"the downloaded {filename} is not a usable GGUF model: {exc.details}"
        ) from exc


async def matches_existing(remote: RemoteFile) -> bool:
    """Whether the file already in place is the one asked for; ``already_exists`` when it is
    something else, which is never overwritten."""
    if not remote.target.is_file():
        raise Conflict(f"{remote.target} exists and is not a file")
    record = read_verified_record(remote.verified, remote.target)
    if remote.sha256 is not None:
        existing = (
            str(record["sha256"])
            if record is not None
            else await asyncio.to_thread(sha256_of, remote.target)
        )
        if existing == remote.sha256:
            return True
    elif (
        record is not None
        and record.get("source") == remote.source.text
        and remote.size in (None, record.get("size"))
    ):
        return True
    raise Conflict(
        f"{remote.target.name} already exists in {remote.target.parent} with other content;"
        " remove it first",
    )


def move_into_place(remote: RemoteFile, digest: str) -> None:
    if os.path.lexists(remote.target):
        raise Conflict(f"{remote.target.name} appeared while downloading")
    os.replace(remote.partial, remote.target)
    remote.resume.unlink(missing_ok=True)
    write_verified_record(
        remote.verified,
        remote.target,
        source=remote.source.text,
        sha256=digest,
        published=remote.sha256 is not None,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()

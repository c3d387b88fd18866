"""Keeping two pulls of one file apart: an exclusive ``flock`` on ``<file>.lock`` for the time
of one pull, and the check removal makes that no pull holds a file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path

LOCK_SUFFIX = ".lock"
LOCK_POLL_INTERVAL = 0.25


class TargetLock:
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

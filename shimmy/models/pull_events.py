"""What a pull reports: one typed event per step, and the errors that end a pull.

A pull is a stream of these events; ``as_dict`` gives each one's NDJSON-ready form, so the API
can forward it line by line and the CLI can draw a progress bar from it::

    PullWaiting    {"status": "waiting", "message": ...}     only while another pull holds the file
    PullProgress   {"status": "downloading", "total": N, "completed": M, "file": NAME}
    PullVerifying  {"status": "verifying"}
    PullSuccess    {"status": "success", "id": ID, "path": PATH}
    PullError      {"status": "error", "error": {"code": CODE, "message": MESSAGE}}  always last

``total`` is None while the size is unknown (a server that announces none); ``completed``
counts every byte of every part, including those a previous pull left. Progress comes about
10 times a second (``ProgressThrottle``).

Failures inside a pull are raised as the ``ShimmyError`` that says what went wrong (the
classes below and those of ``shimmy.errors``), complete when created; the pull turns the one
that ends it into its last event, and ``PullError.to_error`` gives a caller that answers with
one response instead of a stream (``"stream": false``, the CLI) an error of the same class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from shimmy.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    ModelUnusable,
    NotFound,
    ServerError,
    ShimmyError,
    UpstreamFailed,
)

PROGRESS_INTERVAL = 0.1  # seconds between "downloading" events


# --- errors ----------------------------------------------------------------------------------


class SourceNotFound(NotFound):
    """The source has no such file."""

    message = "The specified model was not found"


class DownloadCorrupt(UpstreamFailed):
    """What arrived is not what the source announced (size, checksum)."""

    code = "download_corrupt"


class HubOffline(UpstreamFailed):
    """The Hugging Face Hub may not be asked (``HF_HUB_OFFLINE``)."""

    code = "offline"


class InsufficientStorage(ShimmyError):
    code = "insufficient_storage"
    status = 507
    message = "Not enough disk space for the download"


# Every error a pull ends with, by its code.
PULL_ERRORS: Mapping[str, type[ShimmyError]] = MappingProxyType(
    {
        kind.code: kind
        for kind in (
            InvalidRequest,
            Forbidden,
            SourceNotFound,
            Conflict,
            ModelUnusable,
            ServerError,
            UpstreamFailed,
            DownloadCorrupt,
            HubOffline,
            InsufficientStorage,
        )
    }
)

# HTTP status for each error code, for callers that answer with one response instead of a
# stream.
PULL_ERROR_STATUS: Mapping[str, int] = MappingProxyType(
    {code: kind.status for code, kind in PULL_ERRORS.items()}
)


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullWaiting:
    """Another pull of the same file runs; this one starts when it ends."""

    status: ClassVar[str] = "waiting"
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message}


@dataclass(frozen=True, slots=True)
class PullProgress:
    status: ClassVar[str] = "downloading"
    total: int | None  # bytes of all parts; None while unknown
    completed: int
    file: str  # the part being downloaded

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "total": self.total,
            "completed": self.completed,
            "file": self.file,
        }


@dataclass(frozen=True, slots=True)
class PullVerifying:
    status: ClassVar[str] = "verifying"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status}


@dataclass(frozen=True, slots=True)
class PullSuccess:
    status: ClassVar[str] = "success"
    id: str  # the model id discovery gives the new file
    path: str

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "id": self.id, "path": self.path}


@dataclass(frozen=True, slots=True)
class PullError:
    status: ClassVar[str] = "error"
    code: str
    message: str

    @classmethod
    def of(cls, error: ShimmyError) -> PullError:
        return cls(error.code, error.details or error.message)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": {"code": self.code, "message": self.message}}

    def to_error(self) -> ShimmyError:
        """A new error of the class that ended the pull, with the message as its details."""
        return PULL_ERRORS.get(self.code, ServerError)(self.message)


PullEvent = PullWaiting | PullProgress | PullVerifying | PullSuccess | PullError


# --- pacing ----------------------------------------------------------------------------------


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
class ProgressCounter:
    """Bytes of all files of one pull, as ``PullProgress`` events."""

    sizes: list[int | None]
    done: list[int]
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    last_sent: tuple[int | None, int] | None = None

    @property
    def total(self) -> int | None:
        return None if None in self.sizes else sum(size or 0 for size in self.sizes)

    def event(self, filename: str, *, force: bool = False) -> PullProgress | None:
        numbers = (self.total, sum(self.done))
        if numbers == self.last_sent or not (self.throttle.due() or force):
            return None
        self.last_sent = numbers
        return PullProgress(total=numbers[0], completed=numbers[1], file=filename)

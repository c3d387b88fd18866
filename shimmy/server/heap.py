"""Giving freed heap memory back to the system.

A WebSocket frame of a few MiB is decoded into strings that CPython allocates with malloc, not
its own small-object allocator. glibc serves a freed block of that size again from its heap
(after the first free its mmap threshold rises to the block's size, up to 32 MiB) and may keep
a heap's free pages mapped, which is how a server can stay hundreds of MB above its baseline
after the connections that sent big frames have closed (issue 16 measured 1111 MB against a
454 MB baseline). ``malloc_trim(0)`` returns the free pages of every arena; elsewhere than
glibc this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return trim


def trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

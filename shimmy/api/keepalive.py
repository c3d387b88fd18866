"""Ollama-style keep_alive values: seconds as a number, or a duration such as "5m"."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_KEEP_ALIVE = 365 * 24 * 3600.0


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model loaded when idle: 0 = unload at once, -1 (any negative) = never.
    Raises ValueError for anything else, so pydantic reports it against the field."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("keep_alive must be finite")
    if seconds < 0:
        return -1.0
    return min(seconds, MAX_KEEP_ALIVE)


def wants_to_wait(request: Any) -> bool:
    """False when the caller sent ``X-Shimmy-Wait: false``: a model that is still loading then
    answers 503 model_loading with Retry-After instead of holding the request."""
    value = request.headers.get("x-shimmy-wait", "true").strip().lower()
    return value not in ("false", "0", "no")

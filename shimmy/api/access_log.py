"""One access-log line per HTTP request, on the ``shimmy.access`` logger.

The line is written just before the last byte of the response goes out, not after the handler
returns: whoever reads the log after getting a full answer (a test, a tail -f next to a curl)
finds the line already there. A request that never completes its response (the client left in
the middle of a stream, or the app failed after starting it) is logged when the app returns.

Handlers tell the log what they know through the request's state: ``annotate(request,
model=..., usage=...)``. Fields are passed as ``extra`` too, so a JSON formatter can emit them
as keys rather than parsing the message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from shimmy.api.asgi import run_and_report

ACCESS_LOGGER = "shimmy.access"

# Keys in ``scope["state"]`` (what ``request.state.model`` / ``request.state.usage`` write).
MODEL_KEY = "model"
USAGE_KEY = "usage"


class _HasUsage(Protocol):
    def as_dict(self) -> dict[str, int]: ...


def annotate(
    request: HTTPConnection,
    *,
    model: str | None = None,
    usage: _HasUsage | Mapping[str, int] | None = None,
) -> None:
    """Record the model and token usage of this request for the access log and metrics."""
    if model is not None:
        setattr(request.state, MODEL_KEY, model)
    if usage is not None:
        setattr(request.state, USAGE_KEY, usage)


def request_facts(scope: Scope) -> dict[str, Any]:
    """``model``, ``prompt_tokens`` and ``completion_tokens`` that handlers recorded, if any."""
    state = scope.get("state") or {}
    facts: dict[str, Any] = {}
    model = state.get(MODEL_KEY)
    if isinstance(model, str):
        facts["model"] = model
    usage = state.get(USAGE_KEY)
    if usage is not None and not isinstance(usage, Mapping):
        usage = usage.as_dict() if hasattr(usage, "as_dict") else None
    if isinstance(usage, Mapping):
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                facts[key] = usage[key]
    return facts


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def format_line(fields: Mapping[str, Any]) -> str:
    """The human-readable line: ``client "METHOD path" status [model=..] [tokens=in+out] ms``."""
    parts = [f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]}']
    if "model" in fields:
        parts.append(f"model={fields['model']}")
    if "prompt_tokens" in fields or "completion_tokens" in fields:
        parts.append(
            f"tokens={fields.get('prompt_tokens', '?')}+{fields.get('completion_tokens', '?')}"
        )
    if fields.get("incomplete"):
        parts.append("incomplete")
    parts.append(f"{fields['duration_ms']:.1f}ms")
    return " ".join(parts)


class AccessLogMiddleware:
    """Pure ASGI middleware (streams stay streams); put it outermost so that responses made by
    other middleware (401, 429, 413, 500) are logged too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        def write(status: int, complete: bool) -> None:
            fields: dict[str, Any] = {
                "client": _client(scope),
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                **request_facts(scope),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            if not complete:
                fields["incomplete"] = True
            self.logger.info(format_line(fields), extra=fields)

        await run_and_report(self.app, scope, receive, send, write)

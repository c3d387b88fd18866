"""The one place where failures become response bodies.

Every transport (native HTTP, OpenAI-compatible ``/v1``, WebSocket) reports errors through the
helpers here, so codes, statuses and wording stay the same everywhere. Bodies only ever contain
the error's code, its fixed message and its client-facing details: never a traceback or the
repr of an internal exception.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from shimmy.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ShimmyError,
    unexpected_error,
)

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1"
# Anthropic's Messages API lives inside /v1 and has an error shape of its own.
ANTHROPIC_PREFIX = "/v1/messages"
# Ollama's and RKLLama's clients read a bare message: ``{"error": "..."}``.
FLAT_ERROR_PREFIXES = ("/ollama", "/rkllama")
# llama.cpp's server routes (shimmy.api.llamacpp) answer errors the way llama.cpp does.
# llama.cpp's routes, and OpenAI's as llama.cpp serves them without /v1: its error body.
LLAMACPP_PATHS = frozenset(
    {
        "/infill",
        "/completion",
        "/completions",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/props",
        "/slots",
        "/chat/completions",
        "/embeddings",
        "/models",
    }
)

# How many pydantic errors one response lists; a huge invalid body must not make a huge reply.
_MAX_LISTED_ERRORS = 5
_MAX_DETAILS_CHARS = 1000


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def has_flat_errors(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in FLAT_ERROR_PREFIXES)


def error_message(err: ShimmyError) -> str:
    """The message and its details in one line, for dialects that show a single string."""
    return f"{err.message}: {err.details}" if err.details else err.message


def flat_error_body(err: ShimmyError) -> dict[str, Any]:
    return {"error": error_message(err)}


def is_llamacpp_path(path: str) -> bool:
    return path in LLAMACPP_PATHS


def native_error_body(err: ShimmyError) -> dict[str, Any]:
    return {"error": {"code": err.code, "message": err.message, "details": err.details}}


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(err: ShimmyError) -> dict[str, Any]:
    # OpenAI clients show ``message`` to users, so it carries the specific details when we have
    # them; the generic wording alone ("The request is invalid") would hide what to fix.
    message = f"{err.message}: {err.details}" if err.details else err.message
    return {
        "error": {
            "message": message,
            "type": openai_error_type(err.status),
            "param": err.param,
            "code": err.code,
        }
    }


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(err: ShimmyError) -> dict[str, Any]:
    """Anthropic's ``{"type": "error", "error": {"type", "message"}}``; its SDK raises by
    status and shows ``message``, so the message carries the details."""
    message = f"{err.message}: {err.details}" if err.details else err.message
    return {
        "type": "error",
        "error": {"type": anthropic_error_type(err.status), "message": message},
    }


def llamacpp_error_body(err: ShimmyError) -> dict[str, Any]:
    """``{"error": {"code": <HTTP status>, "message", "type"}}``, llama.cpp's error body."""
    message = f"{err.message}: {err.details}" if err.details else err.message
    kind = openai_error_type(err.status)
    sizes: dict[str, Any] = {}
    if err.code == "context_length_exceeded":
        kind = "exceed_context_size_error"
        # Clients shorten the prompt by these (where the engine measured them).
        sizes = {k: v for k, v in err.extra.items() if k in ("n_prompt_tokens", "n_ctx")}
    elif err.status in _LLAMACPP_TYPES:
        kind = _LLAMACPP_TYPES[err.status]
    return {"error": {"code": err.status, "message": message, "type": kind, **sizes}}


_LLAMACPP_TYPES = {
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def ws_error_frame(err: ShimmyError) -> dict[str, Any]:
    message = f"{err.message}: {err.details}" if err.details else err.message
    return {"error": {"code": err.code, "message": message}}


def _retry_after_header(err: ShimmyError) -> dict[str, str]:
    if err.retry_after is None:
        return {}
    # Retry-After takes whole seconds; round up so clients never retry too early.
    return {"Retry-After": str(max(1, math.ceil(err.retry_after)))}


def error_response(
    err: ShimmyError, request: HTTPConnection, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The HTTP response for ``err``, in the dialect of the path that was requested."""
    path = request.url.path
    if is_anthropic_path(path):
        body = anthropic_error_body(err)
    elif is_openai_path(path):
        body = openai_error_body(err)
    elif has_flat_errors(path):
        body = flat_error_body(err)
    elif is_llamacpp_path(path):
        body = llamacpp_error_body(err)
    else:
        body = native_error_body(err)
    all_headers = {**_retry_after_header(err), **(headers or {})}
    return JSONResponse(body, status_code=err.status, headers=all_headers)


# pydantic puts the member of a union that failed into ``loc`` ("constrained-str",
# "list[TextPart]", "function-after[...]"); those are type names, not fields the client sent.
_UNION_TAG = re.compile(r"\[|^[a-z]+(-[a-z]+)+$|^(str|int|float|bool|bytes|dict|list|none)$")


def _field_name(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if not _UNION_TAG.search(str(part)))


def validation_error(exc: ValidationError) -> InvalidRequest:
    """A readable one-line ``InvalidRequest`` naming the offending field(s).

    The input values are left out on purpose: they can be large, and echoing request content in
    errors (which end up in logs) is not useful to anyone.
    """
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    parts: list[str] = []
    first_field: str | None = None
    for problem in problems[:_MAX_LISTED_ERRORS]:
        field = _field_name(problem["loc"])
        message = problem["msg"]
        if problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        if problem["type"] == "json_invalid":
            message = "Request body is not valid JSON"
        part = f"{field}: {message}" if field else message
        if part in parts:
            continue  # the same complaint from two members of a union
        first_field = first_field or field or None
        parts.append(part)
    if len(problems) > _MAX_LISTED_ERRORS:
        parts.append(f"(and {len(problems) - _MAX_LISTED_ERRORS} more)")
    details = "; ".join(parts)
    if len(details) > _MAX_DETAILS_CHARS:
        details = details[: _MAX_DETAILS_CHARS - 3] + "..."
    return InvalidRequest(details, param=first_field)


def from_http_exception(exc: HTTPException) -> ShimmyError:
    """Starlette raises ``HTTPException`` for routing failures (404, 405) and a few others."""
    if exc.status_code == 404:
        return NotFound("No such endpoint")
    if exc.status_code == 405:
        return MethodNotAllowed("This endpoint does not accept that HTTP method")
    if exc.status_code == 413:
        return PayloadTooLarge()
    if 400 <= exc.status_code < 500:
        return InvalidRequest(str(exc.detail), status=exc.status_code)
    return ServerError(status=exc.status_code)


async def handle_shimmy_error(request: HTTPConnection, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ShimmyError)
    return error_response(exc, request)


async def handle_validation_error(request: HTTPConnection, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return error_response(validation_error(exc), request)


async def handle_http_exception(request: HTTPConnection, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # Keep headers such as ``Allow`` on a 405.
    return error_response(from_http_exception(exc), request, headers=dict(exc.headers or {}))


async def handle_unexpected_error(request: HTTPConnection, exc: Exception) -> JSONResponse:
    return error_response(unexpected_error(exc), request)

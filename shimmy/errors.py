"""The one hierarchy of domain errors.

Every failure a client can see is a ``ShimmyError``. Transport layers (HTTP native, OpenAI /v1,
WebSocket) translate these in exactly one place each (``shimmy.api.errors``); nothing else builds
error responses, so codes, statuses and wording stay consistent.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Self

_log = logging.getLogger(__name__)


class ShimmyError(Exception):
    """Base of all errors shown to clients. ``code`` is the contract's error code."""

    code: str = "server_error"
    status: int = 500
    message: str = "Internal server error"

    def __init__(
        self,
        details: str | None = None,
        *,
        message: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        self.details = details
        if message is not None:
            self.message = message
        if status is not None:
            self.status = status
        self.param = param
        self.retry_after = retry_after
        self.extra = extra or {}
        super().__init__(details or self.message)

    def copy_with(self, *, param: str | None = None, details: str | None = None) -> Self:
        """The same error about another field or with other details: a new object, since an
        error may already be held by someone else once raised."""
        clone = copy.copy(self)
        if param is not None:
            clone.param = param
        if details is not None:
            clone.details = details
            clone.args = (details,)
        return clone


class InvalidRequest(ShimmyError):
    code = "invalid_request"
    status = 400
    message = "The request is invalid"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"
    message = "The prompt is longer than the model's context"


class TemplateError(InvalidRequest):
    code = "template_error"
    message = "The model's chat template could not be rendered"


class FimUnsupported(InvalidRequest):
    """A suffix (fill-in-the-middle) was sent to a model without FIM tokens: answered, never
    ignored, since a prefix-only continuation would look like an answer and be wrong."""

    code = "fim_unsupported"
    message = "This model cannot fill in the middle"


class Unauthorized(ShimmyError):
    code = "unauthorized"
    status = 401
    message = "A valid API key is required"


class Forbidden(ShimmyError):
    code = "forbidden"
    status = 403
    message = "This request is not allowed"


class ModelNotFound(ShimmyError):
    code = "model_not_found"
    status = 404
    message = "The specified model was not found"


class NotFound(ShimmyError):
    code = "not_found"
    status = 404
    message = "Not found"


class MethodNotAllowed(ShimmyError):
    code = "method_not_allowed"
    status = 405
    message = "Method not allowed"


class RequestTimeout(ShimmyError):
    """The client was too slow to send its request (its head, or its body's floor rate)."""

    code = "request_timeout"
    status = 408
    message = "The request did not arrive in time"


class PayloadTooLarge(ShimmyError):
    code = "payload_too_large"
    status = 413
    message = "The request body is too large"


class RateLimited(ShimmyError):
    code = "rate_limited"
    status = 429
    message = "Too many requests"


class ModelUnusable(ShimmyError):
    """The file exists but cannot be served (not GGUF, truncated, unsupported)."""

    code = "model_unusable"
    status = 422
    message = "The model file cannot be loaded"


class GenerationFailed(ShimmyError):
    code = "generation_failed"
    status = 500
    message = "Text generation failed"


class ServerError(ShimmyError):
    code = "server_error"
    status = 500
    message = "Internal server error"


class ModelCrashed(ShimmyError):
    """The model's worker process died (llama.cpp aborted, a segfault, the OOM killer). Only
    that model's requests end; the next request loads it again."""

    code = "model_crashed"
    status = 500
    message = "The model crashed"


class ServerBusy(ShimmyError):
    code = "server_busy"
    status = 503
    message = "The server is busy; try again shortly"


class ShuttingDown(ServerBusy):
    """The server stopped before the request was answered (SIGTERM and its grace ran out)."""

    code = "server_shutting_down"
    message = "The server is shutting down"


class InsufficientMemory(ShimmyError):
    code = "insufficient_memory"
    status = 507
    message = "Not enough memory to load the model"


class Conflict(ShimmyError):
    code = "already_exists"
    status = 409
    message = "It already exists"


class UpstreamFailed(ShimmyError):
    code = "download_failed"
    status = 502
    message = "The download failed"


class ModelLoading(ShimmyError):
    code = "model_loading"
    status = 503
    message = "The model is loading; try again shortly"


def unexpected_error(exc: BaseException) -> ServerError:
    """Log an unexpected exception in full server-side; the client only learns it happened."""
    _log.error("unexpected error while serving a request", exc_info=exc)
    return ServerError()

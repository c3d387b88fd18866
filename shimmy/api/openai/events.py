"""What the OpenAI endpoints' answers share: the envelope (id, created, model, fingerprint),
usage, finish reasons, and the stream events common to chat and text completions."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shimmy import __version__
from shimmy.api.errors import openai_error_body
from shimmy.api.sse import DONE, sse_event
from shimmy.engine.types import Finished, Usage
from shimmy.errors import ShimmyError

SYSTEM_FINGERPRINT = f"shimmy-{__version__}"


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


def usage_object(usage: Usage) -> dict[str, Any]:
    return {**usage.as_dict(), "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def finish_reason(finished: Finished) -> str:
    # "cancelled" only happens once the client is gone; nobody reads it, but keep the enum.
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason


class OpenAIEvents:
    """What chat and text completion streams share: the envelope, usage and the error event."""

    def __init__(self, meta: ResponseMeta, object_name: str, include_usage: bool) -> None:
        self.envelope = meta.envelope(object_name)
        self.include_usage = include_usage
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        self.usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(self, choice: dict[str, Any]) -> bytes:
        return sse_event({**self.envelope, "choices": [choice], **self.usage_field})

    def usage_chunk(self, usage: Usage) -> Iterable[bytes]:
        if not self.include_usage:
            return ()
        return (sse_event({**self.envelope, "choices": [], "usage": usage_object(usage)}),)

    def error(self, err: ShimmyError) -> Iterable[bytes]:
        return (sse_event(openai_error_body(err)),)

    def closing(self) -> Iterable[bytes]:
        return (DONE,)

"""Chat messages as every prompt format reads them: known roles, content always a string.

Checked once, before any format runs, so that a builtin format and a GGUF template see the same
shape and a malformed request is an ``InvalidRequest`` naming the message, never a template
failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shimmy.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")
MAX_ERROR_DETAIL = 300


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and return copies whose ``content`` is always a string.

    Content given as parts (``[{"type": "text", "text": ...}]``) is joined by newlines, as the
    API layers do. Other keys (``tool_calls``, ``tool_call_id``, ``name``, ...) are kept for
    templates that read them.
    """
    if not isinstance(messages, list | tuple):
        raise InvalidRequest("messages must be a list", param="messages")
    normalized: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, not "
                f"{clip(repr(role), 60)}",
                param="messages",
            )
        copy = dict(message)
        copy["content"] = _content_text(message.get("content"), index)
        normalized.append(copy)
    return normalized


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"messages[{index}].content must be a string or a list of text parts",
            param="messages",
        )
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text") if isinstance(part, Mapping) else None
        if kind not in ("text", "input_text") or not isinstance(text, str):
            raise InvalidRequest(
                f"messages[{index}].content has a part of type {clip(repr(kind), 40)}; "
                "only text parts are supported",
                param="messages",
            )
        texts.append(text)
    return "\n".join(texts)


def normalize_tools(tools: Any) -> list[Any] | None:
    if tools is None:
        return None
    if not isinstance(tools, list | tuple):
        raise InvalidRequest("tools must be a list", param="tools")
    return list(tools)


def clip(text: str, limit: int = MAX_ERROR_DETAIL) -> str:
    """``text`` cut to ``limit`` characters, for quoting request or template text in an error."""
    return text if len(text) <= limit else text[: limit - 1] + "…"

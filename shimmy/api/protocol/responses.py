"""What every dialect's response models share: the base class and token usage.

Response models describe the JSON the handlers answer; ``/openapi.json`` publishes their
schemas. They allow fields they do not list, like the schemas clients were given before: an
added field must not break anyone. A field the handler sometimes leaves out is typed
``X | SkipJsonSchema[None] = None`` (omitted, never null); one it always sends has no default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def _no_defaults(schema: dict[str, Any]) -> None:
    # A response has no defaults: the server sends what it sends. (pydantic would write
    # "default": null even for fields that are left out rather than sent as null.)
    for field in schema.get("properties", {}).values():
        field.pop("default", None)


class ResponseModel(BaseModel):
    """Base of every response model: extra fields are allowed (and kept)."""

    model_config = ConfigDict(
        extra="allow", protected_namespaces=(), json_schema_extra=_no_defaults
    )


class Usage(ResponseModel):
    """Tokens of one generation, or of several added up."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

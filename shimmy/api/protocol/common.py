"""Strict wire types every dialect shares, declared once.

Validation is strict on purpose: ``"max_tokens": "50"`` or ``"temperature": NaN`` is a client
bug that should be reported, not silently coerced. Ints are still accepted where floats are
expected (``"temperature": 1`` is a perfectly good JSON number). Unknown fields are ignored, so
clients that send more than a dialect uses are not rejected outright.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

import pydantic_core
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from shimmy.api.errors import validation_error
from shimmy.errors import InvalidRequest

MAX_STOP_STRINGS = 16

# Numbers: floats refuse NaN and infinities (``allow_inf_nan=False`` on every model below).
StrictFloat = Annotated[float, Field(strict=True)]
StrictInteger = Annotated[int, Field(strict=True)]
NonEmptyStr = Annotated[str, Field(strict=True, min_length=1)]
PositiveInt = Annotated[StrictInteger, Field(ge=1)]
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopP = Annotated[StrictFloat, Field(ge=0, le=1)]
# The upper bound keeps the value inside llama.cpp's C int.
TopK = Annotated[StrictInteger, Field(ge=0, le=2**31 - 1)]
RepetitionPenalty = Annotated[StrictFloat, Field(gt=0)]

_TEXT_PART_TYPES = ("text", "input_text")
_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"enum": list(_TEXT_PART_TYPES)},
                    "text": {"type": "string"},
                },
                "required": ["type", "text"],
            },
        },
    ]
}


class WireModel(BaseModel):
    """Base of every request model: unknown fields ignored, non-finite numbers refused."""

    model_config = ConfigDict(
        extra="ignore", allow_inf_nan=False, populate_by_name=True, protected_namespaces=()
    )


def _stop_strings(value: Any) -> Any:
    """Accept a single string where a list of strings is expected.

    Normalizing before validation (instead of a ``str | list[str]`` union) keeps error messages
    about one thing: pydantic reports a failed union once per member.
    """
    if value is None:  # clients that send every field send ``"stop": null`` for "none"
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("string_or_list", "Input should be a string or a list of strings")
    return value


# Stop strings: one or a list, at most MAX_STOP_STRINGS, none empty.
StopList = Annotated[
    list[NonEmptyStr],
    Field(max_length=MAX_STOP_STRINGS),
    BeforeValidator(_stop_strings),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "maxItems": MAX_STOP_STRINGS,
                },
                {"type": "null"},
            ]
        }
    ),
]


def _default_model(value: Any) -> Any:
    # OpenAI's SDKs and llama.cpp's tests send ``"model": null`` for "whichever is served".
    return "default" if value is None else value


# The model a request names: its id or an alias; "default" (or null, or none) for the default.
ModelField = Annotated[
    str,
    Field(strict=True, min_length=1),
    BeforeValidator(_default_model),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}),
]

MAX_LOGIT_BIAS = 1024
MAX_BIAS_TEXT = 256


def _logit_bias(value: Any) -> list[tuple[int | str, float]]:
    """llama.cpp's and OpenAI's ``logit_bias``: ``{"15043": -100}`` or ``[[15043, -100]]``,
    where a key is a token id or a text (its every token gets the bias), and a bias of
    ``false`` bans the token (-inf). OpenAI's keys are ids, written as strings."""
    if value is None:  # clients that send every field send null for "none"
        return []
    if isinstance(value, dict):
        pairs = [(_id_or_text(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        pairs = []
        for item in value:
            if not (isinstance(item, list) and len(item) == 2):
                raise PydanticCustomError("logit_bias", "each entry is a [token, bias] pair")
            key = item[0]
            if not (isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))):
                raise PydanticCustomError("logit_bias", "a token is an id or a text")
            pairs.append((key, item[1]))
    else:
        raise PydanticCustomError("logit_bias", "Input should be an object or a list of pairs")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise PydanticCustomError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    entries: list[tuple[int | str, float]] = []
    for key, bias in pairs:
        if isinstance(key, int) and not 0 <= key < 2**31:
            raise PydanticCustomError("logit_bias", "token ids are non-negative")
        if isinstance(key, str) and not 0 < len(key) <= MAX_BIAS_TEXT:
            raise PydanticCustomError("logit_bias", f"a text is 1 to {MAX_BIAS_TEXT} characters")
        if bias is False:
            entries.append((key, float("-inf")))
        elif bias is True:  # llama.cpp ignores it; there is nothing "true" could add
            continue
        elif isinstance(bias, int | float) and math.isfinite(bias):
            entries.append((key, float(bias)))
        else:
            raise PydanticCustomError("logit_bias", "a bias is a finite number or false")
    return entries


def _id_or_text(key: str) -> int | str:
    return int(key) if key.isascii() and key.isdigit() else key


# Validated whole by ``_logit_bias`` (its -inf for ``false`` would not pass a float field).
LogitBias = Annotated[
    Any,
    BeforeValidator(_logit_bias),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "object", "additionalProperties": {"type": ["number", "boolean"]}},
                {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2}},
                {"type": "null"},
            ],
            "description": "Token id (or text) to a bias added to its logit; false bans it",
        }
    ),
]


def content_text(value: Any) -> str:
    """A message's content as text: a string, or text parts joined by newlines. Only text is
    understood: these models read text, and silently dropping an image would mislead."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError(
            "content_type", "Input should be a string or a list of text parts"
        )
    texts: list[str] = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind not in _TEXT_PART_TYPES:
            raise PydanticCustomError(
                "content_part",
                "content parts of type {kind} are not supported; only text parts are",
                {"kind": repr(kind)[:60]},
            )
        if not isinstance(text, str):
            raise PydanticCustomError("content_part", "a text part needs a string 'text'")
        texts.append(text)
    return "\n".join(texts)


def _optional_content_text(value: Any) -> str:
    return "" if value is None else content_text(value)


MessageContent = Annotated[str, BeforeValidator(content_text), WithJsonSchema(_CONTENT_SCHEMA)]
OptionalMessageContent = Annotated[
    str,
    BeforeValidator(_optional_content_text),
    WithJsonSchema({"anyOf": [*_CONTENT_SCHEMA["anyOf"], {"type": "null"}]}),
]


class ChatMessage(WireModel):
    """One message of a conversation, as every dialect sends it (roles are checked by the chat
    template layer, which knows which ones exist)."""

    role: NonEmptyStr
    content: MessageContent


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON text; a malformed (or absurdly nested) document is an ``InvalidRequest``.

    pydantic-core's parser is used rather than ``json`` because it bounds nesting depth instead
    of hitting Python's recursion limit. NaN and Infinity are parsed here and rejected by the
    schema, so the error names the field that holds them.
    """
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON ({exc})") from None


def validate_body(model: type[ModelT], data: Any) -> ModelT:
    """Validate parsed JSON as ``model``; a violation is an ``InvalidRequest`` naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_body(model: type[ModelT], raw: bytes | str) -> ModelT:
    return validate_body(model, parse_json(raw))


__all__ = [
    "MAX_STOP_STRINGS",
    "ChatMessage",
    "LogitBias",
    "MessageContent",
    "ModelField",
    "NonEmptyStr",
    "OptionalMessageContent",
    "PositiveInt",
    "RepetitionPenalty",
    "StopList",
    "StrictFloat",
    "StrictInteger",
    "StrictStr",
    "Temperature",
    "TopK",
    "TopP",
    "WireModel",
    "parse_body",
    "parse_json",
    "validate_body",
]

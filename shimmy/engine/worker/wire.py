"""What the server and a model worker say to each other: msgpack messages on a socket.

msgpack is self-delimiting, so the stream needs no framing of its own: a reader feeds bytes to
an ``Unpacker`` and gets whole messages. A message is a list whose first item names it. The
engine's plain data (requests, events, the model's entry) travels as msgpack extension types,
one code per dataclass, and shimmy's errors as their class name and fields, so both ends work
with the same objects they would in one process.

Server to worker: ``submit`` [ids, requests], ``cancel`` id, ``call`` id method args, ``close``.
Worker to server: ``progress`` fraction, ``ready`` facts, ``load_failed`` error, ``event`` id
event, ``fail`` id error, ``result`` id value, ``error`` id error, ``finished`` usage times,
``stats`` dict.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgpack

from shimmy import errors
from shimmy.engine.types import (
    EarlyStop,
    EmbeddingResult,
    FimTokens,
    Finished,
    GenerationRequest,
    PromptToken,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shimmy.models.entry import ModelEntry

# The extension code of each type is its place here: append, never reorder, while a server
# and a worker of different versions cannot meet (both come from the same installation).
_DATACLASSES: tuple[type, ...] = (
    SamplingParams,
    EarlyStop,
    GenerationRequest,
    Usage,
    TokenLogprob,
    PromptToken,
    TextDelta,
    Finished,
    EmbeddingResult,
    FimTokens,
    ModelEntry,
)
_CODES = {cls: code for code, cls in enumerate(_DATACLASSES)}
_PATH = 100
_ERROR = 101
# Fields that are tuples (msgpack sends lists), and how deep: 2 for a tuple of pairs.
_TUPLE_FIELDS: dict[type, dict[str, int]] = {SamplingParams: {"chain": 1, "logit_bias": 2}}


def _tuples(value: Any, depth: int) -> Any:
    if depth == 0 or not isinstance(value, list):
        return value
    return tuple(_tuples(item, depth - 1) for item in value)


def _encode(obj: Any) -> msgpack.ExtType:
    code = _CODES.get(type(obj))
    if code is not None:
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init]
        return msgpack.ExtType(code, pack(values))
    if isinstance(obj, Path):
        return msgpack.ExtType(_PATH, str(obj).encode())
    if isinstance(obj, errors.ShimmyError):
        state = [type(obj).__name__, obj.details, obj.message, obj.param, obj.retry_after]
        return msgpack.ExtType(_ERROR, pack([*state, obj.extra, obj.status]))
    raise TypeError(f"cannot send {type(obj).__name__} to a model worker")


def _decode(code: int, data: bytes) -> Any:
    if code == _PATH:
        return Path(data.decode())
    if code == _ERROR:
        name, details, message, param, retry_after, extra, status = unpack(data)
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ShimmyError)):
            cls = errors.GenerationFailed
        error = cls(details, param=param, retry_after=retry_after, extra=extra, status=status)
        error.message = message
        return error
    cls = _DATACLASSES[code]
    values = unpack(data)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = dict(zip(names, values, strict=True))
    for name, depth in _TUPLE_FIELDS.get(cls, {}).items():
        kwargs[name] = _tuples(kwargs[name], depth)
    return cls(**kwargs)


def pack(message: Any) -> bytes:
    return msgpack.packb(message, default=_encode, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_decode, raw=False, strict_map_key=False)


def unpacker() -> msgpack.Unpacker:
    """Whole messages out of a byte stream fed in pieces. ``max_buffer_size`` bounds what a
    broken peer can make this side hold; a real message (a long prompt) is far below it."""
    return msgpack.Unpacker(
        ext_hook=_decode, raw=False, strict_map_key=False, max_buffer_size=256 * 2**20
    )

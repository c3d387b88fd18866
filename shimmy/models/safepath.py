"""Checking every model id, file name and path that reaches the file system from outside.

Ids and paths arrive over the API and the CLI; nothing a client sends may name a file outside
the folder it is meant for. The checks here are strict on purpose: anything unusual is refused
with ``InvalidRequest`` rather than "cleaned up", because a cleaned-up name is a different name
and hides the attempt. Unicode look-alikes of ``.`` and ``/`` are judged by their NFKC form too,
so a file system or tool that normalizes names later cannot turn them into a traversal.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path, PurePosixPath

from shimmy.errors import InvalidRequest

MAX_MODEL_ID_CHARS = 128
MAX_COMPONENT_BYTES = 255  # the usual file-name limit (ext4, APFS, NTFS in UTF-16 units)
MAX_RELATIVE_PATH_CHARS = 1024
GGUF_SUFFIX = ".gguf"

_MODEL_ID = re.compile(r"[a-z0-9._-]+")
# Names taken from URLs become files and then ids: portable characters only.
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_text(text: str, what: str, max_chars: int, param: str) -> None:
    """What ids and paths share: not empty, no NUL or control characters, not too long."""
    if not text:
        raise InvalidRequest(f"{what} is empty", param=param)
    if "\x00" in text:
        raise InvalidRequest(f"{what} contains a NUL byte", param=param)
    if _has_control_chars(text):
        raise InvalidRequest(f"{what} contains control characters", param=param)
    if len(text) > max_chars:
        raise InvalidRequest(
            f"{what} is {len(text)} characters long; at most {max_chars} allowed", param=param
        )


def validate_model_id(text: object, *, param: str = "model") -> str:
    """Return ``text`` when it is a model id as discovery makes them; raise ``InvalidRequest``
    saying what is wrong otherwise. Only checks the shape: whether the model exists is the
    registry's business."""
    if not isinstance(text, str):
        raise InvalidRequest("the model id must be a string", param=param)
    _check_text(text, "the model id", MAX_MODEL_ID_CHARS, param)
    if _looks_absolute(text):
        raise InvalidRequest("a model id is a name, not an absolute path", param=param)
    if "/" in text or "\\" in text:
        raise InvalidRequest("a model id cannot contain '/' or '\\'", param=param)
    if ".." in text or text.startswith("."):
        raise InvalidRequest("a model id cannot start with '.' or contain '..'", param=param)
    if _MODEL_ID.fullmatch(text) is None:
        raise InvalidRequest(
            f"invalid model id {text!r}: use lowercase letters, digits, '-', '.' and '_'",
            param=param,
        )
    return text


def resolve_inside(folder: Path, relative: str | Path, *, param: str = "path") -> Path:
    """``folder / relative`` with symlinks resolved, guaranteed to lie strictly inside
    ``folder`` (itself resolved). Refuses absolute paths, ``..``, NUL and control characters,
    backslashes, over-long names, and symlinks (even dangling ones) leading out of ``folder``.

    The answer is only as good as the moment it was computed: callers should act on the
    returned path straight away, not keep it around."""
    text = os.fspath(relative)
    _check_text(text, "the path", MAX_RELATIVE_PATH_CHARS, param)
    for form in (text, unicodedata.normalize("NFKC", text)):
        if _looks_absolute(form):
            raise InvalidRequest("an absolute path is not allowed here", param=param)
        if "\\" in form:
            raise InvalidRequest("'\\' is not allowed in a path", param=param)
        for component in PurePosixPath(form).parts:
            # "..", and also "...", "..%2f" and the like: never a real model file or folder.
            if component.startswith(".."):
                raise InvalidRequest("'..' is not allowed in a path", param=param)
    for component in PurePosixPath(text).parts:
        if len(component.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise InvalidRequest(
                f"a path component is longer than {MAX_COMPONENT_BYTES} bytes", param=param
            )
    return ensure_inside(folder, Path(folder) / text, param=param)


def ensure_inside(folder: Path, path: Path, *, param: str = "path") -> Path:
    """``path`` (absolute, or relative to the working folder) with symlinks resolved, when that
    lies strictly inside ``folder`` after resolving it too; ``InvalidRequest`` otherwise."""
    root = Path(folder).expanduser().resolve()
    try:
        # strict=False: a file about to be created, or a dangling link, resolves as far as it can
        # and still shows where it points.
        target = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InvalidRequest(f"the path cannot be resolved: {exc}", param=param) from exc
    if target == root or not target.is_relative_to(root):
        raise InvalidRequest(f"the path leads outside of {root}", param=param)
    return target


def safe_filename(name: str, *, param: str = "model") -> str:
    """The last ``/``-separated component of ``name`` (a URL path or a repository path), when
    it is a portable, visible ``*.gguf`` file name whose stem can become a model id."""
    if not isinstance(name, str):
        raise InvalidRequest("the file name must be a string", param=param)
    last = name.rsplit("/", 1)[-1]
    if not last:
        raise InvalidRequest("the source does not name a file", param=param)
    if "\x00" in last or _has_control_chars(last):
        raise InvalidRequest("the file name contains control characters", param=param)
    if last.startswith("."):
        raise InvalidRequest(f"{last!r} is a hidden file name", param=param)
    if _FILE_NAME.fullmatch(last) is None:
        raise InvalidRequest(
            f"invalid file name {last!r}: use letters, digits, '-', '.' and '_'", param=param
        )
    if not last.lower().endswith(GGUF_SUFFIX) or len(last) == len(GGUF_SUFFIX):
        raise InvalidRequest(f"{last!r} is not a .gguf file", param=param)
    stem = last[: -len(GGUF_SUFFIX)]
    if ".." in stem:
        raise InvalidRequest(f"invalid file name {last!r}: '..' is not allowed", param=param)
    if len(stem) > MAX_MODEL_ID_CHARS:
        raise InvalidRequest(
            f"the file name is too long; its stem may have {MAX_MODEL_ID_CHARS} characters",
            param=param,
        )
    return last


def _has_control_chars(text: str) -> bool:
    # Cc (C0, DEL, C1) and Cf (zero-width and direction marks that disguise names).
    return any(unicodedata.category(char) in ("Cc", "Cf") for char in text)


def _looks_absolute(text: str) -> bool:
    return text.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(text) is not None

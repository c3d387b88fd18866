"""A second name for a model: a copy of its file(s) in shimmy's models folder.

Ollama's copies share their blobs; here the bytes are copied, because discovery lists a file
once however many names (hard links) it has. The copy is a model of its own: deleting either
leaves the other whole. Bytes go to a hidden temporary file first and get their name only when
complete, so discovery never sees half a model, and nothing that exists is ever replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from shimmy.errors import Conflict
from shimmy.models.discovery import SHARD_PATTERN
from shimmy.models.entry import ModelEntry
from shimmy.models.safepath import GGUF_SUFFIX, resolve_inside, validate_model_id
from shimmy.settings import Settings

COPY_BUFFER_BYTES = 1 << 20


def _target_names(entry: ModelEntry, new_id: str) -> list[str]:
    files = entry.shards or [entry.path]
    if len(files) == 1:
        return [new_id + GGUF_SUFFIX]
    names = []
    for path in files:
        match = SHARD_PATTERN.match(path.name)
        assert match is not None  # discovery groups only files named as shards
        names.append(f"{new_id}-{match['index']}-of-{match['count']}{GGUF_SUFFIX}")
    return names


def copy_model_files(
    entry: ModelEntry, new_id: str, settings: Settings, *, param: str = "destination"
) -> list[Path]:
    """Copy ``entry``'s files into ``settings.models_dir`` as the model ``new_id``. Returns
    the new files; ``Conflict`` when one of them exists already."""
    validate_model_id(new_id, param=param)
    models_dir = settings.models_dir.expanduser().absolute()
    models_dir.mkdir(parents=True, exist_ok=True)
    names = _target_names(entry, new_id)
    targets = [resolve_inside(models_dir, name, param=param) for name in names]
    for target in targets:
        if os.path.lexists(target):
            raise Conflict(f"{target.name} already exists in the models folder", param=param)
    made: list[Path] = []
    try:
        for source, target in zip(entry.shards or [entry.path], targets, strict=True):
            _copy_one(source, target, param)
            made.append(target)
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return made


def _copy_one(source: Path, target: Path, param: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".copy")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, COPY_BUFFER_BYTES)
        try:
            # A link, not a rename: it fails instead of replacing a file that appeared meanwhile.
            os.link(temporary, target)
        except FileExistsError:
            raise Conflict(
                f"{target.name} already exists in the models folder", param=param
            ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)

"""A second name for a model: its file(s) once more in shimmy's models folder.

The new files are hard links wherever the file system allows one (no bytes are copied, as an
Ollama copy shares its blobs), and a real copy elsewhere. Either way the copy is a model of
its own: deleting one leaves the other whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from shimmy.errors import Conflict
from shimmy.models.discovery import SHARD_PATTERN
from shimmy.models.entry import ModelEntry
from shimmy.models.safepath import GGUF_SUFFIX, resolve_inside, validate_model_id
from shimmy.settings import Settings


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
    """Put ``entry``'s files into ``settings.models_dir`` under the id ``new_id``; nothing
    that exists is ever replaced. Returns the new files."""
    validate_model_id(new_id, param=param)
    models_dir = settings.models_dir.expanduser().absolute()
    models_dir.mkdir(parents=True, exist_ok=True)
    sources = [path.resolve() for path in entry.shards or [entry.path]]
    targets = [
        resolve_inside(models_dir, name, param=param) for name in _target_names(entry, new_id)
    ]
    for target in targets:
        if os.path.lexists(target):
            raise Conflict(f"{target.name} already exists in the models folder", param=param)
    made: list[Path] = []
    try:
        for source, target in zip(sources, targets, strict=True):
            _place(source, target, made, param)
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return made


def _place(source: Path, target: Path, made: list[Path], param: str) -> None:
    """Link (or copy) ``source`` to ``target``; ``made`` gets ``target`` as soon as it is ours."""
    try:
        try:
            os.link(source, target)
        except FileExistsError:
            raise
        except OSError:
            # Another file system, or one without links: copy the bytes.
            with open(target, "xb") as out:
                made.append(target)
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            return
    except FileExistsError:
        # Appeared since the check: someone else's file, never replaced nor removed.
        raise Conflict(f"{target.name} already exists in the models folder", param=param) from None
    made.append(target)

"""Deleting models, but only the ones shimmy owns.

Only files in ``settings.models_dir`` (where ``pull`` puts them) may be deleted through shimmy. A
model found in ``model_paths``, the Hugging Face cache, Ollama or LM Studio belongs to the user
or to another tool: removing it is refused with ``Forbidden``, never half done.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from shimmy.errors import Forbidden, InvalidRequest
from shimmy.models.entry import ModelEntry
from shimmy.models.pull import (
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    RESUME_SUFFIX,
    VERIFIED_SUFFIX,
    pull_in_progress,
)
from shimmy.models.safepath import ensure_inside
from shimmy.settings import Settings


def remove_model_files(entry: ModelEntry, settings: Settings) -> list[Path]:
    """Delete every file of ``entry`` (all shards; for a symlink, the link and its target) and
    its stale side files (``.partial``, ``.partial.json``, ``.verified``, an abandoned
    ``.lock``). Every path is checked before anything is deleted. Returns the paths deleted;
    files already gone are skipped, so removing twice is harmless. Unload the model first:
    deleting does not free memory a loaded engine maps."""
    models_dir = settings.models_dir.expanduser().absolute()
    model_files = entry.shards or [entry.path]
    # A pull locks a split model through its first part; it owns the side files meanwhile.
    pulling = pull_in_progress(model_files[0].expanduser().absolute())
    doomed: list[Path] = []
    for path in model_files:
        path = path.expanduser().absolute()
        target = _inside_or_forbidden(entry, models_dir, path)
        # A link in models_dir is deleted with what it points at (checked above to be inside
        # too); deleting only the link would leave the file, which discovery then lists again.
        doomed += [path, target] if path.is_symlink() else [path]
        if not pulling:
            doomed += [_side_file(path, suffix) for suffix in _SIDE_SUFFIXES]
    removed: list[Path] = []
    for path in dict.fromkeys(doomed):  # in order, once
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


_SIDE_SUFFIXES = (PARTIAL_SUFFIX, RESUME_SUFFIX, VERIFIED_SUFFIX, LOCK_SUFFIX)


def _inside_or_forbidden(entry: ModelEntry, models_dir: Path, path: Path) -> Path:
    """``path`` resolved, when both it and (for a link) the link itself are in models_dir."""
    try:
        target = ensure_inside(models_dir, path)
        # A link elsewhere pointing into models_dir is someone else's link: not ours to delete.
        link_folder = path.parent.resolve()
        if path.is_symlink() and link_folder != models_dir.resolve():
            ensure_inside(models_dir, link_folder)
    except InvalidRequest:
        raise Forbidden(
            f"model {entry.id} is not in shimmy's models folder ({models_dir}); remove it"
            f" yourself: {path}"
        ) from None
    return target


def _side_file(model_file: Path, suffix: str) -> Path:
    return model_file.with_name(model_file.name + suffix)

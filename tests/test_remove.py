"""Removing models: only what lies in shimmy's own folder, and all of it."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimmy.errors import Forbidden
from shimmy.models.discovery import discover_models
from shimmy.models.entry import ModelEntry
from shimmy.models.remove import remove_model_files
from shimmy.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def outside(tmp_path: Path, tiny_model_bytes: bytes) -> Path:
    """The user's own folder (listed in model_paths): never touched."""
    folder = tmp_path / "users-models"
    folder.mkdir()
    (folder / "mine.gguf").write_bytes(tiny_model_bytes)
    return folder


@pytest.fixture
def settings(tmp_path: Path, outside: Path) -> Settings:
    (tmp_path / "models").mkdir()
    return Settings(
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        model_paths=[outside],
        scan_user_caches=False,
        starter_model=False,
    )


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.lstat().st_mtime_ns, path.lstat().st_size)
        for path in sorted(folder.rglob("*"))
    }


def entry_named(settings: Settings, model_id: str) -> ModelEntry:
    (entry,) = [entry for entry in discover_models(settings) if entry.id == model_id]
    return entry


def test_a_model_in_the_models_folder_is_removed_with_its_side_files(
    settings: Settings, tiny_model_bytes: bytes
) -> None:
    models = settings.models_dir
    (models / "pulled.gguf").write_bytes(tiny_model_bytes)
    for side in ("pulled.gguf.verified", "pulled.gguf.partial", "pulled.gguf.lock"):
        (models / side).write_text("stale")
    (models / "other.gguf").write_bytes(tiny_model_bytes)

    removed = remove_model_files(entry_named(settings, "pulled"), settings)

    assert sorted(path.name for path in removed) == [
        "pulled.gguf",
        "pulled.gguf.lock",
        "pulled.gguf.partial",
        "pulled.gguf.verified",
    ]
    assert sorted(path.name for path in models.iterdir()) == ["other.gguf"]
    assert sorted(entry.id for entry in discover_models(settings)) == ["mine", "other"]


def test_removing_twice_is_harmless(settings: Settings, tiny_model_bytes: bytes) -> None:
    (settings.models_dir / "pulled.gguf").write_bytes(tiny_model_bytes)
    entry = entry_named(settings, "pulled")
    assert [path.name for path in remove_model_files(entry, settings)] == ["pulled.gguf"]
    assert remove_model_files(entry, settings) == []


def test_every_part_of_a_split_model_is_removed(
    settings: Settings, tiny_model_bytes: bytes
) -> None:
    for index in (1, 2, 3):
        (settings.models_dir / f"big-{index:05d}-of-00003.gguf").write_bytes(tiny_model_bytes)
    entry = entry_named(settings, "big")
    assert len(entry.shards) == 3
    removed = remove_model_files(entry, settings)
    assert len(removed) == 3
    assert list(settings.models_dir.iterdir()) == []


def test_a_model_outside_the_models_folder_is_refused(
    settings: Settings, outside: Path, tmp_path: Path
) -> None:
    before = listing(tmp_path)
    with pytest.raises(Forbidden) as caught:
        remove_model_files(entry_named(settings, "mine"), settings)
    assert "model mine is not in shimmy's models folder" in str(caught.value.details)
    assert "remove it yourself" in str(caught.value.details)
    assert caught.value.status == 403
    assert listing(tmp_path) == before


def test_one_part_outside_refuses_the_whole_removal(
    settings: Settings, outside: Path, tiny_model_bytes: bytes, tmp_path: Path
) -> None:
    inside = settings.models_dir / "big-00001-of-00002.gguf"
    inside.write_bytes(tiny_model_bytes)
    stray = outside / "big-00002-of-00002.gguf"
    stray.write_bytes(tiny_model_bytes)
    entry = ModelEntry(id="big", path=inside, source="models_dir", shards=[inside, stray])
    before = listing(tmp_path)
    with pytest.raises(Forbidden):
        remove_model_files(entry, settings)
    assert listing(tmp_path) == before


def test_a_link_leading_out_of_the_models_folder_is_refused(
    settings: Settings, outside: Path, tmp_path: Path
) -> None:
    (settings.models_dir / "linked.gguf").symlink_to(outside / "mine.gguf")
    entry = ModelEntry(id="linked", path=settings.models_dir / "linked.gguf", source="models_dir")
    before = listing(tmp_path)
    with pytest.raises(Forbidden):
        remove_model_files(entry, settings)
    assert listing(tmp_path) == before


def test_a_link_inside_is_removed_with_its_target(
    settings: Settings, tiny_model_bytes: bytes
) -> None:
    models = settings.models_dir
    (models / ".blobs").mkdir()
    (models / ".blobs" / "blob").write_bytes(tiny_model_bytes)
    (models / "alias.gguf").symlink_to(models / ".blobs" / "blob")
    removed = remove_model_files(entry_named(settings, "alias"), settings)
    assert {path.name for path in removed} == {"alias.gguf", "blob"}
    assert not os.path.lexists(models / "alias.gguf")
    assert list((models / ".blobs").iterdir()) == []


def test_a_link_elsewhere_into_the_models_folder_is_not_ours(
    settings: Settings, outside: Path, tiny_model_bytes: bytes, tmp_path: Path
) -> None:
    (settings.models_dir / "real.gguf").write_bytes(tiny_model_bytes)
    link = outside / "shortcut.gguf"
    link.symlink_to(settings.models_dir / "real.gguf")
    entry = ModelEntry(id="shortcut", path=link, source="model_paths")
    before = listing(tmp_path)
    with pytest.raises(Forbidden):
        remove_model_files(entry, settings)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "hostile",
    ["models/../users-models/mine.gguf", "models/../../escape.gguf", "cache/starter.gguf"],
)
def test_paths_that_only_look_inside_are_refused(
    settings: Settings, tmp_path: Path, hostile: str, tiny_model_bytes: bytes
) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "starter.gguf").write_bytes(tiny_model_bytes)
    entry = ModelEntry(id="x", path=tmp_path / hostile, source="starter")
    before = listing(tmp_path)
    with pytest.raises(Forbidden):
        remove_model_files(entry, settings)
    assert listing(tmp_path) == before


def test_a_relative_models_folder_is_taken_from_the_working_folder(
    tmp_path: Path, tiny_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "rel.gguf").write_bytes(tiny_model_bytes)
    settings = Settings(models_dir=Path("models"), scan_user_caches=False, starter_model=False)
    entry = ModelEntry(id="rel", path=Path("models/rel.gguf"), source="models_dir")
    assert [path.name for path in remove_model_files(entry, settings)] == ["rel.gguf"]
    assert not (tmp_path / "models" / "rel.gguf").exists()


@pytest.fixture
def held_lock(settings: Settings) -> Iterator[Path]:
    """``busy.gguf.lock`` held the way a running pull holds it."""
    lock = settings.models_dir / "busy.gguf.lock"
    with open(lock, "w") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        yield lock


def test_the_files_of_a_running_pull_are_left_to_it(
    settings: Settings, tiny_model_bytes: bytes, held_lock: Path
) -> None:
    models = settings.models_dir
    (models / "busy.gguf").write_bytes(tiny_model_bytes)
    (models / "busy.gguf.partial").write_bytes(b"GGUF half")
    removed = remove_model_files(entry_named(settings, "busy"), settings)
    assert [path.name for path in removed] == ["busy.gguf"]
    assert sorted(path.name for path in models.iterdir()) == ["busy.gguf.lock", "busy.gguf.partial"]


def test_an_unusable_model_can_still_be_removed(settings: Settings) -> None:
    (settings.models_dir / "broken.gguf").write_bytes(b"GGUF but truncated")
    entry = entry_named(settings, "broken")
    assert not entry.usable
    assert [path.name for path in remove_model_files(entry, settings)] == ["broken.gguf"]

"""Ids and paths from clients never reach outside the folder they are meant for.

Each hostile input is used the way a careless caller would use an accepted one (a file is written
at the resulting path), so a check that lets one through shows up as a changed sentinel folder,
not only as a missing exception.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shimmy.errors import InvalidRequest
from shimmy.models.safepath import (
    ensure_inside,
    resolve_inside,
    safe_filename,
    validate_model_id,
)

Snapshot = dict[str, tuple[int, int]]


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """``root/models`` (the folder under test, with hostile links) next to ``sentinel`` (which
    must never change)."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "passwd").write_text("root:x:0:0\n")
    (sentinel / "keep.gguf").write_bytes(b"GGUF")
    models = tmp_path / "root" / "models"
    (models / "sub").mkdir(parents=True)
    (models / "tiny.gguf").write_bytes(b"GGUF")
    (models / "evil").symlink_to(sentinel, target_is_directory=True)
    (models / "link.gguf").symlink_to(sentinel / "passwd")
    (models / "dangling.gguf").symlink_to(sentinel / "created-by-attack")
    (models / "sub" / "hop.gguf").symlink_to(models / "link.gguf")
    (models / "loop.gguf").symlink_to(models / "loop.gguf")
    return {"models": models, "sentinel": sentinel, "tmp": tmp_path}


def snapshot(folder: Path) -> Snapshot:
    state: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            state[str(path.relative_to(folder))] = (info.st_mtime_ns, info.st_size)
    state["."] = (folder.stat().st_mtime_ns, 0)
    return state


HOSTILE_PATHS = [
    "../../sentinel/passwd",
    "sub/../../../sentinel/passwd",
    "a/../../b",
    "..",
    "../",
    "...",
    "....//....//sentinel/passwd",
    "..%2f..%2fsentinel%2fpasswd",
    "..\\..\\sentinel\\passwd",
    "sub\\..\\..\\x.gguf",
    "\uff0e\uff0e/\uff0e\uff0e/sentinel/passwd",  # fullwidth dots: NFKC makes them ".."
    "\u2025/\u2025/sentinel/passwd",  # two-dot leader: NFKC ".."
    "\uff0e\uff0e\uff0fx.gguf",  # fullwidth solidus as well
    "/etc/passwd",
    "//etc/passwd",
    "\\\\server\\share\\x.gguf",
    "C:\\Windows\\x.gguf",
    "c:x.gguf",
    "x\x00.gguf",
    "x.gguf\x00/../../../sentinel/passwd",
    "x\n.gguf",
    "x\u202e.gguf",  # right-to-left override hides the real name
    "evil/passwd",  # folder symlink leading out
    "evil/new.gguf",
    "link.gguf",  # file symlink leading out
    "dangling.gguf",  # dangling symlink leading out: writing would create the file outside
    "sub/hop.gguf",  # a link to a link leading out
    "loop.gguf",
    "",
    ".",
    "./",
    "a" * 256,
    "sub/" + "b" * 300 + ".gguf",
    "a/" * 600 + "x.gguf",
]


@pytest.mark.parametrize("hostile", HOSTILE_PATHS, ids=repr)
def test_resolve_inside_refuses_hostile_paths(layout: dict[str, Path], hostile: str) -> None:
    before = snapshot(layout["sentinel"])
    with pytest.raises(InvalidRequest) as caught:
        target = resolve_inside(layout["models"], hostile, param="path")
        target.write_text("written by the attack")  # what a caller would do next
    assert caught.value.param == "path"
    assert caught.value.details
    assert snapshot(layout["sentinel"]) == before


def test_absolute_path_of_the_sentinel_is_refused(layout: dict[str, Path]) -> None:
    before = snapshot(layout["sentinel"])
    for hostile in (str(layout["sentinel"] / "passwd"), layout["sentinel"] / "new.gguf"):
        with pytest.raises(InvalidRequest, match="absolute"):
            resolve_inside(layout["models"], hostile).write_text("attack")
    assert snapshot(layout["sentinel"]) == before


def test_path_objects_are_checked_like_strings(layout: dict[str, Path]) -> None:
    with pytest.raises(InvalidRequest, match=r"'\.\.'"):
        resolve_inside(layout["models"], Path("../../sentinel/passwd"))


@pytest.mark.parametrize(
    "relative", ["tiny.gguf", "sub/new.gguf", "new.gguf.partial", "sub", "x..y.gguf"]
)
def test_resolve_inside_accepts_paths_inside(layout: dict[str, Path], relative: str) -> None:
    models = layout["models"].resolve()
    assert resolve_inside(layout["models"], relative) == models / relative


def test_links_that_stay_inside_resolve_to_their_target(layout: dict[str, Path]) -> None:
    models = layout["models"]
    (models / "alias.gguf").symlink_to(models / "tiny.gguf")
    assert resolve_inside(models, "alias.gguf") == models.resolve() / "tiny.gguf"


def test_a_models_folder_reached_through_a_link_is_still_inside(tmp_path: Path) -> None:
    real = tmp_path / "real-models"
    real.mkdir()
    (tmp_path / "models").symlink_to(real, target_is_directory=True)
    assert resolve_inside(tmp_path / "models", "x.gguf") == real.resolve() / "x.gguf"


def test_ensure_inside_takes_absolute_paths(layout: dict[str, Path]) -> None:
    models = layout["models"]
    assert ensure_inside(models, models / "tiny.gguf") == models.resolve() / "tiny.gguf"
    for outside in (models / "link.gguf", layout["sentinel"] / "passwd", models, models / ".."):
        with pytest.raises(InvalidRequest):
            ensure_inside(models, outside)


HOSTILE_IDS: list[object] = [
    "../x",
    "..%2fx",
    "%2e%2e%2fx",
    "..",
    ".",
    ".hidden",
    "a..b",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "C:x",
    "tiny\x00",
    "tiny\n",
    "tiny\u200b",  # zero-width space
    "\u2025x",
    "\uff0e\uff0e",
    "tíny",
    "Tiny",
    "tiny model",
    "tiny:latest",
    "x" * 129,
    "",
    None,
    42,
    ["tiny"],
]


@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=repr)
def test_validate_model_id_refuses(layout: dict[str, Path], hostile: object) -> None:
    before = snapshot(layout["sentinel"])
    with pytest.raises(InvalidRequest) as caught:
        model_id = validate_model_id(hostile, param="model")
        (layout["models"] / f"{model_id}.gguf").write_text("attack")
    assert caught.value.param == "model"
    assert caught.value.details
    assert snapshot(layout["sentinel"]) == before


@pytest.mark.parametrize(
    "model_id", ["tiny", "gemma-3-270m-it-q4-k-m", "qwen2.5-7b", "a_b", "x" * 128, "7", "a.b-2"]
)
def test_validate_model_id_accepts_discovery_ids(model_id: str) -> None:
    assert validate_model_id(model_id) == model_id


def test_model_id_messages_say_what_is_wrong() -> None:
    with pytest.raises(InvalidRequest, match="at most 128"):
        validate_model_id("x" * 200)
    with pytest.raises(InvalidRequest, match="NUL"):
        validate_model_id("a\x00")
    with pytest.raises(InvalidRequest, match="lowercase"):
        validate_model_id("Tiny")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.gguf", "model.gguf"),
        ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Qwen2.5-7B-Instruct-Q4_K_M.gguf"),
        ("/some/url/path/model.GGUF", "model.GGUF"),
        ("sub/dir/big-00001-of-00002.gguf", "big-00001-of-00002.gguf"),
    ],
)
def test_safe_filename_keeps_the_last_component(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "dir/",
        ".gguf",
        ".hidden.gguf",
        "model.bin",
        "model.gguf.partial",
        "model.gguf ",
        "mo del.gguf",
        "..%2fmodel.gguf",
        "a\\..\\b.gguf",
        "x..y.gguf",
        "mödel.gguf",
        "model\x00.gguf",
        "model\n.gguf",
        "m" * 129 + ".gguf",
    ],
    ids=repr,
)
def test_safe_filename_refuses(name: str) -> None:
    with pytest.raises(InvalidRequest):
        safe_filename(name)

"""Model discovery over real folder layouts: shimmy's own, Hugging Face, Ollama, LM Studio."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import isolated_settings
from gguf import GGUFWriter

from shimmy.errors import ModelUnusable
from shimmy.models.discovery import (
    discover_models,
    entry_for_file,
    format_parameter_count,
    user_cache_folders,
)
from shimmy.models.entry import ModelEntry
from shimmy.models.gguf_info import read_gguf_info
from shimmy.settings import Settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home folder; the cache locations' environment variables are unset."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    for variable in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "OLLAMA_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    return folder


@pytest.fixture
def place(tiny_model_path: Path) -> Any:
    """``place(path)`` puts a copy of the tiny model at ``path`` (folders created)."""

    def copy(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_model_path, path)
        return path

    return copy


def settings_for(tmp_path: Path, *paths: Path, **overrides: Any) -> Settings:
    settings = isolated_settings(tmp_path / "unused", tmp_path, **overrides)
    return settings.model_copy(update={"model_paths": list(paths)})


def ids(entries: list[ModelEntry]) -> list[str]:
    return [entry.id for entry in entries]


def test_entry_facts_come_from_the_header(tmp_path: Path, place: Any) -> None:
    path = place(tmp_path / "models" / "tiny.gguf")
    [entry] = discover_models(settings_for(tmp_path, path.parent))
    info = read_gguf_info(path)
    assert entry.usable
    assert (entry.id, entry.path, entry.source) == ("tiny", path, "model_paths")
    assert entry.name == "tiny-test-model"
    assert entry.architecture == "llama"
    assert entry.quantization == "F32"
    assert entry.context_length == 4096
    assert entry.parameter_count == info.parameter_count
    assert (
        entry.description == f"llama · {format_parameter_count(info.parameter_count)} params · F32"
    )
    assert (entry.bos_token, entry.eos_token, entry.chat_template) == ("<s>", "</s>", None)
    assert entry.size_bytes == path.stat().st_size
    assert entry.shards == []


def test_sources_in_order_and_ids_normalized(tmp_path: Path, place: Any) -> None:
    first = place(tmp_path / "first" / "zeta_Model.gguf")
    place(tmp_path / "first" / "nested" / "Alpha Model.gguf")
    single = place(tmp_path / "loose" / "Odd Name_v2.GGUF")
    own = place(tmp_path / "own" / "Own_Model.gguf")
    settings = settings_for(tmp_path, first.parent, single, models_dir=own.parent)

    entries = discover_models(settings)

    assert [(entry.id, entry.source) for entry in entries] == [
        ("alpha-model", "model_paths"),  # sorted by path: first/nested/... < first/zeta_...
        ("zeta-model", "model_paths"),
        ("odd-name-v2", "model_paths"),
        ("own-model", "models_dir"),
    ]


def test_split_shards_are_one_model(tmp_path: Path, place: Any) -> None:
    folder = tmp_path / "models"
    shards = [place(folder / f"Big_Model-{i:05d}-of-00003.gguf") for i in (1, 2, 3)]
    place(folder / "other.gguf")

    entries = discover_models(settings_for(tmp_path, folder))

    assert ids(entries) == ["big-model", "other"]
    big = entries[0]
    assert big.usable
    assert big.path == shards[0]
    assert big.shards == shards
    assert big.size_bytes == sum(path.stat().st_size for path in shards)
    assert big.parameter_count == 3 * read_gguf_info(shards[0]).parameter_count


def test_a_split_model_missing_a_shard_is_listed_unusable(tmp_path: Path, place: Any) -> None:
    folder = tmp_path / "models"
    place(folder / "big-00001-of-00003.gguf")
    place(folder / "big-00003-of-00003.gguf")
    [entry] = discover_models(settings_for(tmp_path, folder))
    assert entry.id == "big"
    assert entry.error == "split model is missing shard(s) 00002 of 00003"


def test_a_shard_named_directly_brings_its_siblings(tmp_path: Path, place: Any) -> None:
    folder = tmp_path / "models"
    shards = [place(folder / f"m-{i:05d}-of-00002.gguf") for i in (1, 2)]
    [entry] = discover_models(settings_for(tmp_path, shards[0]))
    assert (entry.id, entry.shards, entry.usable) == ("m", shards, True)


def test_duplicate_ids_get_numbered_suffixes(tmp_path: Path, place: Any) -> None:
    a = place(tmp_path / "a" / "model.gguf")
    a_nested = place(tmp_path / "a" / "sub" / "Model.gguf")
    b = place(tmp_path / "b" / "MODEL.gguf")
    taken = place(tmp_path / "b" / "model-2.gguf")  # the suffix never collides with a real id

    entries = discover_models(settings_for(tmp_path, a.parent, b.parent))

    assert [(entry.id, entry.path) for entry in entries] == [
        ("model", a),
        ("model-2", a_nested),
        ("model-3", b),
        ("model-2-2", taken),
    ]


def test_the_same_file_reached_twice_is_listed_once(tmp_path: Path, place: Any) -> None:
    path = place(tmp_path / "models" / "tiny.gguf")
    (tmp_path / "alias").symlink_to(path.parent)
    settings = settings_for(tmp_path, path.parent, tmp_path / "alias", path, models_dir=path.parent)
    assert ids(discover_models(settings)) == ["tiny"]


def test_symlink_loops_end(tmp_path: Path, place: Any) -> None:
    folder = tmp_path / "models"
    place(folder / "tiny.gguf")
    (folder / "loop").symlink_to(folder)
    (folder / "deeper").mkdir()
    (folder / "deeper" / "back").symlink_to(folder)
    assert ids(discover_models(settings_for(tmp_path, folder))) == ["tiny"]


def test_projectors_hidden_and_foreign_files_are_skipped(tmp_path: Path, place: Any) -> None:
    folder = tmp_path / "models"
    place(folder / "model.gguf")
    place(folder / "mmproj-model-f16.gguf")
    place(folder / "llava-MMPROJ-f16.gguf")
    place(folder / "._model.gguf")  # macOS metadata twin
    place(folder / ".cache" / "hidden.gguf")
    place(folder / "weights.safetensors")
    writer = GGUFWriter(str(folder / "vision-encoder.gguf"), "clip")
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert ids(discover_models(settings_for(tmp_path, folder))) == ["model"]


def test_unreadable_folders_are_skipped(
    tmp_path: Path, place: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "models"
    place(folder / "ok.gguf")
    locked = folder / "locked"
    place(locked / "secret.gguf")
    # Tests may run as root, where chmod 000 does not stop reading: refuse the folder instead.
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    missing = tmp_path / "does-not-exist"

    entries = discover_models(settings_for(tmp_path, folder, missing))

    assert ids(entries) == ["ok"]
    assert "Permission denied" in caplog.text
    assert str(missing) in caplog.text


# --- user caches -------------------------------------------------------------------------------


def make_hf_cache(hub: Path, tiny_model_path: Path) -> Path:
    """``models--org--repo`` with a blob, two snapshot revisions and refs/main -> the newer."""
    repo = hub / "models--someorg--Tiny-GGUF"
    data = tiny_model_path.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    for revision in ("0ld", "n3w"):
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (snapshot / "Tiny_Q8_0.gguf").symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("n3w")
    (repo / "snapshots" / "n3w" / "broken.gguf").symlink_to("../../blobs/missing.incomplete")
    return repo / "snapshots" / "n3w" / "Tiny_Q8_0.gguf"


def test_huggingface_cache_follows_snapshot_symlinks(
    home: Path, tmp_path: Path, tiny_model_path: Path
) -> None:
    link = make_hf_cache(home / ".cache" / "huggingface" / "hub", tiny_model_path)

    entries = discover_models(settings_for(tmp_path, scan_user_caches=True))

    # Both revisions link to one blob: one model, found at the refs/main revision.
    assert [(entry.id, entry.source, entry.path) for entry in entries] == [
        ("tiny-q8-0", "huggingface", link)
    ]
    assert entries[0].usable
    assert entries[0].size_bytes == tiny_model_path.stat().st_size


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_huggingface_cache_location_variables(
    variable: str,
    home: Path,
    tmp_path: Path,
    tiny_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "hf-elsewhere"
    hub = elsewhere if variable == "HF_HUB_CACHE" else elsewhere / "hub"
    make_hf_cache(hub, tiny_model_path)
    monkeypatch.setenv(variable, str(elsewhere))
    entries = discover_models(settings_for(tmp_path, scan_user_caches=True))
    assert [(entry.id, entry.source) for entry in entries] == [("tiny-q8-0", "huggingface")]


def write_ollama_model(
    root: Path, name: str, tag: str, data: bytes, namespace: str = "library"
) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    manifest = {
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob


def test_ollama_manifests_lead_to_blobs(home: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    root = home / ".ollama" / "models"
    data = tiny_model_path.read_bytes()
    blob = write_ollama_model(root, "gemma3", "270m", data)
    write_ollama_model(root, "qwen", "Q4_K_M", data + b"\0", namespace="someone")
    broken = root / "manifests" / "registry.ollama.ai" / "library"
    (broken / "garbage").mkdir()
    (broken / "garbage" / "latest").write_text("{not json")
    (broken / "escape").mkdir()
    (broken / "escape" / "latest").write_text(
        json.dumps(
            {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "../../x"}]}
        )
    )
    (broken / "gone").mkdir()
    (broken / "gone" / "latest").write_text(
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": "sha256:" + "a" * 64,
                    }
                ]
            }
        )
    )

    entries = discover_models(settings_for(tmp_path, scan_user_caches=True))

    assert [(entry.id, entry.source) for entry in entries] == [
        ("gemma3-270m", "ollama"),
        ("someone-qwen-q4-k-m", "ollama"),
    ]
    assert entries[0].path == blob
    assert entries[0].architecture == "llama"  # read from the blob's own header
    assert entries[0].name == "tiny-test-model"


def test_ollama_models_variable(
    home: Path, tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ollama-store"
    write_ollama_model(root, "tiny", "latest", tiny_model_path.read_bytes())
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert ids(discover_models(settings_for(tmp_path, scan_user_caches=True))) == ["tiny-latest"]


def test_lm_studio_folders(home: Path, tmp_path: Path, place: Any) -> None:
    place(home / ".lmstudio" / "models" / "publisher" / "repo" / "New_Model.gguf")
    place(home / ".lmstudio" / "models" / "publisher" / "repo" / "mmproj-New_Model.gguf")
    place(home / ".cache" / "lm-studio" / "models" / "pub" / "repo" / "Old_Model.gguf")
    entries = discover_models(settings_for(tmp_path, scan_user_caches=True))
    assert [(entry.id, entry.source) for entry in entries] == [
        ("new-model", "lmstudio"),
        ("old-model", "lmstudio"),
    ]


def test_user_caches_in_discovery_order(
    home: Path, tmp_path: Path, place: Any, tiny_model_path: Path
) -> None:
    place(home / ".lmstudio" / "models" / "p" / "r" / "shared.gguf")
    write_ollama_model(
        home / ".ollama" / "models", "shared", "x", tiny_model_path.read_bytes() + b"1"
    )
    make_hf_cache(home / ".cache" / "huggingface" / "hub", tiny_model_path)
    own = place(tmp_path / "own" / "shared.gguf")
    given = place(tmp_path / "given" / "Tiny_Q8_0.gguf")
    settings = settings_for(tmp_path, given.parent, models_dir=own.parent, scan_user_caches=True)

    entries = discover_models(settings)

    assert [(entry.id, entry.source) for entry in entries] == [
        ("tiny-q8-0", "model_paths"),
        ("shared", "models_dir"),
        ("tiny-q8-0-2", "huggingface"),
        ("shared-x", "ollama"),
        ("shared-2", "lmstudio"),
    ]


def test_user_caches_are_ignored_when_disabled(
    home: Path, tmp_path: Path, place: Any, tiny_model_path: Path
) -> None:
    place(home / ".lmstudio" / "models" / "p" / "r" / "lm.gguf")
    write_ollama_model(home / ".ollama" / "models", "tiny", "latest", tiny_model_path.read_bytes())
    make_hf_cache(home / ".cache" / "huggingface" / "hub", tiny_model_path)
    mine = place(tmp_path / "mine" / "mine.gguf")

    disabled = discover_models(settings_for(tmp_path, mine.parent, scan_user_caches=False))
    enabled = discover_models(settings_for(tmp_path, mine.parent, scan_user_caches=True))

    assert ids(disabled) == ["mine"]
    assert ids(enabled) == ["mine", "tiny-q8-0", "tiny-latest", "lm"]


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (999, "999"),
        (115_904, "116K"),
        (268_098_176, "268M"),
        (1_235_814_400, "1.2B"),
        (70_553_706_496, "71B"),
    ],
)
def test_parameter_count_format(count: int, text: str) -> None:
    assert format_parameter_count(count) == text


def test_relative_folders_give_absolute_paths(
    tmp_path: Path, place: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    place(tmp_path / "models" / "tiny.gguf")
    monkeypatch.chdir(tmp_path)
    [entry] = discover_models(settings_for(tmp_path, models_dir=Path("models")))
    assert entry.path == tmp_path / "models" / "tiny.gguf"
    assert entry.source == "models_dir"


def test_entry_for_a_named_file(tmp_path: Path, place: Any) -> None:
    single = place(tmp_path / "elsewhere" / "My_Model.bin")  # named directly: any file name
    entry = entry_for_file(single, source="model_paths")
    assert (entry.id, entry.path, entry.usable) == ("my-model.bin", single, True)
    shards = [place(tmp_path / "split" / f"s-{i:05d}-of-00002.gguf") for i in (1, 2)]
    assert entry_for_file(shards[1]).shards == shards
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"nope")
    assert entry_for_file(broken).error == "not a GGUF file (bad magic b'nope')"
    with pytest.raises(ModelUnusable):
        entry_for_file(tmp_path / "elsewhere")


def test_user_cache_folders_honour_the_environment(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert user_cache_folders() == [
        ("huggingface", home / ".cache" / "huggingface" / "hub"),
        ("ollama", home / ".ollama" / "models"),
        ("lmstudio", home / ".lmstudio" / "models"),
        ("lmstudio", home / ".cache" / "lm-studio" / "models"),
    ]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ol"))
    assert user_cache_folders()[:2] == [
        ("huggingface", tmp_path / "hf" / "hub"),
        ("ollama", tmp_path / "ol"),
    ]

"""The pieces of Ollama's dialect that need no server: request templates (Go's text/template
subset), the background digest cache and how /openapi.json describes the dialect."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from shimmy.api.ollama.gotemplate import render
from shimmy.api.openapi import build_openapi
from shimmy.errors import InvalidRequest
from shimmy.models.digests import DigestCache, sha256_of_files
from shimmy.models.entry import ModelEntry
from shimmy.settings import Settings


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ .System }}|{{ .Prompt }}", "S|P"),
        ("{{ if .System }}<s>{{ .System }}</s>{{ end }}{{ .Prompt }}", "<s>S</s>P"),
        ("A {{- .Prompt -}} B", "APB"),
        ("{{/* a comment */}}{{ .Prompt }}{{ .Response }} after", "P"),
        ("{{ if .Suffix }}x{{ else if .System }}y{{ else }}z{{ end }}", "y"),
        ("{{- if .Suffix }}x{{ else }}\n  z\n{{- end }}", "\n  z"),
    ],
)
def test_templates_render_like_go(template: str, expected: str) -> None:
    assert render(template, system="S", prompt="P") == expected


def test_without_a_system_the_if_takes_its_else() -> None:
    template = "{{ if .System }}S{{ else }}none{{ end }}:{{ .Prompt }}"
    assert render(template, prompt="P") == "none:P"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ range .Messages }}{{ end }}", "range .Messages"),
        ("{{ .Prompt | upper }}", ".Prompt | upper"),
        ("{{ if .System }}open", "without an 'end'"),
        ("{{ end }}", "without an 'if'"),
        ("{{ else }}", "outside an 'if'"),
        ("{{ .Prompt ", "unclosed"),
    ],
)
def test_templates_shimmy_cannot_run_are_refused(template: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        render(template, prompt="P")
    assert caught.value.param == "template"


def _entry(path: Path) -> ModelEntry:
    return ModelEntry(id=path.stem, path=path, source="models_dir", size_bytes=path.stat().st_size)


def test_digests_are_computed_in_the_background_and_remembered(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"x" * 5000)
    release = threading.Event()
    hashed: list[Path] = []

    def slow_hash(paths: Sequence[Path]) -> str:
        release.wait(timeout=30)
        hashed.extend(paths)
        return sha256_of_files(paths)

    cache_file = tmp_path / "cache" / "digests.json"
    cache = DigestCache(cache_file, hash_files=slow_hash)
    # Asked while the hash is held back: the answer comes at once, without the digest.
    assert cache.get(_entry(model)) is None
    assert cache.get(_entry(model)) is None
    release.set()
    assert cache.wait_idle(timeout=30)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert cache.get(_entry(model)) == expected
    assert hashed == [model]  # hashed once, however often it was asked for

    def never(paths: Sequence[Path]) -> str:
        raise AssertionError("a remembered digest is not computed again")

    assert DigestCache(cache_file, hash_files=never).get(_entry(model)) == expected
    model.write_bytes(b"GGUF" + b"y" * 5000)  # another file now: hashed anew
    fresh = DigestCache(cache_file)
    assert fresh.get(_entry(model)) is None
    assert fresh.wait_idle(timeout=30)
    assert fresh.get(_entry(model)) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_ollama_blobs_are_named_by_their_digest(tmp_path: Path) -> None:
    digest = "ab" * 32
    blob = tmp_path / f"sha256-{digest}"
    blob.write_bytes(b"GGUF")

    def never(paths: Sequence[Path]) -> str:
        raise AssertionError("no hashing needed")

    assert DigestCache(tmp_path / "d.json", hash_files=never).get(_entry(blob)) == digest


def test_the_api_description_gives_their_error_body_and_streams() -> None:
    paths = build_openapi(Settings())["paths"]
    for path, method in [
        ("/ollama/api/chat", "post"),
        ("/ollama/api/tags", "get"),
        ("/rkllama/load_model", "post"),
    ]:
        error = paths[path][method]["responses"]["default"]["content"]["application/json"]
        assert error["schema"] == {"$ref": "#/components/schemas/FlatError"}, path
    chat = paths["/ollama/api/chat"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "application/x-ndjson"}
    assert paths["/ollama/"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}
    }

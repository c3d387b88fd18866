"""Ollama's names for shimmy's models, and what Ollama tells about each model.

Ollama names are ``[NAMESPACE/]MODEL[:TAG]``; ``:latest`` is the default tag. A shimmy model
answers to its id, ``ID:latest`` and its aliases; a model found in Ollama's own folder also to
the name Ollama gave it (``llama3.2:3b``); a model pulled as ``hf.co/OWNER/REPO[:QUANT]`` also
to that name (read from the record ``shimmy pull`` keeps next to the file).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shimmy.errors import ModelNotFound
from shimmy.models.pull_remote import VERIFIED_SUFFIX
from shimmy.models.pull_repo import parse_repo_name, pick_file

if TYPE_CHECKING:
    from shimmy.models.entry import ModelEntry
    from shimmy.registry import ModelRegistry

LATEST = ":latest"
_DEFAULT_NAMESPACES = ("registry.ollama.ai/library/", "library/")
MAX_RECORD_BYTES = 1 << 16


def ollama_name(entry: ModelEntry) -> str:
    """The name /api/tags lists: Ollama's own for its models, ``ID:latest`` for the rest."""
    if entry.source == "ollama" and entry.name and ":" in entry.name:
        return entry.name
    return entry.id + LATEST


def _hub_source(entry: ModelEntry) -> str | None:
    """``hf://OWNER/REPO/PATH`` when ``shimmy pull`` fetched ``entry`` from the Hub."""
    record = entry.path.with_name(entry.path.name + VERIFIED_SUFFIX)
    try:
        if record.stat().st_size > MAX_RECORD_BYTES:
            return None
        source = json.loads(record.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and source.startswith("hf://") else None


def _from_hub_name(registry: ModelRegistry, name: str) -> ModelEntry | None:
    wanted = parse_repo_name(name)
    if wanted is None:
        return None
    prefix = f"hf://{wanted.repo_id.lower()}/"
    pulled: dict[str, ModelEntry] = {}
    for entry in registry.entries:
        source = _hub_source(entry)
        if source is not None and source.lower().startswith(prefix):
            pulled[source[len(prefix) :].partition("@")[0]] = entry
    chosen = pick_file(pulled, wanted.quant)
    return pulled[chosen] if chosen is not None else None


def find_entry(registry: ModelRegistry, name: str) -> ModelEntry:
    """The model ``name`` stands for; ``ModelNotFound`` (404) when none does, ``ModelUnusable``
    for a file that cannot be served."""
    candidates = [name]
    bare = name
    for namespace in _DEFAULT_NAMESPACES:
        bare = bare.removeprefix(namespace)
    if bare.endswith(LATEST):
        candidates.append(bare[: -len(LATEST)])
    candidates.append(bare)
    for candidate in candidates:
        with contextlib.suppress(ModelNotFound):
            return registry.resolve(candidate)
    lowered = bare.lower()
    for entry in registry.entries:
        if ollama_name(entry).lower() in (lowered, lowered + LATEST):
            return registry.resolve(entry.id)
    hub = _from_hub_name(registry, name)
    if hub is not None:
        return registry.resolve(hub.id)
    with contextlib.suppress(ModelNotFound):
        # "name:tag" as a file would have it: shimmy ids cannot hold ':' or '/'.
        return registry.resolve(re.sub(r"[:/]", "-", bare))
    # Ollama's wording: its CLI offers to pull when the error says "not found".
    raise ModelNotFound(message=f"model '{name[:200]}' not found")


def id_for_name(name: str) -> str:
    """The model id a new Ollama name gets (``/api/copy``): lowercase, no tag, no ``/``."""
    bare = name.strip()
    for namespace in _DEFAULT_NAMESPACES:
        bare = bare.removeprefix(namespace)
    bare = bare.removesuffix(LATEST)
    return re.sub(r"[:/ _]", "-", bare).lower()


def human_number(count: int) -> str:
    """Ollama's parameter sizes: "8.0B" style, whole numbers without decimals."""
    for limit, unit, decimals in ((10**9, "B", 1), (10**6, "M", 2)):
        if count >= limit:
            value = count / limit
            return (
                f"{value:.0f}{unit}"
                if value == math.floor(value)
                else f"{value:.{decimals}f}{unit}"
            )
    if count >= 1000:
        return f"{count / 1000:.0f}K"
    return str(count)


def details(entry: ModelEntry) -> dict[str, Any]:
    family = entry.architecture or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": human_number(entry.parameter_count) if entry.parameter_count else "",
        "quantization_level": entry.quantization or "",
    }


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def modified_at(entry: ModelEntry) -> str:
    try:
        return rfc3339(entry.path.stat().st_mtime)
    except OSError:
        return rfc3339(0)

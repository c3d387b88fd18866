"""What shimmy knows about one model file before loading it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelEntry:
    id: str
    path: Path  # the file to open; the first shard of a split model
    source: str  # model_paths | models_dir | huggingface | ollama | lmstudio | starter
    size_bytes: int = 0  # all shards together
    name: str = ""
    description: str = ""
    architecture: str | None = None
    quantization: str | None = None
    parameter_count: int | None = None
    context_length: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    kv_bytes_per_token: int | None = None
    shards: list[Path] = field(default_factory=list)
    error: str | None = None  # why the file cannot be served; None when usable
    verified: bool = False  # pulled and matched the checksum its source published

    @property
    def usable(self) -> bool:
        return self.error is None

    def to_api(self, *, loaded: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.name or self.id,
            "description": self.description,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "parameter_count": self.parameter_count,
            "context_length": self.context_length,
            "has_chat_template": self.chat_template is not None,
            "loaded": loaded,
            "source": self.source,
            "usable": self.usable,
            "verified": self.verified,
        }
        if self.error is not None:
            data["error"] = self.error
        return data

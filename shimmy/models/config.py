"""Per-model configuration from a TOML file (``--config`` / ``SHIMMY_CONFIG``).

[models."gemma-3-270m-q4-k-m"]
aliases = ["gemma", "small"]
ctx_size = 8192
n_gpu_layers = 0
threads = 4
parallel = 2
chat_template = "{% for m in messages %}...{% endfor %}"
lora = "adapters/my-style.gguf"   # relative to the config file
lora_scale = 0.8

[models."gemma-3-270m-q4-k-m".sampling]
temperature = 0.3
top_p = 0.95
seed = 42
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shimmy.errors import InvalidRequest


class ConfigError(InvalidRequest):
    code = "invalid_config"
    message = "The configuration file is invalid"


class SamplingDefaults(BaseModel):
    """Used for every field a request leaves out."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    # Every request without a seed of its own samples with this one: the same prompt gets the
    # same answer (llama-server's --seed).
    seed: int | None = Field(None, ge=0, le=2**32 - 1)

    def values(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aliases: list[str] = Field(default_factory=list)
    ctx_size: int | None = Field(None, ge=64)
    n_gpu_layers: int | None = Field(None, ge=-1)
    threads: int | None = Field(None, ge=1)
    parallel: int | None = Field(None, ge=1, le=256)
    chat_template: str | None = None
    lora: Path | None = None
    lora_scale: float = Field(1.0, allow_inf_nan=False)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)

    def settings_overrides(self) -> dict[str, Any]:
        fields = ("ctx_size", "n_gpu_layers", "threads", "parallel")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


class ShimmyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelOptions] = Field(default_factory=dict)

    def options_for(self, model_id: str) -> ModelOptions:
        return self.models.get(model_id) or ModelOptions()

    def alias_map(self) -> dict[str, str]:
        return {alias: model_id for model_id, o in self.models.items() for alias in o.aliases}


def load_config(path: Path | None) -> ShimmyConfig:
    if path is None:
        return ShimmyConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        config = ShimmyConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    for options in config.models.values():
        if options.lora is not None and not options.lora.is_absolute():
            options.lora = (path.parent / options.lora).resolve()
    return config

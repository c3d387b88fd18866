"""Finding GGUF files and reading what they are, without loading weights."""

from shimmy.models.entry import ModelEntry

__all__ = ["ModelEntry"]

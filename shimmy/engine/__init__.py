"""Engines: the protocol the server uses (protocol.py) and the llama.cpp one (local.py)."""

from shimmy.engine.types import (
    EmbeddingResult,
    Event,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    Usage,
)

__all__ = [
    "EmbeddingResult",
    "Event",
    "Finished",
    "GenerationRequest",
    "SamplingParams",
    "TextDelta",
    "Usage",
]

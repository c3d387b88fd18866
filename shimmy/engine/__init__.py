"""The llama.cpp engine: one worker thread per loaded model, batching many sequences."""

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

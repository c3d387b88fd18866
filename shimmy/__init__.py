"""shimmy: a fast, safe local server for GGUF language models, backed by llama.cpp."""

__version__ = "0.1.0"

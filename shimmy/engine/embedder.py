"""Embeddings from a second llama context on the same weights.

The generation context keeps per-sequence KV caches and returns logits; an embeddings context
pools hidden states instead, so the two cannot be one. It is made on first use because most
models are never asked for embeddings, and it costs a KV cache of its own. Only the worker
thread calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shimmy.engine.llama import Batch, ContextConfig, LlamaContext, LlamaModel
from shimmy.engine.types import EmbeddingResult
from shimmy.errors import ContextLengthExceeded, InvalidRequest


class Embedder:
    def __init__(
        self, model: LlamaModel, *, n_ctx: int, threads: int, threads_batch: int, swa_full: bool
    ) -> None:
        self._model = model
        self._config = ContextConfig(
            n_ctx=n_ctx,
            n_seq_max=1,
            n_batch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads_batch,
            embeddings=True,
            swa_full=swa_full,
        )
        self._ctx: LlamaContext | None = None

    def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult:
        """One normalized vector per input: a text, or the model's own token ids."""
        if self._ctx is None:
            self._ctx = LlamaContext(self._model, self._config)
        ctx = self._ctx
        batch = Batch(ctx.n_batch)
        vectors: list[list[float]] = []
        total = 0
        try:
            for index, text in enumerate(texts):
                tokens = self._model.tokenize(text) if isinstance(text, str) else text
                if not tokens:
                    raise InvalidRequest(f"input {index} is empty", param="input")
                bad = [t for t in tokens if not 0 <= t < self._model.n_vocab]
                if bad:
                    raise InvalidRequest(
                        f"input {index} holds token id {bad[0]}, outside this model's "
                        f"vocabulary of {self._model.n_vocab} tokens",
                        param="input",
                    )
                if len(tokens) > ctx.n_batch:
                    raise ContextLengthExceeded(
                        f"input {index} has {len(tokens)} tokens; the limit is {ctx.n_batch}",
                        param="input",
                    )
                total += len(tokens)
                ctx.clear()
                batch.clear()
                for pos, token in enumerate(tokens):
                    batch.add(token, pos, 0, True)
                ctx.decode(batch)
                vector = ctx.sequence_embedding(0, self._model.n_embd)
                norm = float(np.linalg.norm(vector))
                vectors.append((vector / norm if norm > 0 else vector).tolist())
        finally:
            batch.close()
            ctx.clear()
        return EmbeddingResult(vectors=vectors, prompt_tokens=total)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

"""Embeddings from a second llama context on the same weights.

The generation context keeps per-sequence KV caches and returns logits; an embeddings context
pools hidden states instead, so the two cannot be one. It is made on first use because most
models are never asked for embeddings, and it costs a KV cache of its own. Only the worker
thread calls it.

Many inputs share one llama_decode, each as its own sequence: a decode of a few short inputs
costs little more than a decode of one, because the weights are read once per decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shimmy.engine.llama import Batch, ContextConfig, LlamaContext, LlamaModel
from shimmy.engine.types import EmbeddingResult
from shimmy.errors import ContextLengthExceeded, InvalidRequest

# What one decode may hold when it packs several inputs. llama.cpp computes and copies out
# logits for every token of an embeddings batch (n_vocab floats, in the compute buffer and again
# in the output buffer: 2 MiB a token with Gemma's 262k vocabulary), so the tokens of one decode,
# not the request, set the memory an embeddings call touches. The budget is spent on that:
# 256 MiB is 128 tokens with Gemma, which measured within noise of 256 or 512 tokens (about 15
# against 16 inputs/s on the starter model, 2 cores) at a quarter of 512's memory; smaller
# vocabularies get more tokens, up to 512. A single input longer than this still gets a decode
# of its own, up to n_ctx as before.
LOGITS_BUDGET_BYTES = 256 << 20
MAX_BATCH_TOKENS = 512
# Sentence-length inputs (about 16 tokens) fill the largest budget at 32 sequences. The context also
# reserves a logits row per sequence up front (n_seq_max * n_vocab floats, 32 MiB with Gemma),
# which a larger cap would spend on every model that is ever asked for an embedding.
MAX_SEQUENCES = 32


class Embedder:
    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        threads: int,
        threads_batch: int,
        swa_full: bool,
        max_sequences: int = MAX_SEQUENCES,
        batch_tokens: int | None = None,
    ) -> None:
        self._model = model
        self._limit = n_ctx
        if batch_tokens is None:
            per_token = 2 * model.n_vocab * 4
            batch_tokens = max(1, min(MAX_BATCH_TOKENS, LOGITS_BUDGET_BYTES // per_token))
        self._batch_tokens = batch_tokens
        # A decode holds up to max_sequences inputs, or one input of up to n_ctx tokens as
        # before, so the KV cache is no larger than before:
        # - kv_unified: every sequence draws on one cache sized for the batch's tokens together.
        #   Split per sequence instead, each would get n_ctx / max_sequences cells, and a long
        #   input would not fit although the batch had room.
        # - n_ubatch == n_batch (LlamaContext sets both): llama.cpp pools a sequence within one
        #   ubatch only, so a batch must not be split into several.
        # - n_batch a multiple of n_seq_max: llama.cpp reserves the pooled-embeddings graph with
        #   the ubatch rounded up to one, and aborts if that outgrows the outputs it sized.
        n_batch = -(-n_ctx // max_sequences) * max_sequences
        self._config = ContextConfig(
            n_ctx=n_batch,
            n_seq_max=max_sequences,
            n_batch=n_batch,
            n_threads=threads,
            n_threads_batch=threads_batch,
            embeddings=True,
            swa_full=swa_full,
            kv_unified=True,
        )
        self._ctx: LlamaContext | None = None

    def embed(self, texts: Sequence[str | list[int]]) -> EmbeddingResult:
        """One normalized vector per input: a text, or the model's own token ids."""
        if self._ctx is None:
            self._ctx = LlamaContext(self._model, self._config)
        ctx = self._ctx
        # Every input is checked before any is decoded: a bad one fails the request without
        # spending a decode on the inputs before it.
        limit = min(self._limit, ctx.n_batch)
        inputs = [self._tokens(index, text, limit) for index, text in enumerate(texts)]
        vectors: list[list[float]] = []
        batch = Batch(ctx.n_batch)
        try:
            n_seqs = 0
            for tokens in inputs:
                full = batch.size + len(tokens) > self._batch_tokens
                if n_seqs == self._config.n_seq_max or (n_seqs and full):
                    vectors.extend(self._decode(ctx, batch, n_seqs))
                    n_seqs = 0
                for pos, token in enumerate(tokens):
                    batch.add(token, pos, n_seqs, True)
                n_seqs += 1
            if n_seqs:
                vectors.extend(self._decode(ctx, batch, n_seqs))
        finally:
            batch.close()
            ctx.clear()
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(t) for t in inputs))

    def _tokens(self, index: int, text: str | list[int], limit: int) -> list[int]:
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
        if len(tokens) > limit:
            raise ContextLengthExceeded(
                f"input {index} has {len(tokens)} tokens; the limit is {limit}", param="input"
            )
        return tokens

    def _decode(self, ctx: LlamaContext, batch: Batch, n_seqs: int) -> list[list[float]]:
        """Pool the batch's sequences 0..n_seqs-1, in that order, and empty the batch."""
        # Sequence ids are reused from batch to batch: the cache must not hold the last
        # batch's tokens, or they would be attended to and pooled with this one's.
        ctx.clear()
        ctx.decode(batch)
        batch.clear()
        vectors = np.stack([ctx.sequence_embedding(s, self._model.n_embd) for s in range(n_seqs)])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
        return [v.tolist() for v in vectors]

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

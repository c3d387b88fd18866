"""Thin, typed wrappers over llama-cpp-python's low-level (ctypes) API.

Only the engine's worker thread calls into these objects (tokenization excepted: the vocabulary
is immutable after load, so tokenizing from another thread is safe).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from shimmy.engine.chain import add_named_samplers
from shimmy.engine.types import FimTokens, SamplingParams
from shimmy.errors import GenerationFailed, InvalidRequest, ModelUnusable, ServerError

log = logging.getLogger(__name__)

_POOLING_MEAN = 1
# LLAMA_STATE_SEQ_FLAGS_SWA_ONLY: copy only the sliding-window layers' cache.
_STATE_WINDOW_ONLY = 1


_LLAMA_LOG = logging.getLogger("llama.cpp")
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp prints its load chatter to stderr by default; routed through logging it obeys
    # -v and the log format, and never interleaves with text a command writes to stdout.
    python_level = _GGML_LEVELS.get(level, logging.DEBUG)
    if _LLAMA_LOG.isEnabledFor(python_level):
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            _LLAMA_LOG.log(python_level, "%s", message)


# A module global: llama.cpp keeps calling it after llama_log_set returns.
_LLAMA_LOG_THUNK = llama_cpp.llama_log_callback(_route_llama_log)


def quiet_llama_logs(verbose: bool) -> None:
    """Route llama.cpp's logs into the "llama.cpp" logger: errors only unless verbose."""
    _LLAMA_LOG.setLevel(logging.DEBUG if verbose else logging.ERROR)
    llama_cpp.llama_log_set(_LLAMA_LOG_THUNK, ctypes.c_void_p(0))


def gpu_offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int  # total across sequences
    n_seq_max: int
    n_batch: int
    n_threads: int
    n_threads_batch: int
    embeddings: bool = False
    swa_full: bool = True
    kv_unified: bool = False


def _progress_reporter(on_progress: Callable[[float], None]) -> Callable[[float, object], bool]:
    def report(fraction: float, _user_data: object) -> bool:
        # An exception cannot cross into C; a failing observer must not fail the load.
        with contextlib.suppress(Exception):
            on_progress(min(max(float(fraction), 0.0), 1.0))
        return True  # False would abort the load

    return report


class LlamaModel:
    """A loaded model (weights) and its vocabulary."""

    def __init__(
        self,
        path: Path,
        *,
        n_gpu_layers: int,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if on_progress is not None:
            # Bound to a local so the ctypes thunk outlives the (synchronous) load.
            progress_thunk = llama_cpp.llama_progress_callback(_progress_reporter(on_progress))
            params.progress_callback = progress_thunk
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelUnusable(f"llama.cpp could not load {path.name}")
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(ptr))
        self.n_embd = int(llama_cpp.llama_model_n_embd(ptr))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.size_bytes = int(llama_cpp.llama_model_size(ptr))
        self.n_params = int(llama_cpp.llama_model_n_params(ptr))
        # Sliding-window attention: 0 for models without it.
        self.n_swa = int(llama_cpp.llama_model_n_swa(ptr))
        # Recurrent state (Mamba, RWKV, hybrids) cannot be cut back to an earlier position,
        # which draft verification and prefix reuse past a fork rely on.
        self.rewindable = not (
            llama_cpp.llama_model_is_recurrent(ptr) or llama_cpp.llama_model_is_hybrid(ptr)
        )

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """``parse_special``: spellings of special tokens (``<|fim_prefix|>``) become those
        tokens; off for text that must stay text, such as a file's contents."""
        data = text.encode("utf-8", errors="replace")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:  # the buffer was too small: -n is the size needed
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        if n < 0:
            raise InvalidRequest("the prompt could not be tokenized")
        tokens = list(buf[:n])
        # Chat templates often spell out BOS themselves; tokenizing with add_special would
        # double it, which degrades most models' output.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos:
            tokens.pop(0)
        return tokens

    def token_bytes(self, token: int, buf: ctypes.Array[ctypes.c_char]) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            bigger = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, bigger, -n, 0, False)
            return bigger.raw[:n]
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        # llama.cpp indexes its token table unchecked: an id a client made up would abort.
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary", param="tokens")
        buf = ctypes.create_string_buffer(256)
        return b"".join(self.token_bytes(t, buf) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> tuple[int, ...]:
        # llama.cpp keeps its EOG set private; asking per token takes ~0.1 s for 262k tokens.
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def fim_tokens(self) -> FimTokens | None:
        """The vocabulary's fill-in-the-middle tokens, as llama.cpp found them (the GGUF's
        ``tokenizer.ggml.fim_*_token_id`` keys, else well-known token spellings); None unless
        it has all three of prefix, suffix and middle."""

        def token(accessor: Callable[[object], int]) -> int | None:
            value = int(accessor(self.vocab))
            return value if value >= 0 else None  # LLAMA_TOKEN_NULL is -1

        pre = token(llama_cpp.llama_vocab_fim_pre)
        suf = token(llama_cpp.llama_vocab_fim_suf)
        mid = token(llama_cpp.llama_vocab_fim_mid)
        if pre is None or suf is None or mid is None:
            return None
        return FimTokens(
            pre=pre,
            suf=suf,
            mid=mid,
            pad=token(llama_cpp.llama_vocab_fim_pad),
            rep=token(llama_cpp.llama_vocab_fim_rep),
            sep=token(llama_cpp.llama_vocab_fim_sep),
            bos=self.bos if self.add_bos and self.bos >= 0 else None,
        )


class LlamaContext:
    def __init__(self, model: LlamaModel, config: ContextConfig) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.n_seq_max
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads_batch
        params.swa_full = config.swa_full
        params.kv_unified = config.kv_unified
        params.no_perf = True
        if config.embeddings:
            params.embeddings = True
            params.pooling_type = _POOLING_MEAN
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ServerError("llama.cpp could not create a context (not enough memory?)")
        self.ptr = ptr
        self.memory = llama_cpp.llama_get_memory(ptr)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ptr))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ptr))
        self.n_batch = int(llama_cpp.llama_n_batch(ptr))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> None:
        rc = llama_cpp.llama_decode(self.ptr, batch.raw)
        if rc != 0:
            raise GenerationFailed(f"llama_decode failed (code {rc})")

    def forget(self, seq_id: int, from_pos: int = 0) -> bool:
        """Drop a sequence's KV from ``from_pos`` on; False if the cache cannot cut there
        (then the caller must drop the whole sequence)."""
        start = -1 if from_pos <= 0 else from_pos
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, start, -1))

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def copy_sequence(self, source: int, target: int) -> None:
        """Make ``target`` hold what ``source`` holds. Between KV streams (kv_unified off)
        llama.cpp copies the buffers at the next decode, before that decode reads them."""
        llama_cpp.llama_memory_seq_rm(self.memory, target, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def first_position(self, seq_id: int) -> int:
        """The oldest position whose KV a sequence still holds (-1: none). With a sliding
        window below the full context, positions older than the window get overwritten."""
        return int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))

    def save_sequence(
        self, seq_id: int, *, window_only: bool = False
    ) -> ctypes.Array[ctypes.c_uint8]:
        """A copy of a sequence's KV in host memory. ``window_only``: only the sliding-window
        layers' part, which cannot be cut back to an earlier position (a checkpoint)."""
        flags = _STATE_WINDOW_ONLY if window_only else 0
        size = int(llama_cpp.llama_state_seq_get_size_ext(self.ptr, seq_id, flags))
        buf = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data_ext(self.ptr, buf, size, seq_id, flags))
        if written != size:
            raise GenerationFailed("llama.cpp could not copy a sequence's state")
        return buf

    def restore_sequence(
        self, seq_id: int, state: ctypes.Array[ctypes.c_uint8], *, window_only: bool = False
    ) -> bool:
        """Load a copy made by ``save_sequence`` into ``seq_id`` (replacing what it held, or
        with ``window_only`` its sliding-window part); False if it did not fit."""
        flags = _STATE_WINDOW_ONLY if window_only else 0
        read = llama_cpp.llama_state_seq_set_data_ext(self.ptr, state, len(state), seq_id, flags)
        return int(read) > 0

    def logits(self, index: int, n_vocab: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def sequence_embedding(self, seq_id: int, n_embd: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise GenerationFailed("the model produced no embedding")
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()


class LoraAdapter:
    def __init__(self, model: LlamaModel, path: Path) -> None:
        ptr = llama_cpp.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise ModelUnusable(f"llama.cpp could not load the LoRA adapter {path.name}")
        self.ptr = ptr

    def apply(self, ctx: LlamaContext, scale: float) -> None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.ptr)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(ctx.ptr, adapters, 1, scales) != 0:
            raise ModelUnusable("the LoRA adapter does not fit this model")

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_adapter_lora_free(self.ptr)
            self.ptr = None


class Batch:
    """A reusable llama_batch holding up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.size = 0

    def clear(self) -> None:
        self.size = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, want_logits: bool) -> int:
        i = self.size
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = 1 if want_logits else 0
        self.size = i + 1
        raw.n_tokens = self.size
        return i

    @property
    def room(self) -> int:
        return self.capacity - self.size

    def close(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


# llama_token_data laid out for numpy: filling a candidate array from the logits is then one
# vectorized copy instead of a Python loop over the vocabulary.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class Sampler:
    """One request's sampler chain: its own penalties, grammar and random state.

    A grammar is kept out of the chain. Checking a whole vocabulary against a grammar costs
    far more than sampling (Gemma 3 has 262k tokens), so, as llama.cpp's own server does, a
    token is first sampled freely and only checked; only when the grammar rejects it is the
    grammar applied to every candidate and the token sampled again. Most tokens of a JSON
    document pass the check, so constrained output runs at nearly unconstrained speed.
    """

    def __init__(self, model: LlamaModel, params: SamplingParams) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(chain_params)
        self.grammar: object | None = None
        self.n_vocab = model.n_vocab
        self.seed = params.seed if params.seed is not None else random.getrandbits(32)
        try:
            self._build(model, params)
        except Exception:
            self.close()
            raise

    def _add(self, sampler: object) -> None:
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def _build(self, model: LlamaModel, p: SamplingParams) -> None:
        if p.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, p.grammar.encode(), b"root")
            if not grammar:
                raise InvalidRequest("the grammar could not be parsed", param="grammar")
            self.grammar = grammar
        if p.logit_bias:
            self._add(_logit_bias_sampler(model.n_vocab, p.logit_bias))
        if p.chain is not None:
            add_named_samplers(self._add, model.vocab, model.n_vocab, p, self.seed)
            return
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    model.n_vocab,
                    p.penalty_last_n,
                    p.repetition_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                )
            )
        if p.temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(self.seed & 0xFFFFFFFF))

    def sample(self, ctx: LlamaContext, index: int) -> int:
        if self.grammar is None:
            # llama_sampler_sample also "accepts" the token, advancing the penalties' state.
            return int(llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, index))
        logits = ctx.logits(index, self.n_vocab)
        token = self._apply(logits, with_grammar=False)
        if not self._grammar_allows(token):
            token = self._apply(logits, with_grammar=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _apply(self, logits: np.ndarray, *, with_grammar: bool) -> int:
        """Run the chain (after the grammar, if asked) over every token; the chosen token."""
        candidates = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = np.arange(self.n_vocab, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        if with_grammar:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise GenerationFailed("the sampler chose no token")
        # Read through the array's own pointer: a sampler may point it at a buffer of its own.
        return int(array.data[array.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        single = llama_cpp.llama_token_data(id=token, logit=1.0, p=0.0)
        array = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(single), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(np.isfinite(single.logit))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def _logit_bias_sampler(n_vocab: int, biases: tuple[tuple[int, float], ...]) -> object:
    bad = next((t for t, _ in biases if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary", param="logit_bias")
    entries = (llama_cpp.llama_logit_bias * len(biases))()
    for entry, (token, bias) in zip(entries, biases, strict=True):
        entry.token = token
        entry.bias = bias
    # llama.cpp copies the entries, so the array may go when this returns.
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), entries)

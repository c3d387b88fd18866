"""A tiny random-weight llama GGUF for tests.

Two layers, n_embd 64, a byte-level gpt2 vocabulary (every byte is a token, plus a few merges and
the special tokens), so llama.cpp loads it in milliseconds and decodes thousands of tokens per
second. Its output is random bytes: ideal for exercising UTF-8 reassembly, useless for wording.

The weights are shaped so that end-of-text is (almost) never sampled: every token embedding has a
large constant first component, which survives the final RMS norm as a positive value, and the
EOS row of the output matrix is strongly negative in exactly that component. Tests can therefore
rely on "length" finishes; a tiny EOS probability is kept honest by tests that accept "stop" too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2

BOS, EOS = "<s>", "</s>"
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]

# Fill-in-the-middle tokens, by their GGUF key. The spellings are this model's own, not a
# family's that llama.cpp would recognise by name: it must find them through the keys.
FIM_TOKENS = {
    "pre": "<|tiny_fim_pre|>",
    "suf": "<|tiny_fim_suf|>",
    "mid": "<|tiny_fim_mid|>",
    "pad": "<|tiny_fim_pad|>",
    "rep": "<|tiny_repo|>",
    "sep": "<|tiny_file|>",
}
# "basic": prefix, suffix, middle and pad; "repo": also the repository and file separators.
FIM_KINDS = {"basic": ("pre", "suf", "mid", "pad"), "repo": tuple(FIM_TOKENS)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


@dataclass
class Vocabulary:
    """A tokenizer for ``write_tiny_gguf``: llama.cpp's tokenizer model name and its pieces."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None


def vocabulary(fim: str | None = None) -> tuple[list[str], list[int]]:
    tokens = [_bytes_to_unicode()[b] for b in range(256)]
    types = [int(TokenType.NORMAL)] * 256
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(int(TokenType.NORMAL))
    specials = [BOS, EOS, *(FIM_TOKENS[name] for name in FIM_KINDS.get(fim or "", ()))]
    tokens += specials
    types += [int(TokenType.CONTROL)] * len(specials)
    return tokens, types


def fim_token_ids(fim: str) -> dict[str, int]:
    """The ids of a FIM model's FIM tokens (``write_tiny_gguf(..., fim=fim)``), by key."""
    tokens, _ = vocabulary(fim)
    return {name: tokens.index(FIM_TOKENS[name]) for name in FIM_KINDS[fim]}


def write_tiny_gguf(
    path: Path,
    *,
    chat_template: str | None = None,
    context_length: int = 4096,
    seed: int = 1234,
    name: str = "tiny-test-model",
    head_count: int = N_HEAD,
    head_count_kv: int | list[int] = N_HEAD,
    block_count: int = N_LAYER,
    fim: str | None = None,
    rope_dimension_count: int = N_EMBD // N_HEAD,
    vocab: Vocabulary | None = None,
    metadata: Callable[[GGUFWriter], None] | None = None,
    kv_shaped_by_heads: bool = False,
    sliding_window: int | None = None,
) -> Path:
    """The model; the hyperparameters can be set to values no model has, for tests of how
    such a file is refused or survived (the tensors keep their real shapes). ``fim``: None, or
    a kind of ``FIM_KINDS`` for a model that can fill in the middle. ``vocab`` replaces the
    byte-level vocabulary; ``metadata`` adds keys of its own. ``kv_shaped_by_heads``: the K
    and V projections have ``head_count_kv`` heads of ``N_EMBD // head_count``, as a real
    grouped-query model's would, rather than the shape of the default model.
    ``sliding_window``: a Gemma 3 model instead (its extra norms), every layer attending to
    only that many previous positions."""
    rng = np.random.default_rng(seed)
    if vocab is None:
        tokens, types = vocabulary(fim)
        vocab = Vocabulary("gpt2", tokens, types, merges=MERGES)
    tokens, types = vocab.tokens, vocab.types
    n_vocab = len(tokens)
    bos_id, eos_id = tokens.index(BOS), tokens.index(EOS)

    writer = GGUFWriter(str(path), "llama" if sliding_window is None else "gemma3")
    writer.add_name(name)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(block_count)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    writer.add_rope_dimension_count(rope_dimension_count)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if metadata is not None:
        metadata(writer)
    fim_ids = fim_token_ids(fim) if fim is not None else {}
    for key, token_id in fim_ids.items():
        writer.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", token_id)

    def weight(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = weight(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = 3.0
    output = weight(n_vocab, N_EMBD, scale=1.0)
    output[:, 0] = 0.0
    # End of text, and the FIM tokens (pad, repository and file separator end a generation
    # too), are kept out of the random output the same way.
    for quiet in (eos_id, *fim_ids.values()):
        output[quiet, :] = 0.0
        output[quiet, 0] = -20.0

    kv_heads = head_count_kv if isinstance(head_count_kv, int) else head_count_kv[0]
    kv_rows = (N_EMBD // head_count) * kv_heads if kv_shaped_by_heads else N_EMBD
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_rows, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_rows, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
        if sliding_window is not None:
            head = N_EMBD // head_count
            for norm, size in (
                ("post_attention_norm", N_EMBD),
                ("post_ffw_norm", N_EMBD),
                ("attn_q_norm", head),
                ("attn_k_norm", head),
            ):
                writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(size, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_lora(path: Path, *, rank: int = 4, seed: int = 99, strength: float = 2.0) -> Path:
    """A LoRA adapter (GGUF) for the tiny model: low-rank updates of every attention and
    feed-forward projection, strong enough to change its output."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    shapes = {  # name: (inputs, outputs), as the model's tensors are shaped
        "attn_q": (N_EMBD, N_EMBD),
        "attn_v": (N_EMBD, N_EMBD),
        "ffn_up": (N_EMBD, N_FF),
        "ffn_down": (N_FF, N_EMBD),
    }
    for layer in range(N_LAYER):
        for name, (n_in, n_out) in shapes.items():
            a = (rng.standard_normal((rank, n_in)) * strength).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * strength).astype(np.float32)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

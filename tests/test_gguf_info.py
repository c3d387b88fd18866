"""Reading GGUF headers: the facts of real files, and a clear refusal of broken or hostile ones."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import isolated_settings
from gguf import GGUFReader, GGUFWriter
from tiny_gguf import BOS, EOS, N_EMBD, N_FF, N_LAYER, vocabulary, write_tiny_gguf

from shimmy.errors import ModelUnusable
from shimmy.models.discovery import discover_models
from shimmy.models.gguf_info import quantization_name, read_gguf_info

STRING, ARRAY, UINT8, UINT32 = 8, 9, 0, 4


def header(*, version: int = 3, tensors: int = 0, kvs: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def tiny_parameter_count() -> int:
    n_vocab = len(vocabulary()[0])
    per_layer = 2 * N_EMBD + 4 * N_EMBD * N_EMBD + 3 * N_FF * N_EMBD
    return 2 * n_vocab * N_EMBD + N_EMBD + N_LAYER * per_layer


# --- real files --------------------------------------------------------------------------------


def test_tiny_model_header(tiny_model_path: Path) -> None:
    info = read_gguf_info(tiny_model_path)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "tiny-test-model"
    assert info.context_length == 4096
    assert info.chat_template is None
    assert (info.bos_token, info.eos_token) == (BOS, EOS)
    assert (info.file_type, info.quantization) == (0, "F32")
    assert info.tensor_count == 3 + 9 * N_LAYER
    assert info.parameter_count == tiny_parameter_count()
    assert (info.split_count, info.split_index) == (None, None)
    assert info.file_size == tiny_model_path.stat().st_size


def test_header_agrees_with_gguf_reader(tiny_model_path: Path) -> None:
    info = read_gguf_info(tiny_model_path)
    reader = GGUFReader(tiny_model_path)
    assert info.tensor_count == len(reader.tensors)
    assert info.kv_count == reader.fields["GGUF.kv_count"].contents()
    assert info.parameter_count == sum(tensor.n_elements for tensor in reader.tensors)


def test_chat_template_and_context_length_are_read(tmp_path: Path) -> None:
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=template, context_length=2048)
    info = read_gguf_info(path)
    assert info.chat_template == template
    assert info.context_length == 2048


def write_small_gguf(path: Path, arch: str = "llama", **metadata: int | str) -> Path:
    """A GGUF with one small tensor and chosen metadata (no vocabulary)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        name = key.replace("__", ".")
        if isinstance(value, str):
            writer.add_string(name, value)
        elif name.startswith("split."):
            writer.add_uint16(name, value)
        else:
            writer.add_uint32(name, value)
    writer.add_tensor("weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_quantization_split_and_missing_vocabulary(tmp_path: Path) -> None:
    path = write_small_gguf(
        tmp_path / "q.gguf",
        arch="qwen2",
        general__file_type=15,
        general__size_label="7B",
        split__count=3,
        split__no=0,
    )
    info = read_gguf_info(path)
    assert info.architecture == "qwen2"
    assert info.quantization == "Q4_K_M"
    assert info.size_label == "7B"
    assert (info.split_count, info.split_index) == (3, 0)
    assert (info.bos_token, info.eos_token, info.context_length) == (None, None, None)
    assert info.parameter_count == 24


@pytest.mark.parametrize(
    ("file_type", "expected"),
    [
        (0, "F32"),
        (1, "F16"),
        (7, "Q8_0"),
        (15, "Q4_K_M"),
        (18, "Q6_K"),
        (32, "BF16"),
        (1024, "unknown"),
        (9999, "unknown"),
        (None, "unknown"),
    ],
)
def test_quantization_names(file_type: int | None, expected: str) -> None:
    assert quantization_name(file_type) == expected


@pytest.mark.starter
def test_starter_model_header(starter_model_path: Path) -> None:
    info = read_gguf_info(starter_model_path)
    assert info.architecture == "gemma3"
    assert info.name == "Gemma 3 270m"
    assert info.quantization == "Q4_K_M"
    assert info.size_label == "270M"
    assert info.parameter_count == 268_098_176
    assert info.context_length == 32768
    assert info.chat_template is None  # this GGUF ships without one; templates fall back per arch
    assert (info.bos_token, info.eos_token) == ("<bos>", "<eos>")
    assert (info.tensor_count, info.kv_count) == (236, 33)


# --- broken and hostile files --------------------------------------------------------------------


def truncated_in_metadata(tiny: bytes) -> bytes:
    cut = tiny.index(b"tokenizer.ggml.tokens") + 200  # inside the vocabulary array
    return tiny[:cut]


def zip_file(_: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.safetensors", b"\0" * 100)
    return buffer.getvalue()


def huge_array(_: bytes) -> bytes:
    # A uint8 array claiming 2**60 elements: a naive reader loops for ages.
    kv = gguf_string("evil") + struct.pack("<IIQ", ARRAY, UINT8, 1 << 60)
    return header(kvs=1) + kv + b"\0" * 64


def huge_string_array(_: bytes) -> bytes:
    kv = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 1 << 40)
    return header(kvs=1) + kv + b"\0" * 4096


def unknown_value_type(_: bytes) -> bytes:
    return header(kvs=1) + gguf_string("x") + struct.pack("<I", 77) + b"\0" * 64


def huge_tensor_dims(_: bytes) -> bytes:
    info = gguf_string("w") + struct.pack("<I", 9) + b"\0" * 100
    return header(tensors=1) + info


def string_kv(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def lora_adapter(_: bytes) -> bytes:
    kvs = string_kv("general.architecture", "llama") + string_kv("general.type", "adapter")
    tensor_info = gguf_string("w") + struct.pack("<IQIQ", 1, 4, 0, 0)  # 4 x F32 at offset 0
    head = header(tensors=1, kvs=2) + kvs + tensor_info
    return head + b"\0" * (-len(head) % 32) + b"\0" * 16


MALFORMED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda _: b"", "empty"),
    "three-bytes": (lambda _: b"GGU", "truncated GGUF header"),
    "wrong-magic": (lambda tiny: b"GGML" + tiny[4:], "bad magic b'GGML'"),
    "version-99": (lambda tiny: tiny[:4] + struct.pack("<I", 99) + tiny[8:], "version 99"),
    "version-1": (lambda tiny: tiny[:4] + struct.pack("<I", 1) + tiny[8:], "version 1"),
    "big-endian": (lambda tiny: tiny[:4] + struct.pack(">I", 3) + tiny[8:], "big-endian"),
    "absurd-tensor-count": (
        lambda _: header(tensors=1 << 60) + b"\0" * 1000,
        "tensor count 1152921504606846976 is impossible for a 1 KiB file",
    ),
    "absurd-kv-count": (
        lambda _: header(kvs=1 << 60) + b"\0" * 1000,
        "metadata key count 1152921504606846976 is impossible",
    ),
    "truncated-metadata": (truncated_in_metadata, "truncated"),
    "truncated-tensor-data": (lambda tiny: tiny[:-100], "data of tensor"),
    "zip-renamed": (zip_file, "not a GGUF file (bad magic b'PK\\x03\\x04')"),
    "huge-array": (huge_array, "truncated"),
    "huge-string-array": (huge_string_array, "truncated"),
    "unknown-value-type": (unknown_value_type, "unknown value type 77"),
    "too-many-dimensions": (huge_tensor_dims, "9 dimensions"),
    "no-architecture": (lambda _: header(), "no general.architecture"),
    "no-tensors": (
        lambda _: header(kvs=1) + string_kv("general.architecture", "llama"),
        "no tensors",
    ),
    "lora-adapter": (lora_adapter, "LoRA adapter"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_refused_and_listed_with_a_reason(
    case: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    make, reason = MALFORMED[case]
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / f"{case}.gguf"
    path.write_bytes(make(tiny_model_path.read_bytes()))

    with pytest.raises(ModelUnusable) as caught:
        read_gguf_info(path)
    assert caught.value.details is not None
    assert reason in caught.value.details

    entries = discover_models(isolated_settings(folder, tmp_path))
    assert [(entry.id, entry.usable) for entry in entries] == [(case, False)]
    assert entries[0].error == caught.value.details


def test_a_folder_named_like_a_model_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "looks-like.gguf"
    folder.mkdir()
    with pytest.raises(ModelUnusable, match="not a regular file"):
        read_gguf_info(folder)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUnusable, match="cannot read"):
        read_gguf_info(tmp_path / "absent.gguf")


def test_any_corruption_of_the_header_is_refused_cleanly(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """Cuts and byte flips anywhere in the metadata and tensor infos: the reader either succeeds
    or raises ModelUnusable; no other exception may escape (seeded, so failures reproduce)."""
    tiny = tiny_model_path.read_bytes()
    header_end = read_gguf_info(tiny_model_path).file_size - tiny_parameter_count() * 4
    rng = np.random.default_rng(7)
    path = tmp_path / "fuzzed.gguf"
    refused = 0
    for _ in range(300):
        data = bytearray(tiny[: int(rng.integers(0, header_end))] if rng.random() < 0.3 else tiny)
        for position in rng.integers(0, min(len(data), header_end) or 1, size=3):
            if position < len(data):
                data[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            read_gguf_info(path)
        except ModelUnusable as exc:
            assert exc.details
            assert not exc.details.startswith("unreadable"), exc.details  # no parser crash
            refused += 1
    assert refused > 0


def _continuation_shard(path: Path, *, split_no: int = 1, split_count: int = 2) -> Path:
    """What gguf-split writes after the first shard: split.* keys and tensors, no model
    metadata (no general.architecture)."""
    import struct

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    uint16 = 2
    kvs = b"".join(
        string(key) + struct.pack("<IH", uint16, value)
        for key, value in (("split.no", split_no), ("split.count", split_count))
    )
    tensor_info = (
        string("blk.1.ffn_up.weight") + struct.pack("<IQQ", 1, 8, 0) + struct.pack("<Q", 0)
    )
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + kvs + tensor_info
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + b"\0" * 32)
    return path


def test_continuation_shards_need_no_model_metadata(tmp_path: Path) -> None:
    shard = _continuation_shard(tmp_path / "m-00002-of-00002.gguf")
    with pytest.raises(ModelUnusable, match="architecture"):
        read_gguf_info(shard)
    info = read_gguf_info(shard, continuation_shard=True)
    assert info.split_count == 2 and info.split_index == 1
    assert info.parameter_count == 8


def test_split_model_made_by_gguf_split_is_one_usable_model(tmp_path: Path) -> None:
    from shimmy.models.discovery import discover_models
    from shimmy.settings import Settings

    folder = tmp_path / "split"
    folder.mkdir()
    write_tiny_gguf(folder / "m-00001-of-00002.gguf")
    _continuation_shard(folder / "m-00002-of-00002.gguf")
    settings = Settings(
        model_paths=[folder],
        models_dir=tmp_path / "own",
        scan_user_caches=False,
        starter_model=False,
        cache_dir=tmp_path / "cache",
    )
    [entry] = discover_models(settings)
    assert entry.id == "m"
    assert entry.error is None
    assert len(entry.shards) == 2

"""Reading what a GGUF file is from its header, without touching its weights.

The header is walked here, over a read-only memory map, instead of with ``gguf.GGUFReader``:
GGUFReader builds a numpy view for every vocabulary entry (about 12 s for the starter model's
262k-token vocabulary on a small machine) and trusts every count and length it reads, so a
hostile array length makes it loop for hours. Here every count and length is checked against the
bytes that remain before it is used, numeric arrays are skipped in one step, and the total work is
capped, so any malformed file ends quickly in ``ModelUnusable`` with a reason a person can act on.
The ``gguf`` package still supplies the format's constants (value, tensor and file types).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from shimmy.errors import ModelUnusable
from shimmy.models.gguf_hparams import check_hyperparameters

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), kv count (u64)
DEFAULT_ALIGNMENT = 32

# Smallest possible encodings, used to reject counts the file cannot possibly hold.
MIN_TENSOR_INFO_BYTES = 24
MIN_KV_BYTES = 12

# Caps far above any real model (real files: < 100 keys, a few thousand tensors, vocabularies
# under 1M entries) that keep the work bounded for hostile files of any size.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_METADATA_ITEMS = 1 << 23  # strings and nested arrays visited one by one
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 1 << 12
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4

_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class GGUFInfo:
    """Facts from one GGUF file's header. ``parameter_count`` is exact: the sum of the element
    counts of the tensors in this file (for a split model, in this shard only)."""

    path: Path
    file_size: int
    version: int
    tensor_count: int
    kv_count: int
    architecture: str
    name: str | None
    size_label: str | None  # general.size_label as written by the converter, e.g. "270M"
    parameter_count: int
    file_type: int | None
    quantization: str  # "Q4_K_M", "F16", ... or "unknown"
    context_length: int | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    split_count: int | None  # split.count: shards of the whole model
    split_index: int | None  # split.no: 0-based position of this file
    kv_bytes_per_token: int | None = None  # F16 K+V cache bytes one token costs; None if unknown


def read_gguf_info(path: Path, *, continuation_shard: bool = False) -> GGUFInfo:
    """Read and validate ``path``'s GGUF header; raise ``ModelUnusable`` saying why it is not
    a usable GGUF file. Only the header pages are touched, never the tensor data."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ModelUnusable(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or device named *.gguf could block forever.
        raise ModelUnusable(f"{path.name} is not a regular file")
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
            version, tensor_count, kv_count = _check_fixed_header(head, st.st_size)
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                parser = _HeaderParser(buf, len(buf))
                return parser.parse(path, version, tensor_count, kv_count, continuation_shard)
    except ModelUnusable:
        raise
    except OSError as exc:
        raise ModelUnusable(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    except Exception as exc:  # a parser bug must not take discovery or the server down
        raise ModelUnusable(f"unreadable GGUF header ({type(exc).__name__}: {exc})") from exc


def quantization_name(file_type: int | None) -> str:
    """``general.file_type`` as the usual label: 15 -> "Q4_K_M", 0 -> "F32"."""
    if file_type is None:
        return "unknown"
    try:
        member = LlamaFileType(file_type)
    except ValueError:
        return "unknown"
    if member is LlamaFileType.GUESSED:
        return "unknown"
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def human_size(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            text = f"{value:.0f}" if unit == "B" else f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check_fixed_header(head: bytes, file_size: int) -> tuple[int, int, int]:
    """Validate the 24 fixed bytes before trusting anything that follows them."""
    if file_size == 0:
        raise ModelUnusable("file is empty")
    magic = head[:4]
    if magic != GGUF_MAGIC[: len(magic)]:
        raise ModelUnusable(f"not a GGUF file (bad magic {magic!r})")
    if len(head) < HEADER_BYTES:
        raise ModelUnusable(
            f"truncated GGUF header ({len(head)} bytes; a GGUF file has at least {HEADER_BYTES})"
        )
    (version,) = _U32.unpack_from(head, 4)
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
            raise ModelUnusable("big-endian GGUF files are not supported")
        raise ModelUnusable(f"unsupported GGUF version {version} (supported: 2 and 3)")
    tensor_count, kv_count = struct.unpack_from("<QQ", head, 8)
    room = file_size - HEADER_BYTES
    size_text = human_size(file_size)
    if tensor_count * MIN_TENSOR_INFO_BYTES > room:
        raise ModelUnusable(f"tensor count {tensor_count} is impossible for a {size_text} file")
    if kv_count * MIN_KV_BYTES > room:
        raise ModelUnusable(f"metadata key count {kv_count} is impossible for a {size_text} file")
    if tensor_count * MIN_TENSOR_INFO_BYTES + kv_count * MIN_KV_BYTES > room:
        raise ModelUnusable(
            f"{tensor_count} tensors and {kv_count} metadata keys cannot fit in a {size_text} file"
        )
    if tensor_count > MAX_TENSOR_COUNT:
        raise ModelUnusable(f"tensor count {tensor_count} is implausibly large")
    if kv_count > MAX_KV_COUNT:
        raise ModelUnusable(f"metadata key count {kv_count} is implausibly large")
    return version, tensor_count, kv_count


@dataclass
class _StringRef:
    """Where a string value lies; decoded only if someone asks for it."""

    start: int
    length: int


@dataclass
class _StringArrayRef:
    start: int  # offset of the first element's length prefix
    count: int


MetadataValue = int | float | bool | _StringRef | _StringArrayRef | None


class _HeaderParser:
    """A cursor over the mapped file. Every read is bounds-checked; running past the end raises
    ``ModelUnusable`` naming the part of the header that was cut off."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = HEADER_BYTES
        self.items_left = MAX_METADATA_ITEMS
        self.values: dict[str, MetadataValue] = {}

    # --- primitives --------------------------------------------------------------------------

    def _take(self, n_bytes: int, what: str) -> int:
        start = self.pos
        if n_bytes < 0 or start + n_bytes > self.size:
            raise ModelUnusable(f"truncated GGUF file: {what} runs past the end of the file")
        self.pos = start + n_bytes
        return start

    def _u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.buf, self._take(4, what))[0]
        return value

    def _u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self.buf, self._take(8, what))[0]
        return value

    def _string(self, what: str, max_bytes: int) -> str:
        length = self._u64(what)
        if length > max_bytes:
            raise ModelUnusable(f"{what} is {length} bytes long, which is implausible")
        start = self._take(length, what)
        try:
            return self.buf[start : start + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelUnusable(f"{what} at byte {start} is not valid UTF-8") from exc

    def _spend(self, n_items: int) -> None:
        self.items_left -= n_items
        if self.items_left < 0:
            raise ModelUnusable("GGUF metadata is implausibly large (too many array elements)")

    def text(self, ref: MetadataValue) -> str | None:
        if not isinstance(ref, _StringRef):
            return None
        return self.buf[ref.start : ref.start + ref.length].decode("utf-8", errors="replace")

    def integer(self, key: str) -> int | None:
        value = self.values.get(key)
        # bool is an int subclass but never a count or an id.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return None

    # --- metadata ----------------------------------------------------------------------------

    def _value(self, raw_type: int, key: str, depth: int) -> MetadataValue:
        try:
            value_type = GGUFValueType(raw_type)
        except ValueError:
            raise ModelUnusable(f"metadata key '{key}' has unknown value type {raw_type}") from None
        scalar = _SCALAR_FORMATS.get(value_type)
        if scalar is not None:
            start = self._take(scalar.size, f"value of metadata key '{key}'")
            parsed: int | float | bool = scalar.unpack_from(self.buf, start)[0]
            return parsed
        if value_type is GGUFValueType.STRING:
            length = self._u64(f"length of metadata key '{key}'")
            return _StringRef(self._take(length, f"value of metadata key '{key}'"), length)
        return self._array(key, depth)

    def _array(self, key: str, depth: int) -> MetadataValue:
        if depth >= MAX_ARRAY_DEPTH:
            raise ModelUnusable(f"metadata key '{key}' nests arrays too deeply")
        what = f"array of metadata key '{key}'"
        raw_item_type = self._u32(what)
        count = self._u64(what)
        try:
            item_type = GGUFValueType(raw_item_type)
        except ValueError:
            raise ModelUnusable(
                f"metadata key '{key}' is an array of unknown type {raw_item_type}"
            ) from None
        scalar = _SCALAR_FORMATS.get(item_type)
        if scalar is not None:
            self._take(count * scalar.size, what)  # skipped in one step, whatever its length
            return None
        min_item_bytes = 8 if item_type is GGUFValueType.STRING else 12
        if count * min_item_bytes > self.size - self.pos:
            raise ModelUnusable(f"truncated GGUF file: {what} runs past the end of the file")
        self._spend(count)
        start = self.pos
        if item_type is GGUFValueType.STRING:
            self._skip_strings(count, what)
            return _StringArrayRef(start, count)
        for _ in range(count):
            self._array(key, depth + 1)
        return None

    def _skip_strings(self, count: int, what: str) -> None:
        # The hot loop of the whole parse (one pass over the vocabulary): kept to bare locals.
        buf, size, pos = self.buf, self.size, self.pos
        from_bytes = int.from_bytes
        for _ in range(count):
            end = pos + 8
            if end > size:
                break
            pos = end + from_bytes(buf[pos:end], "little")
        else:
            if pos <= size:
                self.pos = pos
                return
        raise ModelUnusable(f"truncated GGUF file: {what} runs past the end of the file")

    def _string_at(self, ref: _StringArrayRef, index: int) -> str | None:
        """Element ``index`` of a string array (already validated by ``_skip_strings``)."""
        if not 0 <= index < ref.count:
            return None
        pos = ref.start
        for _ in range(index):
            pos += 8 + int.from_bytes(self.buf[pos : pos + 8], "little")
        length = int.from_bytes(self.buf[pos : pos + 8], "little")
        return self.buf[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace")

    def _read_metadata(self, kv_count: int) -> None:
        for index in range(kv_count):
            key = self._string(f"metadata key #{index}", MAX_KEY_BYTES)
            if key in self.values:
                raise ModelUnusable(f"duplicate metadata key '{key}'")
            raw_type = self._u32(f"type of metadata key '{key}'")
            self.values[key] = self._value(raw_type, key, depth=0)

    # --- tensors -----------------------------------------------------------------------------

    def _read_tensor_infos(self, tensor_count: int) -> tuple[int, list[tuple[str, int, int]]]:
        """Returns the parameter count and, per tensor, (name, data offset, data bytes or -1)."""
        parameters = 0
        spans: list[tuple[str, int, int]] = []
        for index in range(tensor_count):
            name = self._string(f"name of tensor #{index}", MAX_TENSOR_NAME_BYTES)
            n_dims = self._u32(f"dimensions of tensor '{name}'")
            if not 1 <= n_dims <= MAX_TENSOR_DIMS:
                raise ModelUnusable(f"tensor '{name}' has {n_dims} dimensions (1 to 4 allowed)")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= self._u64(f"shape of tensor '{name}'")
            if n_elements >= 1 << 62:
                raise ModelUnusable(f"tensor '{name}' has an impossible shape")
            raw_type = self._u32(f"type of tensor '{name}'")
            offset = self._u64(f"offset of tensor '{name}'")
            parameters += n_elements
            spans.append((name, offset, _tensor_bytes(raw_type, n_elements)))
        return parameters, spans

    def _check_tensor_data(self, spans: list[tuple[str, int, int]]) -> None:
        alignment = self.integer("general.alignment") or DEFAULT_ALIGNMENT
        if alignment & (alignment - 1):
            raise ModelUnusable(f"general.alignment {alignment} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment
        for name, offset, n_bytes in spans:
            # A download that stopped early parses fine up to here; this is where it shows.
            if n_bytes >= 0 and data_start + offset + n_bytes > self.size:
                raise ModelUnusable(
                    f"truncated GGUF file: data of tensor '{name}' ends past the end of the file"
                    f" ({human_size(self.size)})"
                )

    # --- all of it ---------------------------------------------------------------------------

    def parse(
        self,
        path: Path,
        version: int,
        tensor_count: int,
        kv_count: int,
        continuation_shard: bool = False,
    ) -> GGUFInfo:
        self._read_metadata(kv_count)
        parameters, spans = self._read_tensor_infos(tensor_count)
        self._check_tensor_data(spans)

        architecture = self.text(self.values.get("general.architecture"))
        # gguf-split writes the model's metadata into the first shard only; later shards carry
        # split.* keys and tensors, which is all there is to check in them.
        if continuation_shard:
            architecture = architecture or ""
        else:
            self._check_is_a_model(architecture, tensor_count)
            assert architecture is not None
            check_hyperparameters(architecture, self.integer)
        assert architecture is not None
        file_type = self.integer("general.file_type")
        tokens = self.values.get(_TOKENS_KEY)
        bos_token = eos_token = None
        if isinstance(tokens, _StringArrayRef):
            bos_id = self.integer("tokenizer.ggml.bos_token_id")
            eos_id = self.integer("tokenizer.ggml.eos_token_id")
            bos_token = None if bos_id is None else self._string_at(tokens, bos_id)
            eos_token = None if eos_id is None else self._string_at(tokens, eos_id)
        context_length = self.integer(f"{architecture}.context_length")
        return GGUFInfo(
            path=path,
            file_size=self.size,
            version=version,
            tensor_count=tensor_count,
            kv_count=kv_count,
            architecture=architecture,
            name=self.text(self.values.get("general.name")),
            size_label=self.text(self.values.get("general.size_label")),
            parameter_count=parameters,
            file_type=file_type,
            quantization=quantization_name(file_type),
            context_length=context_length,
            chat_template=self.text(self.values.get("tokenizer.chat_template")),
            bos_token=bos_token,
            eos_token=eos_token,
            split_count=self.integer("split.count"),
            split_index=self.integer("split.no"),
            kv_bytes_per_token=self._kv_bytes_per_token(architecture),
        )

    def _check_is_a_model(self, architecture: str | None, tensor_count: int) -> None:
        """Refuse well-formed GGUF files that llama.cpp still cannot serve as a model."""
        if not architecture:
            raise ModelUnusable("GGUF file has no general.architecture, so it is not a model")
        if self.text(self.values.get("general.type")) == "adapter":
            raise ModelUnusable("this is a LoRA adapter, not a model")
        if tensor_count == 0:
            raise ModelUnusable("GGUF file has no tensors (a vocabulary-only file?)")

    def _kv_bytes_per_token(self, arch: str) -> int | None:
        """Estimate of the KV cache a token costs (F16 K and V in every layer), for memory
        planning before a model is loaded."""
        layers = self.integer(f"{arch}.block_count")
        embd = self.integer(f"{arch}.embedding_length")
        heads = self.integer(f"{arch}.attention.head_count")
        if not layers or not embd or not heads:
            return None
        heads_kv = self.integer(f"{arch}.attention.head_count_kv") or heads
        key_len = self.integer(f"{arch}.attention.key_length") or embd // heads
        value_len = self.integer(f"{arch}.attention.value_length") or embd // heads
        return layers * heads_kv * (key_len + value_len) * 2


def _tensor_bytes(raw_type: int, n_elements: int) -> int:
    """Bytes of a tensor's data, or -1 for a type this gguf package does not know yet (newer
    llama.cpp builds may; they get the final say when loading)."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        return -1
    return n_elements // block_size * type_size

"""A safetensors file read without torch: its header (names, dtypes, shapes, offsets) and the LoRA
tensors' values in bounded chunks (NaN/Inf, an all-zero tensor). Standard library only, Python 3.9+."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Dict, List, Mapping, Tuple

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_report import (
    AdapterCheckError,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_shapes import (
    parse_tensor_name,
)

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; ``start``/``end`` are absolute file offsets."""

    dtype: str
    shape: List[int]
    start: int
    end: int


def read_safetensors_index(path: str) -> Dict[str, TensorEntry]:
    """{tensor name: entry} from a safetensors file's header; the data is not read.

    The format: 8-byte little-endian header length, a JSON header, then the
    tensor bytes, which must exactly fill the rest of the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterCheckError(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise AdapterCheckError(f"header length {length} does not fit the file size {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterCheckError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterCheckError("header is not a JSON object")
    entries: Dict[str, TensorEntry] = {}
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise AdapterCheckError(f"header entry {key!r} has no valid shape/data_offsets")
        entries[key] = TensorEntry(dtype=str(info.get("dtype")), shape=shape,
                                   start=8 + length + offsets[0], end=8 + length + offsets[1])
        data_end = max(data_end, offsets[1])
    if 8 + length + data_end != size:
        raise AdapterCheckError(f"tensor data ends at byte {8 + length + data_end} but the file has "
                                f"{size} bytes (truncated or corrupt copy)")
    return entries


def read_safetensors_header(path: str) -> Dict[str, List[int]]:
    """{tensor name: shape} from a safetensors file's header; the data is not read."""
    return {name: entry.shape for name, entry in read_safetensors_index(path).items()}


# Stdlib only and no per-element loop: a little-endian IEEE float is cut into
# byte planes (data[i::size]); bytes.translate with 256-byte tables marks the
# bytes whose exponent/mantissa bits are set, int.from_bytes(...) & combines
# the planes. vLLM 0.11.0 loads NaN/Inf and all-zero lora_B without a word.
@dataclass(frozen=True)
class FloatLayout:
    """Where a dtype's exponent and mantissa bits are, as (byte index, mask) per element."""

    size: int
    exponent: Tuple[Tuple[int, int], ...]
    """All these bits set: Inf or NaN. The first is in the sign byte (index size - 1)."""
    mantissa: Tuple[Tuple[int, int], ...]
    """Any of these bits set, with the exponent all ones: NaN."""


FLOAT_LAYOUTS: Dict[str, FloatLayout] = {
    "F16": FloatLayout(2, ((1, 0x7C),), ((1, 0x03), (0, 0xFF))),
    "BF16": FloatLayout(2, ((1, 0x7F), (0, 0x80)), ((0, 0x7F),)),
    "F32": FloatLayout(4, ((3, 0x7F), (2, 0x80)), ((2, 0x7F), (1, 0xFF), (0, 0xFF))),
    "F64": FloatLayout(8, ((7, 0x7F), (6, 0xF0)), ((6, 0x0F),) + tuple((i, 0xFF) for i in range(6))),
}
"""safetensors dtypes whose values are checked; others are skipped with a warning."""


DATA_CHUNK_BYTES = 16 * 1024 * 1024
"""Tensor bytes read at once: bounds the memory of a value check (a few times this)."""


def _table(mask: int, all_bits: bool) -> bytes:
    """256-byte translate table: 1 where a byte has all (or any) of ``mask``'s bits, else 0."""
    return bytes(int((b & mask) == mask if all_bits else bool(b & mask)) for b in range(256))


def _not_all_bits(mask: int) -> bytes:
    """The bytes without all of ``mask``'s bits: deleted, the candidates for Inf/NaN remain."""
    return bytes(b for b in range(256) if (b & mask) != mask)


_TABLES: Dict[Tuple[int, bool], bytes] = {}


def _marks(plane: bytes, mask: int, all_bits: bool) -> int:
    """One bit per element (at bit 8k), set where the plane's byte has the mask's bits."""
    key = (mask, all_bits)
    if key not in _TABLES:
        _TABLES[key] = _table(mask, all_bits)
    return int.from_bytes(plane.translate(_TABLES[key]), "little")


def _count_marks(marks: int, elements: int) -> int:
    return marks.to_bytes(elements, "little").count(1)


def count_non_finite(chunk: bytes, layout: FloatLayout) -> Tuple[int, int]:
    """(NaN, Inf) counts in whole elements of ``layout``."""
    size = layout.size
    elements = len(chunk) // size
    sign_byte, sign_mask = layout.exponent[0]
    if not chunk[sign_byte::size].translate(None, _not_all_bits(sign_mask)):
        return 0, 0  # the usual case: no exponent can be all ones
    exponent = -1
    for index, mask in layout.exponent:
        exponent &= _marks(chunk[index::size], mask, True)
    if not exponent:
        return 0, 0
    mantissa = 0
    for index, mask in layout.mantissa:
        mantissa |= _marks(chunk[index::size], mask, False)
    nan = _count_marks(exponent & mantissa, elements)
    return nan, _count_marks(exponent, elements) - nan


def has_non_zero(chunk: bytes, layout: FloatLayout) -> bool:
    """Whether any element is neither +0.0 nor -0.0 (only the sign bit set)."""
    zeros = chunk.count(0)
    if zeros == len(chunk):
        return False
    sign_bytes = chunk[layout.size - 1::layout.size]
    return zeros + sign_bytes.count(0x80) != len(chunk)


@dataclass
class TensorValues:
    """What :func:`scan_tensor` found in one tensor's data."""

    elements: int
    nan: int = 0
    inf: int = 0
    non_zero: bool = False


def scan_tensor(handle: BinaryIO, name: str, entry: TensorEntry, layout: FloatLayout,
                chunk_bytes: int = DATA_CHUNK_BYTES) -> TensorValues:
    """Read one tensor's data in chunks of whole elements (at most ``chunk_bytes``)."""
    elements = 1
    for dim in entry.shape:
        elements *= dim
    if entry.end - entry.start != elements * layout.size:
        raise AdapterCheckError(f"tensor {name}: {entry.end - entry.start} bytes of data, but shape "
                                f"{entry.shape} of {entry.dtype} needs {elements * layout.size}")
    step = max(layout.size, chunk_bytes - chunk_bytes % layout.size)
    values = TensorValues(elements=elements)
    handle.seek(entry.start)
    left = entry.end - entry.start
    while left:
        chunk = handle.read(min(step, left))
        if not chunk or len(chunk) % layout.size:
            raise AdapterCheckError(f"tensor {name}: the file ended inside its data")
        left -= len(chunk)
        nan, inf = count_non_finite(chunk, layout)
        values.nan += nan
        values.inf += inf
        values.non_zero = values.non_zero or has_non_zero(chunk, layout)
    return values


def scan_lora_tensors(path: str, entries: Mapping[str, TensorEntry],
                      chunk_bytes: int = DATA_CHUNK_BYTES) -> Tuple[Dict[str, TensorValues], Dict[str, str]]:
    """({lora_A/lora_B tensor: values}, {tensor of a dtype that is not read: dtype}), in file order."""
    scanned: Dict[str, TensorValues] = {}
    skipped: Dict[str, str] = {}
    lora = sorted((entry.start, name) for name, entry in entries.items()
                  if parse_tensor_name(name)[1] in ("lora_A", "lora_B"))
    with open(path, "rb") as handle:
        for _start, name in lora:
            layout = FLOAT_LAYOUTS.get(entries[name].dtype)
            if layout is None:
                skipped[name] = entries[name].dtype
            else:
                scanned[name] = scan_tensor(handle, name, entries[name], layout, chunk_bytes)
    return scanned, skipped

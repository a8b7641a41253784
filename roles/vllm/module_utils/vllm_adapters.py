"""Static checks of PEFT LoRA adapters against a base model and vLLM 0.11.0's rules.

Reads ``adapter_config.json``, ``adapter_model.safetensors`` (its header, then the
LoRA tensors' values in bounded chunks, for NaN/Inf and an all-zero lora_B) and
the base model's ``config.json``, so it is fast and safe on the controller
before anything on a host changes. A pickled ``adapter_model.bin``/``.pt`` is
never unpickled. Standard library only, Python 3.9+: this runs on the
controller and on the target hosts.

Every problem is one line that names the adapter, the field, its value, why it
is wrong and the fix. Errors are what vLLM 0.11.0 refuses (at start-up, at a
run-time load, or at the first request) or what would make it serve wrong
output without an error; warnings are worth a look but do not block.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar, Union

from ansible.module_utils.vllm_files import sha256_file

ALLOWED_MAX_LORA_RANKS: Tuple[int, ...] = (8, 16, 32, 64, 128, 256, 320, 512)
"""``LoRAConfig.__post_init__`` in vllm/config/lora.py (0.11.0)."""

VLLM_DEFAULT_MAX_LORA_RANK = 16

QWEN2_LORA_MODULES: Tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""vLLM 0.11.0 Qwen2ForCausalLM: its linear layers (qkv_proj, o_proj, gate_up_proj,
down_proj) with the packed ones expanded by ``packed_modules_mapping``. No
embedding modules: ``embed_tokens``/``lm_head`` adapters are refused."""

SUPPORTED_LORA_MODULES: Dict[str, Tuple[str, ...]] = {
    "Qwen2ForCausalLM": QWEN2_LORA_MODULES,
}
"""Modules vLLM 0.11.0 accepts in an adapter, by the base model's architecture."""

REQUIRED_FIELDS: Tuple[str, ...] = ("r", "lora_alpha", "target_modules")
"""``PEFTHelper``'s fields without defaults (vllm/lora/peft_helper.py)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Adapter names: safe as a path component, in a URL and on a command line.
Used with fullmatch: `$` with match would also accept a trailing newline."""

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES: Tuple[str, ...] = ("adapter_model.bin", "adapter_model.pt")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_SHOWN = 120  # characters of a value quoted in a message

_QUANT_SUFFIX = re.compile(
    r"(?:[-_.](?:awq|gptq(?:[-_]?int[348])?|int[348]|bnb[-_]?[48]bit|[48]bit|fp8|w8a8|w4a16))+$")
_HF_CACHE_DIR = re.compile(r"(?:^|/)models--[^/]*?--([^/]+)(?:/|$)")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AdapterCheckError(Exception):
    """A file could not be read as what it should be."""


# --- messages ---------------------------------------------------------------
def show(value: Any) -> str:
    """A value as it looks in the JSON file, shortened."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def problem(name: str, where: str, value: str, why: str, fix: str) -> str:
    """``adapter 'x': <where> = <value>: <why>. Fix: <fix>.``"""
    return f"adapter {name!r}: {where} = {value}: {why}. Fix: {fix}."


def setting_problem(setting: str, value: Any, why: str, fix: str) -> str:
    return f"vLLM setting {setting} = {show(value)}: {why}. Fix: {fix}."


# --- the base model ---------------------------------------------------------
@dataclass(frozen=True)
class BaseModel:
    """What an adapter's tensor shapes depend on (from the base's config.json)."""

    architecture: Optional[str]
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: Optional[int]

    def module_dims(self) -> Dict[str, Tuple[int, int]]:
        """(in_features, out_features) of every linear layer LoRA can target."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    def dim_reasons(self) -> Dict[str, Tuple[str, str]]:
        """How each (in, out) of :meth:`module_dims` follows from config.json."""
        hidden = f"hidden_size {self.hidden_size}"
        inter = f"intermediate_size {self.intermediate_size}"
        q_out = f"num_attention_heads {self.num_attention_heads} * head_dim {self.head_dim}"
        kv_out = f"num_key_value_heads {self.num_key_value_heads} * head_dim {self.head_dim}"
        return {
            "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterCheckError(f"base model config.json: {key} = {show(value)} is not a positive integer")
    return value


def base_model_from_config(config: Mapping[str, Any]) -> BaseModel:
    """A :class:`BaseModel` from a parsed config.json (``text_config`` of multimodal ones)."""
    if not isinstance(config, Mapping):
        raise AdapterCheckError("base model config.json is not a JSON object")
    architectures = config.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    text = config
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        text = config["text_config"]
    hidden = _positive_int(text, "hidden_size")
    heads = _positive_int(text, "num_attention_heads")
    kv_heads = _positive_int(text, "num_key_value_heads") if text.get("num_key_value_heads") is not None else heads
    if text.get("head_dim") is not None:
        head_dim = _positive_int(text, "head_dim")
    elif hidden % heads:
        raise AdapterCheckError(f"base model config.json: hidden_size {hidden} is not a multiple of "
                                f"num_attention_heads {heads} and there is no head_dim")
    else:
        head_dim = hidden // heads
    layers = text.get("num_hidden_layers")
    return BaseModel(
        architecture=architecture if isinstance(architecture, str) else None,
        hidden_size=hidden,
        intermediate_size=_positive_int(text, "intermediate_size"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers if isinstance(layers, int) and not isinstance(layers, bool) else None,
    )


def load_base_model(source: Union[str, Mapping[str, Any]]) -> BaseModel:
    """From a config.json path, a model directory holding one, or a parsed dict."""
    if isinstance(source, Mapping):
        return base_model_from_config(source)
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError as exc:
        raise AdapterCheckError(f"base model config {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise AdapterCheckError(f"base model config {path}: not JSON ({exc})") from exc
    return base_model_from_config(config)


# --- reading adapter files --------------------------------------------------
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


# --- reading tensor values --------------------------------------------------
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
        for _, name in lora:
            layout = FLOAT_LAYOUTS.get(entries[name].dtype)
            if layout is None:
                skipped[name] = entries[name].dtype
            else:
                scanned[name] = scan_tensor(handle, name, entries[name], layout, chunk_bytes)
    return scanned, skipped


def parse_tensor_name(name: str) -> Tuple[str, Optional[str]]:
    """(module path, kind) as vLLM's ``parse_fine_tuned_lora_name`` reads a tensor name.

    kind: ``lora_A``/``lora_B`` (``...lora_A.weight``), ``lora_embedding_A``/``_B``,
    ``bias`` (``...<module>.<x>.bias``), or None when vLLM refuses the name
    ("... is unsupported LoRA weight").
    """
    parts = name.split(".")
    start = 2 if name.startswith("base_model.model.") else 0
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1]
    if parts[-1] == "bias":
        return ".".join(parts[start:-2]), "bias"
    return ".".join(parts[start:]), None


def normalise_model_name(name: str) -> str:
    """Compare model names by repository/directory basename, case-insensitively.

    ``Qwen/Qwen2.5-7B-Instruct``, ``/srv/models/qwen2.5-7b-instruct/`` and a hub
    cache path ``.../models--Qwen--Qwen2.5-7B-Instruct/snapshots/<sha>`` are
    the same; so are quantised variants (``-AWQ``, ``-GPTQ-Int4``, ``-bnb-4bit``,
    ...) of one model, because an adapter trained on the full-precision model
    is meant for its quantised copies too.
    """
    text = name.strip().replace("\\", "/")
    cached = _HF_CACHE_DIR.search(text)
    base = cached.group(1) if cached else text.rstrip("/").split("/")[-1]
    return _QUANT_SUFFIX.sub("", base.lower())


# --- one adapter ------------------------------------------------------------
@dataclass
class AdapterReport:
    name: str
    path: str
    rank: Optional[int] = None
    """Largest rank seen: ``r``, ``rank_pattern`` values and the lora_A/lora_B shapes."""
    weights: Optional[str] = None
    """``safetensors``, ``bin``/``pt`` (not checkable: refused unless allowed) or None (missing)."""
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def smallest_rank_that_fits(rank: int) -> Optional[int]:
    return next((allowed for allowed in ALLOWED_MAX_LORA_RANKS if allowed >= rank), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _target_parts(targets: Any) -> Tuple[Optional[List[str]], Optional[str]]:
    """(module names, None) from target_modules, or (None, why not)."""
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return [t.split(".")[-1] for t in targets], None
    if isinstance(targets, str):
        # vLLM's is_regex_target_modules: the alternatives of a trailing "(a|b)$" group.
        try:
            re.compile(targets)
        except re.error:
            return None, "a string that is not a valid regular expression"
        match = re.search(r"\((.*?)\)\$?$", targets)
        if match:
            return match.group(1).split("|"), None
        return None, "a regular expression without a trailing (a|b|...) group"
    return None, "neither a list of module names nor a regular expression"


def _check_config(report: AdapterReport, config: Mapping[str, Any], supported: Optional[Sequence[str]],
                  weights: Optional[str]) -> Tuple[List[int], Set[str]]:
    """Config-level rules; returns (ranks declared, module parts already reported)."""
    name, where = report.name, CONFIG_FILE
    ranks: List[int] = []
    reported: Set[str] = set()
    missing = [key for key in REQUIRED_FIELDS if key not in config]
    if missing:
        report.problems.append(problem(
            name, f"{where} {', '.join(missing)}", "(missing)",
            f"vLLM refuses it: \"Missing required configuration fields: {set(missing)}\"",
            f"add {', '.join(missing)} to {where} as the adapter was trained "
            "(PEFT writes them; a hand-made or converted config lost them)"))

    peft_type = config.get("peft_type")
    if peft_type is None:
        report.warnings.append(problem(
            name, f"{where} peft_type", "(missing)", "cannot tell whether this is a LoRA adapter",
            "write peft_type \"LORA\" if it is one"))
    elif not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        report.problems.append(problem(
            name, f"{where} peft_type", show(peft_type),
            "vLLM serves only LoRA adapters (its loader would fail on the tensor names)",
            "use a LoRA adapter (peft_type \"LORA\") or merge this one into the base model"))

    if "r" in config:
        r = config["r"]
        if not _is_int(r) or r < 1:
            report.problems.append(problem(name, f"{where} r", show(r), "the LoRA rank must be a positive integer",
                                           "set r to the rank the adapter was trained with"))
        else:
            ranks.append(r)
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        report.problems.append(problem(name, f"{where} lora_alpha", show(config["lora_alpha"]),
                                       "lora_alpha must be a number",
                                       "set lora_alpha to the value the adapter was trained with"))

    if config.get("use_dora"):
        report.problems.append(problem(
            name, f"{where} use_dora", show(config["use_dora"]),
            "vLLM 0.11.0 does not support DoRA (\"vLLM does not yet support DoRA.\")",
            "retrain as plain LoRA (use_dora false) or merge the adapter into the base model"))
    if config.get("modules_to_save"):
        report.problems.append(problem(
            name, f"{where} modules_to_save", show(config["modules_to_save"]),
            "vLLM 0.11.0 refuses fully trained extra modules "
            "(\"vLLM only supports modules_to_save being None.\")",
            "retrain with modules_to_save null (train only LoRA layers), or merge the adapter "
            "into the base model and serve that"))
    bias = config.get("bias", "none")
    if bias != "none":
        report.problems.append(problem(
            name, f"{where} bias", show(bias),
            "vLLM 0.11.0 refuses adapter biases (\"Adapter bias cannot be used without "
            "bias_enabled.\"; --enable-lora-bias is deprecated)",
            "retrain with bias \"none\""))
    if config.get("lora_bias"):
        report.problems.append(problem(
            name, f"{where} lora_bias", show(config["lora_bias"]),
            "vLLM 0.11.0 refuses LoRA bias tensors without the deprecated --enable-lora-bias",
            "retrain with lora_bias false"))

    # rank_pattern / alpha_pattern: vLLM ignores both and scales every module by
    # lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
    patterns: Dict[str, Mapping[str, Any]] = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        valid = isinstance(value, Mapping) and all(
            (_is_int(v) and v >= 1) if key == "rank_pattern" else _is_number(v) for v in value.values())
        if not valid:
            report.problems.append(problem(name, f"{where} {key}", show(value),
                                           "must map module names or patterns to "
                                           + ("positive integers" if key == "rank_pattern" else "numbers"),
                                           f"fix or remove {key}"))
        patterns[key] = value if valid else {}
    rank_pattern, alpha_pattern = patterns["rank_pattern"], patterns["alpha_pattern"]
    ranks.extend(rank_pattern.values())
    r, alpha = config.get("r"), config.get("lora_alpha")
    if (rank_pattern or alpha_pattern) and isinstance(r, int) and _is_int(r) and r >= 1 \
            and isinstance(alpha, (int, float)) and _is_number(alpha):
        rslora = bool(config.get("use_rslora"))

        def scaling(rank: int, lora_alpha: float) -> float:
            return lora_alpha / (math.sqrt(rank) if rslora else rank)

        served = scaling(r, alpha)
        differ = sorted(key for key in set(rank_pattern) | set(alpha_pattern)
                        if not math.isclose(scaling(rank_pattern.get(key, r), alpha_pattern.get(key, alpha)),
                                            served, rel_tol=1e-9))
        if differ:
            report.problems.append(problem(
                name, f"{where} rank_pattern/alpha_pattern",
                show({"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}),
                f"vLLM 0.11.0 ignores both and scales every module by "
                f"lora_alpha/{'sqrt(r)' if rslora else 'r'} = {served:g}, so "
                f"{', '.join(differ)} would be served with a different scaling than trained "
                "(wrong output, no error)",
                "retrain with one r and lora_alpha for all modules, or merge the adapter into the base model"))

    targets = config.get("target_modules")
    if "target_modules" in config:
        parts, why_not = _target_parts(targets)
        if parts is None:
            pickled = weights in ("bin", "pt")
            text = (f"target_modules is {why_not}: vLLM 0.11.0 cannot check it for a "
                    ".bin/.pt adapter and refuses it" if pickled else
                    f"target_modules is {why_not}: vLLM 0.11.0 checks the tensor names instead")
            fix = "write target_modules as a list of module names"
            if not pickled:
                report.warnings.append(problem(name, f"{where} target_modules", show(targets), text, fix))
            else:
                report.problems.append(problem(name, f"{where} target_modules", show(targets), text, fix))
        elif not parts:
            report.problems.append(problem(name, f"{where} target_modules", show(targets),
                                           "no module is targeted", "train the adapter with target modules"))
        elif supported is not None:
            unknown = sorted(set(p for p in parts if p not in supported))
            if unknown:
                reported.update(unknown)
                report.problems.append(problem(
                    name, f"{where} target_modules", show(targets),
                    f"{', '.join(unknown)}: the base model has no LoRA support for "
                    f"{'this module' if len(unknown) == 1 else 'these modules'} in vLLM 0.11.0 "
                    f"(supported: {', '.join(supported)})",
                    f"retrain targeting only {', '.join(supported)}"))
    return ranks, reported


K = TypeVar("K")


def _group(items: Iterable[Tuple[K, str]]) -> Dict[K, List[str]]:
    groups: Dict[K, List[str]] = {}
    for key, tensor in items:
        groups.setdefault(key, []).append(tensor)
    return groups


def _examples(items: List[str], noun: str = "tensor") -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}, e.g. {items[0]}"


def _check_tensors(report: AdapterReport, shapes: Mapping[str, List[int]], config: Mapping[str, Any],
                   base: Optional[BaseModel], supported: Optional[Sequence[str]],
                   reported: Set[str]) -> List[int]:
    """Tensor-name and shape rules; returns the ranks seen in the shapes."""
    name, where = report.name, SAFETENSORS_FILE
    ranks: List[int] = []
    unsupported: List[str] = []
    biases: List[str] = []
    modules: Dict[str, Dict[str, List[int]]] = {}
    for tensor in sorted(shapes):
        module, kind = parse_tensor_name(tensor)
        if kind is None:
            # Already explained by the config: DoRA magnitudes, modules_to_save copies.
            if (config.get("use_dora") and "lora_magnitude_vector" in tensor) or (
                    config.get("modules_to_save") and ".modules_to_save." in tensor):
                continue
            unsupported.append(tensor)
        elif kind == "bias":
            biases.append(tensor)
        else:
            modules.setdefault(module, {})[kind] = shapes[tensor]
    if unsupported:
        report.problems.append(problem(
            name, f"{where} tensor names", _examples(unsupported),
            "not LoRA weights (vLLM: \"... is unsupported LoRA weight\")",
            "save the adapter with PEFT (tensors named <module>.lora_A.weight / lora_B.weight) "
            "and nothing else in the file"))
    if biases and config.get("bias", "none") == "none" and not config.get("lora_bias"):
        report.problems.append(problem(
            name, f"{where} bias tensors", _examples(biases),
            "vLLM 0.11.0 refuses adapter biases without the deprecated --enable-lora-bias",
            "retrain with bias \"none\" and lora_bias false"))

    by_part = _group((module.split(".")[-1], module) for module in modules)
    if supported is not None:
        unknown = sorted(part for part in by_part if part not in supported and part not in reported)
        for part in unknown:
            report.problems.append(problem(
                name, f"{where} {part} tensors", _examples(by_part[part], "module"),
                f"the base model has no LoRA support for {part} in vLLM 0.11.0 (vLLM: \"expected target "
                f"modules in [...] but received [...]\"; supported: {', '.join(supported)})",
                f"retrain targeting only {', '.join(supported)}"))

    dims = base.module_dims() if base else {}
    reasons = base.dim_reasons() if base else {}
    mismatches: List[Tuple[Tuple[Any, ...], str]] = []
    structural: List[Tuple[Tuple[Any, ...], str]] = []
    layers_beyond: List[str] = []
    for module in sorted(modules):
        part = module.split(".")[-1]
        pair = modules[module]
        if "lora_embedding_A" in pair or "lora_embedding_B" in pair:
            continue  # embedding LoRA: refused above as an unsupported module
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            structural.append(((part, "lora_A" if a is None else "lora_B", "missing"), module))
            continue
        if len(a) != 2 or len(b) != 2:
            structural.append(((part, "shape", f"lora_A {a}, lora_B {b} are not 2-D"), module))
            continue
        if a[0] != b[1]:
            structural.append(((part, "rank", f"lora_A {a} has rank {a[0]} but lora_B {b} rank {b[1]}"), module))
        ranks.extend((a[0], b[1]))
        layer = _LAYER.search(module + ".")
        if base and base.num_hidden_layers is not None and layer and int(layer.group(1)) >= base.num_hidden_layers:
            layers_beyond.append(module)
        if part in dims:
            fan_in, fan_out = dims[part]
            if a[1] != fan_in:
                mismatches.append(((part, "lora_A", f"[{a[0]}, {a[1]}]", f"[r, {fan_in}]", reasons[part][0],
                                    a[1] > fan_in), module))
            if b[0] != fan_out:
                mismatches.append(((part, "lora_B", f"[{b[0]}, {b[1]}]", f"[{fan_out}, r]", reasons[part][1],
                                    b[0] > fan_out), module))
    for (part, what, detail), group in _group(structural).items():
        report.problems.append(problem(
            name, f"{where} {part} {what}", _examples(group, "module"),
            f"{what} missing: every LoRA module needs lora_A [r, in] and lora_B [out, r]"
            if detail == "missing" else detail,
            "re-save the adapter with PEFT; the file is incomplete or not a LoRA adapter"))
    for (part, which, got, want, reason, larger), group in _group(mismatches).items():
        effect = ("vLLM fails when it activates it: \"The size of tensor a ... must match the size of tensor b\""
                  if larger else "vLLM zero-pads it without an error and serves wrong output")
        report.problems.append(problem(
            name, f"{where} {part} {which} shape", f"{got} ({_examples(group, 'module')})",
            f"the base model needs {want} ({reason}), so the adapter was trained for another base model; {effect}",
            "use an adapter trained on this base model"))
    if layers_beyond:
        report.problems.append(problem(
            name, f"{where} layer indices", _examples(layers_beyond, "module"),
            f"the base model has only num_hidden_layers {base.num_hidden_layers if base else '?'}: "
            "the adapter was trained for another base model (vLLM would silently skip these layers)",
            "use an adapter trained on this base model"))
    return ranks


def _check_checksums(report: AdapterReport, path: str, manifest: Any) -> None:
    if not isinstance(manifest, Mapping):
        report.problems.append(problem(report.name, "checksums", show(manifest), "not a manifest",
                                       "give {relative path: sha256} for the adapter's files"))
        return
    for rel in sorted(manifest, key=str):
        entry = manifest[rel]
        want = entry.get("sha256") if isinstance(entry, Mapping) else entry
        norm = os.path.normpath(rel) if isinstance(rel, str) else ""
        if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            report.problems.append(problem(report.name, "checksums path", show(rel),
                                           "not a path inside the adapter directory",
                                           "use paths relative to the adapter directory"))
            continue
        if not isinstance(want, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", want):
            report.problems.append(problem(report.name, f"checksums {rel}", show(entry),
                                           "not a sha256 hex digest", "give the file's sha256 (64 hex digits)"))
            continue
        target = os.path.join(path, norm)
        if not os.path.isfile(target):
            report.problems.append(problem(report.name, f"file {rel}", "(missing)",
                                           "listed in the checksum manifest but not in the adapter directory",
                                           "copy the complete adapter again"))
            continue
        got = sha256_file(target)
        if got != want.lower():
            report.problems.append(problem(
                report.name, f"file {rel} sha256", got,
                f"the checksum manifest expects {want.lower()} (changed, truncated or corrupt copy)",
                "copy the adapter again from its source, or update the manifest if the change is intended"))


def _check_pickle(report: AdapterReport, pickled: str, allow_pickle: bool) -> None:
    """A .bin/.pt without safetensors: vLLM torch.load()s it; only safetensors can be checked."""
    convert = (f"python -c \"import torch; from safetensors.torch import save_file; "
               f"save_file({{k: v.contiguous() for k, v in torch.load('{pickled}', weights_only=True).items()}}, "
               f"'{SAFETENSORS_FILE}')\" in the adapter directory (or PEFT's "
               "save_pretrained(..., safe_serialization=True))")
    if allow_pickle:
        report.warnings.append(problem(
            report.name, pickled, "(present, no safetensors, allow_pickle true)",
            "accepted without checking its tensors (a pickle cannot be read without unpickling it): shapes, "
            "NaN/Inf and all-zero lora_B are not checked, and vLLM 0.11.0 stops at start-up if it is not a "
            "torch archive", f"convert it to safetensors: {convert}"))
        return
    report.problems.append(problem(
        report.name, pickled, "(present, no safetensors)",
        "a pickle: its tensors cannot be checked without unpickling it, and vLLM 0.11.0 reads it with "
        "torch.load(weights_only=True), so a file that is not a torch archive stops start-up",
        f"convert it to safetensors: {convert}; or, only if you trust the file, set allow_pickle: true "
        "on this adapter in vllm_lora_adapters"))


def _bad_values(nan: int, inf: int) -> str:
    return " and ".join(f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "Inf")) if count)


def _check_values(report: AdapterReport, scanned: Mapping[str, TensorValues], skipped: Mapping[str, str]) -> None:
    """NaN/Inf in any LoRA tensor; every lora_B all zeros (an untrained adapter)."""
    name, where = report.name, SAFETENSORS_FILE
    bad = [(tensor, v) for tensor, v in scanned.items() if v.nan or v.inf]
    if bad:
        tensor, first = bad[0]
        more = "" if len(bad) == 1 else (
            f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}: "
            f"{_bad_values(sum(v.nan for _, v in bad), sum(v.inf for _, v in bad))} in all)")
        report.problems.append(problem(
            name, f"{where} {tensor}", f"{_bad_values(first.nan, first.inf)} of {first.elements} values{more}",
            "vLLM 0.11.0 loads NaN/Inf weights without an error and serves garbage for this adapter",
            "retrain or re-export the adapter; the file is corrupt (copy it again if only this copy is)"))
    lora_b = sorted(t for t in scanned if parse_tensor_name(t)[1] == "lora_B")
    unread_b = [t for t in skipped if parse_tensor_name(t)[1] == "lora_B"]
    if lora_b and not unread_b and not any(scanned[t].non_zero for t in lora_b):
        report.problems.append(problem(
            name, f"{where} lora_B values", f"all zero ({_examples(lora_b)})",
            "an untrained adapter (PEFT starts lora_B at zero): vLLM 0.11.0 loads it and it changes nothing, "
            "requests for it get the base model's output",
            "train the adapter, and export it after training (not its initial state)"))
    if skipped:
        report.warnings.append(problem(
            name, f"{where} tensor dtypes", show(sorted(set(skipped.values()))),
            f"the values of {_examples(sorted(skipped))} are not checked for NaN/Inf or all-zero lora_B "
            f"(only {', '.join(FLOAT_LAYOUTS)} are read)",
            "save the adapter as float16, bfloat16 or float32 to have them checked"))


def check_adapter(name: str, path: str, base: Optional[BaseModel] = None, *,
                  supported_modules: Optional[Sequence[str]] = None,
                  max_lora_rank: Optional[int] = None,
                  base_model_names: Sequence[str] = (),
                  base_model_mismatch: str = "error",
                  checksums: Optional[Mapping[str, Any]] = None,
                  allow_pickle: bool = False,
                  check_values: bool = True,
                  chunk_bytes: int = DATA_CHUNK_BYTES) -> AdapterReport:
    """Every rule for one adapter directory (not its name: see :func:`check_names`).

    ``supported_modules`` None: by ``base.architecture`` from
    :data:`SUPPORTED_LORA_MODULES` (unknown architecture: a warning, no module
    check). ``max_lora_rank`` None or 0: the rank is not compared. Empty
    ``base_model_names``: ``base_model_name_or_path`` is not compared.
    ``allow_pickle``: a .bin/.pt without safetensors is accepted (a warning).
    ``check_values`` False: the safetensors header only (for benchmarks), else
    the LoRA tensors' values too, read ``chunk_bytes`` at a time.
    """
    report = AdapterReport(name=name, path=path)
    if supported_modules is None and base is not None:
        supported_modules = SUPPORTED_LORA_MODULES.get(base.architecture or "")
        if supported_modules is None:
            report.warnings.append(problem(
                name, "base model architectures", show(base.architecture),
                "no list of LoRA-capable modules is known for this architecture, so target modules "
                "are not checked", "pass supported_modules"))
    if not os.path.isdir(path):
        report.problems.append(problem(name, "path", show(path), "no such directory",
                                       "point the adapter's path at its directory (with adapter_config.json)"))
        return report
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError as exc:
        report.problems.append(problem(name, CONFIG_FILE, "(unreadable)", f"{exc.strerror or exc}: vLLM "
                                       "cannot load an adapter without it (\"No adapter found\")",
                                       "copy the complete adapter directory"))
        config = None
    except ValueError as exc:
        report.problems.append(problem(name, CONFIG_FILE, "(not JSON)", str(exc),
                                       "copy the adapter again; the file is corrupt"))
        config = None
    if config is not None and not isinstance(config, dict):
        report.problems.append(problem(name, CONFIG_FILE, show(config), "not a JSON object",
                                       "copy the adapter again; the file is corrupt"))
        config = None

    weights: Optional[str] = None
    shapes: Optional[Dict[str, List[int]]] = None
    safetensors = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(safetensors):
        weights = "safetensors"  # vLLM prefers it to a .bin/.pt beside it
        try:
            entries = read_safetensors_index(safetensors)
            shapes = {tensor: entry.shape for tensor, entry in entries.items()}
            if check_values:
                _check_values(report, *scan_lora_tensors(safetensors, entries, chunk_bytes))
        except (OSError, AdapterCheckError) as exc:
            report.problems.append(problem(name, SAFETENSORS_FILE, "(unreadable)", str(exc),
                                           "copy the adapter again from its source"))
    else:
        pickled = next((f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))), None)
        if pickled:
            weights = pickled.rsplit(".", 1)[1]
            _check_pickle(report, pickled, allow_pickle)
        else:
            report.problems.append(problem(
                name, SAFETENSORS_FILE, "(missing)",
                f"no weights file (vLLM: \"{path} doesn't contain tensors\")",
                f"copy {SAFETENSORS_FILE} (or adapter_model.bin/.pt) into the adapter directory"))
    report.weights = weights

    ranks: List[int] = []
    reported: Set[str] = set()
    if config is not None:
        ranks, reported = _check_config(report, config, supported_modules, weights)
        _check_base_name(report, config, base_model_names, base_model_mismatch)
    if shapes is not None:
        ranks.extend(_check_tensors(report, shapes, config or {}, base, supported_modules, reported))
    if ranks:
        report.rank = max(ranks)
        if max_lora_rank:
            _check_rank(report, config or {}, max_lora_rank, ranks)
    if checksums:
        _check_checksums(report, path, checksums)
    return report


def _check_rank(report: AdapterReport, config: Mapping[str, Any], max_lora_rank: int, ranks: List[int]) -> None:
    rank = max(ranks)
    if rank <= max_lora_rank:
        return
    r = config.get("r")
    pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), Mapping) else {}
    if _is_int(r) and r == rank:
        where, value = f"{CONFIG_FILE} r", str(r)
        why = f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank} (vLLM refuses it)"
    elif pattern and rank in pattern.values():
        where, value = f"{CONFIG_FILE} rank_pattern", show(dict(pattern))
        why = (f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank} (vLLM 0.11.0 checks only r "
               "at load, then fails when it activates the adapter)")
    else:
        where, value = f"{SAFETENSORS_FILE} lora_A/lora_B rank", str(rank)
        why = (f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}"
               + ("" if _is_int(r) and r == rank else
                  f" (r says {show(r)}; vLLM 0.11.0 checks only r at load, then fails when it "
                  "activates the adapter)"))
    fits = smallest_rank_that_fits(rank)
    fix = (f"set --max-lora-rank (vllm_max_lora_rank) to {fits} or more, or retrain with r <= {max_lora_rank}"
           if fits else f"retrain with r <= {ALLOWED_MAX_LORA_RANKS[-1]} (vLLM's largest max_lora_rank)")
    report.problems.append(problem(report.name, where, value, why, fix))


def _check_base_name(report: AdapterReport, config: Mapping[str, Any], accepted: Sequence[str],
                     mismatch: str) -> None:
    if not accepted:
        return
    value = config.get("base_model_name_or_path")
    where = f"{CONFIG_FILE} base_model_name_or_path"
    if not isinstance(value, str) or not value.strip():
        report.warnings.append(problem(
            report.name, where, show(value), "the adapter does not say which base model it was trained on, "
            "so that cannot be checked", f"set it to the base model's name (one of {', '.join(accepted)})"))
        return
    if normalise_model_name(value) in {normalise_model_name(n) for n in accepted if n}:
        return
    text = problem(
        report.name, where, show(value),
        f"the adapter was trained on another base model than the one served ({', '.join(accepted)}); "
        "vLLM 0.11.0 does not check this and serves it if the shapes happen to fit, with wrong output",
        "use an adapter trained on the served base model; if it is the same model under another name, "
        "add that name to base_model_names (or set base_model_mismatch: warn)")
    (report.warnings if mismatch == "warn" else report.problems).append(text)


# --- names and engine settings ---------------------------------------------
def check_names(names: Sequence[Any], served_model_names: Sequence[str] = ()) -> List[str]:
    """Empty, unsafe, duplicated, or shadowing a served base-model name."""
    problems: List[str] = []
    seen: Dict[str, int] = {}
    served = set(served_model_names)
    for index, name in enumerate(names):
        label = f"#{index + 1}" if not isinstance(name, str) or not name else name
        if not isinstance(name, str) or not name.strip():
            problems.append(problem(label, "name", show(name), "an adapter needs a name (requests select it "
                                    "with \"model\": \"<name>\")", "give the adapter a name"))
            continue
        if not NAME_PATTERN.fullmatch(name):
            problems.append(problem(
                name, "name", show(name), f"not safe in a path or URL (must match {NAME_PATTERN.pattern})",
                "use letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 128"))
        if name in seen:
            problems.append(problem(
                name, "name", show(name), f"declared more than once (also #{seen[name] + 1}); vLLM refuses "
                f"the second (\"The lora adapter '{name}' has already been loaded.\") and does not start",
                "give every adapter its own name"))
        else:
            seen[name] = index
        if name in served:
            problems.append(problem(
                name, "name", show(name), "equals a served model name: requests for that name would get the "
                "adapter instead of the base model (vLLM looks adapters up first)",
                "rename the adapter or the served model name"))
    return problems


def check_engine(max_lora_rank: Optional[int], max_loras: Optional[int], max_cpu_loras: Optional[int],
                 adapter_count: int, ranks: Iterable[int]) -> Tuple[List[str], List[str], Optional[int]]:
    """(errors, warnings, effective max-lora-rank) for the engine settings.

    ``max_lora_rank`` 0/None: derived, the smallest allowed value that fits
    every rank (vLLM's default 16 when there are none); None when no allowed
    value fits. ``max_cpu_loras`` 0/None: unset (vLLM uses max_loras).
    """
    errors: List[str] = []
    warnings: List[str] = []
    ranks = list(ranks)
    if max_lora_rank:
        effective: Optional[int] = max_lora_rank
        if max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
            fits = smallest_rank_that_fits(max(ranks + [max_lora_rank]))
            errors.append(setting_problem(
                "--max-lora-rank (vllm_max_lora_rank)", max_lora_rank,
                f"vLLM 0.11.0 accepts only one of {', '.join(map(str, ALLOWED_MAX_LORA_RANKS))} and does not start",
                f"set it to {fits}" if fits else f"set it to {ALLOWED_MAX_LORA_RANKS[-1]}"))
    elif ranks:
        effective = smallest_rank_that_fits(max(ranks))
        if effective is None:
            errors.append(setting_problem(
                "--max-lora-rank (vllm_max_lora_rank)", max_lora_rank or 0,
                f"derived from the adapters, but rank {max(ranks)} is above vLLM's largest allowed value "
                f"{ALLOWED_MAX_LORA_RANKS[-1]}", "retrain the adapters with a smaller rank"))
    else:
        effective = VLLM_DEFAULT_MAX_LORA_RANK
    loras = 1 if max_loras is None else max_loras
    if loras < 1:
        errors.append(setting_problem("--max-loras (vllm_max_loras)", loras,
                                      "must be >= 1 (vLLM does not start)", "set it to 1 or more"))
    if max_cpu_loras and max_cpu_loras < loras:
        errors.append(setting_problem(
            "--max-cpu-loras (vllm_max_cpu_loras)", max_cpu_loras,
            f"must be >= max_loras {loras} (vLLM: \"max_cpu_loras ({max_cpu_loras}) must be >= "
            f"max_loras ({loras})\", it does not start)",
            f"set it to {loras} or more, or 0 to use vLLM's default (= max_loras)"))
    if loras >= 1 and adapter_count > loras:
        cpu = max_cpu_loras or loras
        warnings.append(setting_problem(
            "--max-loras (vllm_max_loras)", loras,
            f"{adapter_count} adapters are declared: at most {loras} can be used in one batch, requests for "
            f"others wait" + (f"; and only {cpu} stay in CPU memory (--max-cpu-loras), others are re-read "
                              "from disk when used" if adapter_count > cpu else ""),
            f"raise it to {adapter_count} if they are used at the same time (more GPU memory)"))
    return errors, warnings, effective


# --- everything -------------------------------------------------------------
def check_all(adapters: Sequence[Mapping[str, Any]],
              base_model_config: Union[str, Mapping[str, Any], None],
              *,
              base_model_names: Sequence[str] = (),
              served_model_names: Sequence[str] = (),
              max_lora_rank: Optional[int] = 0,
              max_loras: Optional[int] = 1,
              max_cpu_loras: Optional[int] = 0,
              base_model_mismatch: str = "error",
              supported_modules: Optional[Sequence[str]] = None,
              checksums: Optional[Mapping[str, Mapping[str, Any]]] = None,
              check_values: bool = True,
              chunk_bytes: int = DATA_CHUNK_BYTES) -> Dict[str, Any]:
    """Check every adapter ({name, path, allow_pickle}) and the engine settings.

    Returns ``errors`` and ``warnings`` (lists of one-line messages),
    ``max_lora_rank_effective`` (the given value, or derived when 0/None),
    ``ranks`` {name: rank or None} and ``adapters`` (each report as a dict).
    """
    if base_model_mismatch not in ("error", "warn"):
        raise ValueError(f"base_model_mismatch must be 'error' or 'warn', not {base_model_mismatch!r}")
    errors: List[str] = []
    warnings: List[str] = []
    base: Optional[BaseModel] = None
    if base_model_config is None:
        warnings.append("base model config not given: tensor shapes and target modules are not checked "
                        "against the base model")
    else:
        try:
            base = load_base_model(base_model_config)
        except AdapterCheckError as exc:
            errors.append(f"{exc}. Fix: point base_model_config at the served model's config.json.")
    names = [a.get("name") for a in adapters]
    errors.extend(check_names(names, served_model_names))
    reports: List[AdapterReport] = []
    explicit = max_lora_rank if max_lora_rank and max_lora_rank > 0 else None
    for index, adapter in enumerate(adapters):
        name = adapter.get("name") or f"#{index + 1}"
        path = adapter.get("path")
        if not isinstance(path, str) or not path:
            report = AdapterReport(name=str(name), path=str(path))
            report.problems.append(problem(str(name), "path", show(path), "an adapter needs a path",
                                           "give the adapter directory's path"))
        else:
            report = check_adapter(
                str(name), path, base, supported_modules=supported_modules, max_lora_rank=explicit,
                base_model_names=base_model_names, base_model_mismatch=base_model_mismatch,
                checksums=(checksums or {}).get(str(name)), allow_pickle=bool(adapter.get("allow_pickle")),
                check_values=check_values, chunk_bytes=chunk_bytes)
        reports.append(report)
    ranks = [r.rank for r in reports if r.rank is not None]
    engine_errors, engine_warnings, effective = check_engine(
        max_lora_rank, max_loras, max_cpu_loras, len(adapters), ranks)
    if not explicit and effective is None:
        # Derived, and some adapter is above every allowed value: name it.
        for report in reports:
            if report.rank is not None and report.rank > ALLOWED_MAX_LORA_RANKS[-1]:
                report.problems.append(problem(
                    report.name, "rank", str(report.rank),
                    f"above vLLM's largest max_lora_rank {ALLOWED_MAX_LORA_RANKS[-1]}",
                    f"retrain with r <= {ALLOWED_MAX_LORA_RANKS[-1]}"))
    for report in reports:
        errors.extend(report.problems)
        warnings.extend(report.warnings)
    errors.extend(engine_errors)
    warnings.extend(engine_warnings)
    return {
        "errors": errors,
        "warnings": warnings,
        "max_lora_rank_effective": effective,
        "ranks": {r.name: r.rank for r in reports},
        "adapters": [r.as_dict() for r in reports],
    }

"""The adapter's LoRA tensors against the base model: names, pairs and shapes, as vLLM 0.11.0 loads
them. Standard library only, Python 3.9+."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_report import (
    AdapterReport,
    problem,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_peft_config import (
    BaseModel,
    SAFETENSORS_FILE,
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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

"""The configs an adapter check reads: the base model's config.json (what tensor shapes depend on) and
the adapter's PEFT adapter_config.json (rank, alpha, target modules, base model name), against what
vLLM 0.11.0's PEFTHelper accepts. Standard library only, Python 3.9+."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_report import (
    AdapterCheckError,
    AdapterReport,
    problem,
    show,
)

REQUIRED_FIELDS: Tuple[str, ...] = ("r", "lora_alpha", "target_modules")
"""``PEFTHelper``'s fields without defaults (vllm/lora/peft_helper.py)."""


CONFIG_FILE = "adapter_config.json"


SAFETENSORS_FILE = "adapter_model.safetensors"


PICKLE_FILES: Tuple[str, ...] = ("adapter_model.bin", "adapter_model.pt")


_QUANT_SUFFIX = re.compile(
    r"(?:[-_.](?:awq|gptq(?:[-_]?int[348])?|int[348]|bnb[-_]?[48]bit|[48]bit|fp8|w8a8|w4a16))+$")


_HF_CACHE_DIR = re.compile(r"(?:^|/)models--[^/]*?--([^/]+)(?:/|$)")


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

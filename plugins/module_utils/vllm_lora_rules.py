"""vLLM 0.11.0's rules on LoRA adapters: the allowed max-lora-rank values, the modules an adapter may
target, adapter names, and the engine settings it refuses to start with. The one home of these rules:
the adapter check (vllm_adapters.py) and the role's declaration check (the vllm_declaration_errors
filter) both read them here. Standard library only, Python 3.9+."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_report import (
    problem,
    setting_problem,
    show,
)

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


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Adapter names: safe as a path component, in a URL and on a command line.
Used with fullmatch: `$` with match would also accept a trailing newline."""


def smallest_rank_that_fits(rank: int) -> Optional[int]:
    return next((allowed for allowed in ALLOWED_MAX_LORA_RANKS if allowed >= rank), None)


# Names and engine settings: the role's declaration check (the vllm_declaration_errors
# filter, which names the variables) and the adapter check (which names the adapters)
# both take their findings from here.


def name_findings(names: Sequence[Any], served_model_names: Sequence[str] = ()) -> List[Tuple[int, Any, str, str]]:
    """(index, name, why, fix) for each adapter name that is empty, unsafe, duplicated, or equal
    to a served base-model name."""
    found: List[Tuple[int, Any, str, str]] = []
    seen: Dict[str, int] = {}
    served = set(served_model_names)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            found.append((index, name, "an adapter needs a name (requests select it with \"model\": \"<name>\")",
                          "give the adapter a name"))
            continue
        if not NAME_PATTERN.fullmatch(name):
            found.append((index, name, f"not safe in a path or URL (must match {NAME_PATTERN.pattern})",
                          "use letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 128"))
        if name in seen:
            found.append((index, name, f"declared more than once (also #{seen[name] + 1}); vLLM refuses "
                          f"the second (\"The lora adapter '{name}' has already been loaded.\") and does not start",
                          "give every adapter its own name"))
        else:
            seen[name] = index
        if name in served:
            # vllm/entrypoints/openai/serving_engine.py _maybe_get_adapters: adapters are looked up first.
            found.append((index, name, "equals a served model name: requests for that name would get the "
                          "adapter instead of the base model (vLLM looks adapters up first)",
                          "rename the adapter or the served model name"))
    return found


def check_names(names: Sequence[Any], served_model_names: Sequence[str] = ()) -> List[str]:
    """Empty, unsafe, duplicated, or shadowing a served base-model name."""
    return [problem(f"#{index + 1}" if not isinstance(name, str) or not name else name, "name", show(name), why, fix)
            for index, name, why, fix in name_findings(names, served_model_names)]


def setting_findings(max_lora_rank: Optional[int], max_loras: Optional[int], max_cpu_loras: Optional[int],
                     ranks: Sequence[int] = ()) -> List[Tuple[str, Any, str, str]]:
    """(variable, value, why, fix) for engine settings vLLM 0.11.0 refuses to start with.
    ``max_lora_rank`` 0/None: derived (checked against ``ranks`` by check_engine)."""
    found: List[Tuple[str, Any, str, str]] = []
    if max_lora_rank and max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
        fits = smallest_rank_that_fits(max(list(ranks) + [max_lora_rank]))
        found.append(("vllm_max_lora_rank", max_lora_rank,
                      f"vLLM 0.11.0 accepts only one of {', '.join(map(str, ALLOWED_MAX_LORA_RANKS))} and does not start",
                      f"set it to {fits}" if fits else f"set it to {ALLOWED_MAX_LORA_RANKS[-1]}"))
    loras = 1 if max_loras is None else max_loras
    if loras < 1:
        found.append(("vllm_max_loras", loras, "must be >= 1 (vLLM does not start)", "set it to 1 or more"))
    if max_cpu_loras and max_cpu_loras < loras:
        found.append(("vllm_max_cpu_loras", max_cpu_loras,
                      f"must be >= max_loras {loras} (vLLM: \"max_cpu_loras ({max_cpu_loras}) must be >= "
                      f"max_loras ({loras})\", it does not start)",
                      f"set it to {loras} or more, or 0 to use vLLM's default (= max_loras)"))
    return found


# vLLM's flag for each setting variable, in this module's messages.
FLAGS = {"vllm_max_lora_rank": "--max-lora-rank", "vllm_max_loras": "--max-loras", "vllm_max_cpu_loras": "--max-cpu-loras"}


def check_engine(max_lora_rank: Optional[int], max_loras: Optional[int], max_cpu_loras: Optional[int],
                 adapter_count: int, ranks: Iterable[int]) -> Tuple[List[str], List[str], Optional[int]]:
    """(errors, warnings, effective max-lora-rank) for the engine settings.

    ``max_lora_rank`` 0/None: derived, the smallest allowed value that fits
    every rank (vLLM's default 16 when there are none); None when no allowed
    value fits. ``max_cpu_loras`` 0/None: unset (vLLM uses max_loras).
    """
    warnings: List[str] = []
    ranks = list(ranks)
    errors = [setting_problem(f"{FLAGS[variable]} ({variable})", value, why, fix)
              for variable, value, why, fix in setting_findings(max_lora_rank, max_loras, max_cpu_loras, ranks)]
    if max_lora_rank:
        effective: Optional[int] = max_lora_rank
    elif ranks:
        effective = smallest_rank_that_fits(max(ranks))
        if effective is None:
            errors.insert(0, setting_problem(
                "--max-lora-rank (vllm_max_lora_rank)", max_lora_rank or 0,
                f"derived from the adapters, but rank {max(ranks)} is above vLLM's largest allowed value "
                f"{ALLOWED_MAX_LORA_RANKS[-1]}", "retrain the adapters with a smaller rank"))
    else:
        effective = VLLM_DEFAULT_MAX_LORA_RANK
    loras = 1 if max_loras is None else max_loras
    if loras >= 1 and adapter_count > loras:
        cpu = max_cpu_loras or loras
        warnings.append(setting_problem(
            "--max-loras (vllm_max_loras)", loras,
            f"{adapter_count} adapters are declared: at most {loras} can be used in one batch, requests for "
            f"others wait" + (f"; and only {cpu} stay in CPU memory (--max-cpu-loras), others are re-read "
                              "from disk when used" if adapter_count > cpu else ""),
            f"raise it to {adapter_count} if they are used at the same time (more GPU memory)"))
    return errors, warnings, effective

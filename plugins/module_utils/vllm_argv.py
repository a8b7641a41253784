"""Reading a `vllm serve` argv as a release records it: the values of --lora-modules
(one JSON object per adapter, all after ONE flag) apart from the rest. One home for the
filter vllm_without_lora_modules (what must match for a live adapter change) and the
vllm_release module (which adapter folders a kept release still serves)."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple


def split_lora_modules(argv: List[Any]) -> Tuple[List[Any], List[str]]:
    """(the argv without --lora-modules and its values, those values)."""
    rest: List[Any] = []
    modules: List[str] = []
    inside = False
    for word in argv:
        if word == "--lora-modules":
            inside = True
            continue
        if inside and str(word).startswith("--"):
            inside = False
        if inside:
            modules.append(str(word))
        else:
            rest.append(word)
    return rest, modules


def lora_modules(argv: List[Any]) -> List[Tuple[str, str]]:
    """(adapter name, folder) of each --lora-modules value: a JSON object with name and path,
    or vLLM's older name=path form."""
    modules: List[Tuple[str, str]] = []
    for value in split_lora_modules(argv)[1]:
        try:
            module: Dict[str, Any] = json.loads(value)
            name, path = (module.get("name"), module.get("path")) if isinstance(module, dict) else (None, None)
        except ValueError:
            name, path = value.split("=", 1) if "=" in value else (value, "")
        if isinstance(path, str) and path:
            modules.append((str(name or ""), path))
    return modules


def lora_module_paths(argv: List[Any]) -> List[str]:
    """The adapter folders an argv serves."""
    return [path for _name, path in lora_modules(argv)]

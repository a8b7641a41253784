"""What the adapter checks report: one line per problem, naming the adapter (or setting), the
field, its value, why and the fix. Standard library only, Python 3.9+ (runs on the hosts too)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


_SHOWN = 120  # characters of a value quoted in a message


class AdapterCheckError(Exception):
    """A file could not be read as what it should be."""


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

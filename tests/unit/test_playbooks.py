"""Playbook-level promises: stages are tags, nothing prompts, every playbook parses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COLLECTION = "inference.vllm_lora"  # galaxy.yml: namespace.name
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


def _includes(tasks: list[dict]) -> list[str]:
    """Role includes in order, e.g. 'vllm', 'vllm:restart', 'vllm_balancer:drain' (blocks flattened)."""
    found: list[str] = []
    for task in tasks:
        include = task.get("ansible.builtin.include_role")
        if include:
            name = include["name"].removeprefix(COLLECTION + ".")
            found.append(name + (f":{include['tasks_from']}" if "tasks_from" in include else ""))
        found += _includes(task.get("block", []))
    return found


def _play_tasks(playbook: str, play_name: str) -> list[dict]:
    import yaml

    plays = yaml.safe_load((REPO / "playbooks" / playbook).read_text())
    play = next(p for p in plays if p.get("name") == play_name)
    return play["tasks"][-1]["block"]  # the per-host block (its rescue is tested end to end)


def test_a_roll_prepares_the_release_before_it_drains_and_restarts_only_drained() -> None:
    order = _includes(_play_tasks("rolling_restart.yml", "Rolling restart of vLLM hosts"))
    # The deploy (deferred restart) runs while the host serves; the restart sits between drain and ready.
    assert order.index("vllm") < order.index("vllm:current") < order.index("vllm_balancer:drain") \
        < order.index("vllm:restart") < order.index("vllm_balancer:ready") < order.index("vllm:prune")
    block = _play_tasks("rolling_restart.yml", "Rolling restart of vLLM hosts")
    prepare = next(t for t in block if t.get("ansible.builtin.include_role", {}).get("name") == f"{COLLECTION}.vllm"
                   and "tasks_from" not in t["ansible.builtin.include_role"])
    assert prepare["vars"] == {"vllm_restart_deferred": True}


def test_maintenance_reads_the_release_before_it_drains() -> None:
    order = _includes(_play_tasks("maintenance.yml", "Restart each host's current release, one batch at a time"))
    assert order == ["vllm:current", "vllm_balancer:drain", "vllm:restart", "vllm_balancer:ready"]


def test_a_rollback_finds_its_release_before_it_drains() -> None:
    """A release id that does not exist fails while the host still serves in the balancer."""
    import yaml

    plays = yaml.safe_load((REPO / "playbooks" / "rollback.yml").read_text())
    (host_block,) = next(p for p in plays if p.get("name") == "Roll back vLLM hosts")["tasks"]
    assert _includes(host_block["block"]) == [
        "vllm:rollback_target", "vllm_balancer:drain", "vllm:rollback", "vllm_balancer:ready"]


def _module(task: dict) -> str:
    return next(k for k in task if k.startswith("ansible.builtin."))


def _all_tasks(tasks: list[dict]) -> list[dict]:
    flat: list[dict] = []
    for task in tasks:
        flat.append(task)
        flat.extend(_all_tasks(task.get("block", [])))
    return flat


@pytest.mark.parametrize(("playbook", "play_name", "record"), [
    ("site.yml", "Deploy vLLM with LoRA adapters", "__vllm_play_failure"),
    ("rolling_restart.yml", "Rolling restart of vLLM hosts", "__vllm_play_failure"),
    ("rollback.yml", "Roll back vLLM hosts", "vllm_deployment"),
])
def test_a_failure_report_is_written_in_always(playbook: str, play_name: str, record: str) -> None:
    """A failed deploy, roll or rollback leaves its report even when its recovery fails: the
    rescue first records the failure with a set_fact (which cannot fail), and the report is
    written in the block's always:, on that record. Before, it was written in rescue: a failing
    task before it (a failed way back) ended the play with no report."""
    import yaml

    plays = yaml.safe_load((REPO / "playbooks" / playbook).read_text())
    tasks = next(p for p in plays if p.get("name") == play_name)["tasks"]
    host_block = next(t for t in tasks if "rescue" in t)
    first = host_block["rescue"][0]
    assert _module(first) == "ansible.builtin.set_fact" and record in first["ansible.builtin.set_fact"], first
    rescue_files = [t["ansible.builtin.include_tasks"] for t in _all_tasks(host_block["rescue"])
                    if _module(t) == "ansible.builtin.include_tasks"]
    assert not any("deployment_report" in str(f) for f in rescue_files), rescue_files
    always = _all_tasks(host_block["always"])
    reports = [t for t in always if "deployment_report" in str(t.get("ansible.builtin.include_tasks", ""))]
    assert len(reports) == 1, always
    guards = [str(t.get("when", "")) for t in always if "block" in t] + [str(reports[0].get("when", ""))]
    assert any(record in guard for guard in guards), guards
    if playbook == "rollback.yml":
        # A report that cannot be written does not end the always: before the cause is said.
        assert reports[0]["ansible.builtin.include_tasks"]["apply"] == {"ignore_errors": True}


def test_every_restart_passes_the_gpu_gate_and_its_inputs_have_one_home() -> None:
    """The gate runs at the start of the role (so --tags service renders the kernel it chose), and in
    the read-only steps before a host is drained (current: rolling and maintenance restarts;
    rollback_target: rollback.yml). drivers.yml calls the same task file; the declaration is mapped
    to the gate's inputs in that one file."""
    import yaml

    role = REPO / "roles" / "vllm" / "tasks"
    for name in ("preflight.yml", "current.yml", "rollback_target.yml"):
        first = yaml.safe_load((role / name).read_text())[0]
        assert first["ansible.builtin.include_tasks"]["file"] == "gpu_gate.yml", name
        tags = ["always", "gpu_gate"]  # always, but --skip-tags gpu_gate can skip it (a --check before the driver)
        assert first["tags"] == tags and first["ansible.builtin.include_tasks"]["apply"]["tags"] == tags
        # Before a drain, a release already built: only the driver and the GPUs are asked.
        assert first.get("vars", {}).get("__vllm_gpu_gate_release", False) is (name != "preflight.yml")
    drivers = yaml.safe_load((REPO / "playbooks" / "drivers.yml").read_text())[0]["tasks"]
    gate = next(t for t in drivers if t.get("name") == "GPU gate")["block"][0]["ansible.builtin.include_role"]
    assert (gate["name"], gate["tasks_from"]) == (f"{COLLECTION}.vllm", "gpu_gate")
    mapping = [str(p.relative_to(REPO)) for p in [*REPO.glob("playbooks/**/*.yml"), *REPO.glob("roles/vllm*/**/*.yml")]
               if "nvidia_driver_gate_quantization:" in p.read_text()]
    assert mapping == ["roles/vllm/tasks/gpu_gate.yml"]

"""The unit's hardening, as the role renders it from the shipped inventories, against what
docs/security.md states: each directive of its table, and the exposure bound of its table,
measured by `systemd-analyze security --offline=true` on the rendered file.

The GPU unit cannot run here (no GPU): this is where its DeviceAllow/DevicePolicy lines and
its exposure are checked. The CPU unit is rendered here too, and checked again on the unit a
test host runs (tests/e2e/test_security_faults.py, through `directive_problems`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.unit.loader import REPO
from tests.unit.role_render import render_file

ROLE = REPO / "roles" / "vllm"
TEMPLATE = ROLE / "templates" / "etc" / "systemd" / "system" / "vllm.service.j2"
DOCS = REPO / "docs" / "security.md"
EXPOSURE_ROWS = {  # a unit shape -> the first words of its row in the docs' exposure table
    "cpu-running": "CPU (`vllm_device: cpu`), as the role renders it, running",
    "proxy-running": "the API port's proxy",
    "cpu-offline": "CPU (`inventory/local`), rendered",
    "gpu-offline": "GPU (`inventory/local` with `vllm_device: cuda`), rendered",
    "beelink-offline": "GPU, the shipped Beelink (`inventory/beelink`), rendered",
    "beelink-cpu-running": "CPU, model adopted under /home",
}


# --- what the docs state ----------------------------------------------------------------------

def _table(heading: str, first_cell: str) -> list[list[str]]:
    """The rows of the first table after `heading` whose header starts with `first_cell`."""
    text = DOCS.read_text()
    start = text.index(heading)
    rows: list[list[str]] = []
    for line in text[start:].splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if not rows and cells[0] != first_cell:
                continue
            rows.append(cells)
        elif rows:
            break
    assert len(rows) > 2, f"no table headed {first_cell!r} after {heading!r} in {DOCS}"
    return rows[2:]  # past the header and its |---| line


# Keys of the unit that are not hardening (what runs, where, its environment): the docs' table
# lists every other key, so a directive added to the unit without the docs fails here.
NOT_HARDENING = {"Description", "Documentation", "After", "Wants", "WantedBy", "Type", "EnvironmentFile",
                 "Environment", "ExecStart", "WorkingDirectory", "StateDirectory", "StateDirectoryMode",
                 "CacheDirectory", "CacheDirectoryMode", "TimeoutStopSec"}
ALL_LINES = "(all, one line each)"  # a cell whose values must all be there, each on its own line


def documented_directives() -> dict[str, dict[str, list[str]]]:
    """{'cpu'|'cuda': {directive: allowed values}}; '-' means absent, '(path)' any path, and a
    first value of ALL_LINES means exactly these lines."""
    found: dict[str, dict[str, list[str]]] = {"cpu": {}, "cuda": {}}
    for directive, cpu, gpu in _table("### What is set", "directive"):
        key = directive.strip("`").rstrip("=")
        for device, cell in (("cpu", cpu), ("cuda", gpu)):
            values = re.findall(r"`([^`]*)`", cell)
            values += [""] * cell.count("(empty)") + ["(path)"] * cell.count("(path)")
            assert values, f"{DOCS}: no value for {key} ({device}): {cell!r}"
            found[device][key] = [ALL_LINES, *values] if ALL_LINES in cell else values
    return found


def documented_bound(shape: str) -> float:
    """The exposure above which a test fails, as the docs' table states it for `shape`."""
    prefix = EXPOSURE_ROWS[shape]
    rows = [row for row in _table("## The unit: `systemd-analyze security`", "unit") if row[0].startswith(prefix)]
    assert len(rows) == 1, f"{DOCS}: expected one exposure row starting {prefix!r}, found {len(rows)}"
    return float(rows[0][-1])


def documented_open_settings() -> set[str]:
    """The settings the docs explain as left open (first column of that table)."""
    return {name for row in _table("### Each setting left open, and why", "setting (exposure)")
            for name in re.findall(r"`([A-Za-z]+=[^`]*?)`", row[0].replace("\\|", "|"))}


def unit_directives(unit: str) -> dict[str, list[str]]:
    """{Key: [values]} of the [Service] and [Unit] lines of a unit file (comments skipped)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def hardening_block(unit: str) -> list[str]:
    """The directives rendered from __vllm_unit_sandbox: the lines after the hardening comment."""
    lines = unit.split("\n# Hardening", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]


def directive_problems(unit: str, device: str) -> list[str]:
    """What in `unit` differs from the docs' directive table for `device` (empty: none)."""
    expected = documented_directives()[device]
    have = unit_directives(unit)
    problems = [f"{key}= is in the unit but not in the docs' table" for key in have
                if key not in expected and key not in NOT_HARDENING]
    problems += [f"{key}= is in the hardening block but not in the docs' table" for key in hardening_block(unit)
                 if key not in expected]
    for key, allowed in expected.items():
        values = have.get(key, [])
        if allowed[0] == ALL_LINES:
            if sorted(values) != sorted(allowed[1:]):
                problems.append(f"{key}= is {values} (docs: exactly {allowed[1:]})")
            continue
        if not values:
            if "-" not in allowed:
                problems.append(f"{key}= is missing (docs: {allowed})")
        elif "(path)" in allowed:
            continue
        elif len(values) > 1:
            if sorted(values) != sorted(allowed):
                problems.append(f"{key}= is {values} (docs: {allowed})")
        elif values[0] not in allowed or values[0] == "-":
            problems.append(f"{key}={values[0]} (docs: {allowed})")
    return problems


# --- the unit as the role renders it ----------------------------------------------------------

def render_unit(inventory: str, role: Path = ROLE, **overrides: Any) -> str:
    """The role's unit template as Ansible renders it for `inventory` (tests/unit/role_render.py)."""
    return render_file(TEMPLATE, inventory, role, **overrides)


SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cpu-offline": ("local", "cpu", {}),
    "gpu-offline": ("local", "cuda", {"vllm_device": "cuda"}),
    "beelink-offline": ("beelink", "cuda", {}),
}


@pytest.fixture(scope="module")
def units() -> dict[str, str]:
    return {shape: render_unit(inventory, **overrides) for shape, (inventory, _, overrides) in SHAPES.items()}


def offline_exposure(unit: str, tmp_path: Path) -> tuple[float, str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/setup.sh installs Debian's systemd package"
    path = tmp_path / "vllm.service"  # the analysis needs the real name
    path.write_text(unit)
    # In a non-UTF-8 locale systemd 252 marks open settings with '-' instead of the ✗ parsed below.
    table = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)],
                           capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout
    match = re.search(r"Overall exposure level for vllm\.service:\s*([0-9.]+)", table)
    assert match, table
    return float(match.group(1)), table


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_directive_the_docs_list_is_rendered(units: dict[str, str], shape: str) -> None:
    assert directive_problems(units[shape], SHAPES[shape][1]) == [], units[shape]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_exposure_is_within_the_documented_bound(units: dict[str, str], shape: str, tmp_path: Path) -> None:
    exposure, table = offline_exposure(units[shape], tmp_path)
    assert exposure <= documented_bound(shape), table
    # Every setting the analysis marks open is one the docs explain.
    open_settings = {line.split()[1] for line in table.splitlines() if line.startswith("✗")}
    assert open_settings, table  # some stay open (docs: each one and why): none seen means a parse failure
    explained = documented_open_settings()
    # (the docs may name the value too: `ProcSubset=pid` explains `ProcSubset=`)
    assert {s for s in open_settings if not any(e.startswith(s) for e in explained)} == set(), table


def test_home_directories_are_hidden_unless_a_folder_is_adopted_under_home(units: dict[str, str]) -> None:
    assert unit_directives(units["cpu-offline"])["ProtectHome"] == ["yes"]
    assert unit_directives(units["gpu-offline"])["ProtectHome"] == ["yes"]
    assert "BindReadOnlyPaths" not in unit_directives(units["cpu-offline"])


def test_the_gpu_unit_opens_only_the_nvidia_nodes(units: dict[str, str]) -> None:
    beelink = unit_directives(units["beelink-offline"])
    assert beelink["DevicePolicy"] == ["closed"] and "PrivateDevices" not in beelink
    assert beelink["DeviceAllow"] == ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia-frontend rw",
                                      "char-nvidia-caps rw"]
    assert not any("uvm-tools" in line for line in units["beelink-offline"].splitlines())
    # The shipped Beelink adopts its model under /home: tmpfs homes, the folder bound in read-only.
    assert beelink["ProtectHome"] == ["tmpfs"]
    assert beelink["BindReadOnlyPaths"] == ["/home/beelink/models/Qwen2.5-7B-Instruct-AWQ"]
    assert "--quantization awq_marlin" in beelink["ExecStart"][0]


@pytest.mark.parametrize("removed", ["PrivateTmp=yes", "ProtectHome=yes", "SystemCallFilter=@system-service",
                                     "PrivateDevices=yes", "PrivateNetwork=yes"])
def test_a_dropped_directive_is_caught(units: dict[str, str], removed: str) -> None:
    """The check itself can fail: the CPU unit without one of its directives."""
    broken = units["cpu-offline"].replace(removed + "\n", "")
    assert broken != units["cpu-offline"]
    assert any(removed.split("=")[0] in problem for problem in directive_problems(broken, "cpu"))


def test_a_directive_missing_from_the_docs_is_caught(units: dict[str, str]) -> None:
    added = units["cpu-offline"].replace("UMask=0077\n", "UMask=0077\nRemoveIPC=yes\n")
    assert directive_problems(added, "cpu") == ["RemoveIPC= is in the unit but not in the docs' table",
                                                "RemoveIPC= is in the hardening block but not in the docs' table"]
    # A loosening anywhere in the unit, not only in the hardening block.
    loosened = units["cpu-offline"].replace("TimeoutStopSec=60\n", "TimeoutStopSec=60\nReadWritePaths=/\n")
    assert directive_problems(loosened, "cpu") == ["ReadWritePaths= is in the unit but not in the docs' table"]


def test_a_gpu_unit_missing_a_device_line_is_caught(units: dict[str, str]) -> None:
    cut = units["gpu-offline"].replace("DeviceAllow=/dev/nvidia-uvm rw\n", "")
    assert [p for p in directive_problems(cut, "cuda") if p.startswith("DeviceAllow=")], cut


def _pythonpath(unit: str) -> str:
    (line,) = [line for line in unit.splitlines() if line.startswith('Environment="PYTHONPATH=')]
    return line


def test_a_release_runs_its_own_middlewares(tmp_path: Path) -> None:
    """The shipped middlewares are part of a release: the unit imports them from that release's own
    folder (a rollback runs what that release ran), and a changed middleware is a new release."""
    line = _pythonpath(render_unit("local"))
    assert re.fullmatch(r'Environment="PYTHONPATH=/opt/vllm/releases/[0-9a-f]{12}/python"', line), line
    changed = tmp_path / "role"
    shutil.copytree(ROLE / "files", changed / "files")
    shutil.copytree(ROLE / "templates", changed / "templates")
    guard = changed / "files" / "vllm_access_guard.py"
    guard.write_text(guard.read_text() + "\n# a later version\n")
    assert _pythonpath(render_unit("local", role=changed)) != line

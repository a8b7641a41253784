"""roles/vllm/library/vllm_release.py: activation, discard of a failed release,
and the refusal of any release id that is not one the role makes (it is joined
into a path under releases/ that the module may remove).

The module runs in-process as Ansible would run it, against a temporary
software_dir laid out like /opt/vllm.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.unit.loader import load
from tests.unit.modules import run_main

load("roles/vllm/module_utils/vllm_files.py", "ansible.module_utils.vllm_files")  # what the module imports
release = load("roles/vllm/library/vllm_release.py")


def rid(seed: str) -> str:
    """A release id as roles/vllm/vars/main.yml makes it: sha256 of the record, first 12 hex."""
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


A, B, C = rid("a"), rid("b"), rid("c")


def make_release(software_dir: Path, release_id: str, venv: str, adapters: list[str]) -> None:
    """A release directory and the venv it runs, both as the role leaves them."""
    venv_dir = software_dir / "venvs" / venv
    venv_dir.mkdir(parents=True, exist_ok=True)
    (venv_dir / ".complete").write_text("")
    (software_dir / "venvs" / f"{venv}.requirements.txt").write_text("vllm==0.11.0\n")
    record = {"venv": str(venv_dir), "adapters": adapters, "base_served_name": "tiny"}
    (software_dir / "releases" / release_id).mkdir(parents=True)
    (software_dir / "releases" / release_id / "release.json").write_text(json.dumps(record))


def history(software_dir: Path) -> list[str]:
    data: list[str] = json.loads((software_dir / "releases" / "history.json").read_text())["history"]
    return data


def run(capsys: pytest.CaptureFixture[str], **args: Any) -> tuple[int, dict[str, Any]]:
    """main() as Ansible runs it; (exit code, result JSON)."""
    return run_main(release.main, args, capsys)


VENVS = {A: ("sw1", ["alpha"]), B: ("sw2", ["beta"]), C: ("sw3", ["gamma"])}


@pytest.fixture()
def software_dir(tmp_path: Path) -> Path:
    return tmp_path / "opt-vllm"


def deploy(capsys: pytest.CaptureFixture[str], software_dir: Path, release_id: str,
           keep: int = 3) -> tuple[int, dict[str, Any]]:
    """As the role does: venv and release written, then activated (which prunes unused venvs)."""
    make_release(software_dir, release_id, *VENVS[release_id])
    return run(capsys, state="activate", software_dir=str(software_dir), release_id=release_id, keep=keep)


def test_activation_records_history_points_current_and_prunes(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for release_id in (A, B):
        rc, result = deploy(capsys, software_dir, release_id, keep=2)
        assert rc == 0, result.get("msg")
    assert history(software_dir) == [A, B]
    rc, result = deploy(capsys, software_dir, C, keep=2)
    assert rc == 0, result.get("msg")
    assert result["changed"] is True and result["current"] == C and result["previous"] == B
    assert result["history"] == history(software_dir) == [B, C]
    assert os.readlink(software_dir / "current") == os.path.join("releases", C)
    # A fell out of the last 2: its directory, its venv and the venv's requirements go.
    venvs = software_dir / "venvs"
    assert sorted(result["removed"]) == sorted([str(software_dir / "releases" / A), str(venvs / "sw1")])
    assert not (software_dir / "releases" / A).exists()
    assert not (venvs / "sw1").exists() and not (venvs / "sw1.requirements.txt").exists()
    assert (venvs / "sw2").is_dir() and (venvs / "sw3").is_dir()
    assert result["adapters_in_use"] == ["beta", "gamma"]
    # Converged: the same activation again changes nothing.
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=C, keep=2)
    assert rc == 0 and result["changed"] is False and result["removed"] == []


def test_a_failed_release_is_discarded_from_history_and_disk(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for release_id in (A, B):
        assert deploy(capsys, software_dir, release_id)[0] == 0
    # B failed: the way back goes to A and B must never be a "previous" again.
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to="previous")
    assert rc == 0 and result["target"]["id"] == A
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=A, keep=3, discard=B)
    assert rc == 0, result.get("msg")
    assert history(software_dir) == [A]
    assert os.readlink(software_dir / "current") == os.path.join("releases", A)
    assert str(software_dir / "releases" / B) in result["removed"]
    assert not (software_dir / "releases" / B).exists()
    assert (software_dir / "venvs" / "sw1").is_dir() and not (software_dir / "venvs" / "sw2").exists()


BAD_IDS = ["../venvs/x", "/etc", "abc", "0123456789ab\n", "0123456789AB", ""]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with what it is (file content or link target)."""
    seen: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            seen[str(path.relative_to(root))] = (
                "-> " + os.readlink(path) if path.is_symlink() else "dir" if path.is_dir() else path.read_text())
    return seen


@pytest.mark.parametrize("state, param, value", [
    (state, param, value)
    for state, param in [("activate", "release_id"), ("activate", "discard"), ("rollback", "to")]
    for value in BAD_IDS if not (param == "discard" and value == "")  # discard "" means none
], ids=repr)
def test_anything_but_a_release_id_is_refused_before_anything_changes(
        software_dir: Path, capsys: pytest.CaptureFixture[str], state: str, param: str, value: str) -> None:
    for release_id in (A, B):
        assert deploy(capsys, software_dir, release_id)[0] == 0
    # What "../venvs/x" points at from releases/: a folder the module must not remove.
    (software_dir / "venvs" / "x").mkdir()
    (software_dir / "venvs" / "x" / "keep").write_text("mine")
    before = snapshot(software_dir)
    args: dict[str, Any] = {"state": state, "software_dir": str(software_dir), param: value}
    if param == "discard":
        args["release_id"] = A
    # Whatever happens, nothing outside the temporary folder is removed (discard "/etc").
    with mock.patch.object(release.shutil, "rmtree") as rmtree, mock.patch.object(release.os, "unlink") as unlink:
        rc, result = run(capsys, **args)
    assert rc == 1, result
    assert rmtree.call_count == 0 and unlink.call_count == 0
    assert f"{param}={value!r}" in result["msg"] and "Fix:" in result["msg"]
    assert snapshot(software_dir) == before


@pytest.mark.parametrize("value", [A, "previous"])
def test_rollback_accepts_previous_or_a_release_id(
        software_dir: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    for release_id in (A, B):
        assert deploy(capsys, software_dir, release_id)[0] == 0
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to=value)
    assert rc == 0 and result["target"]["id"] == A and result["changed"] is False

"""plugins/modules/vllm_release.py: activation, discard of a failed release,
and the refusal of any release id that is not one the role makes (it is joined
into a path under releases/ that the module may remove); what rollback.yml and
service.yml read of it: the rollback target's record (id, dir, adapters,
base_served_name) found without changing anything, the history order that makes
"previous" the release left last, a failure naming what there is to roll back
to, check mode (a new release whose record the task before did not write), and
pruning that never removes the current release or a venv still being installed.

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

load("plugins/module_utils/vllm_files.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files")  # what the module imports
load("plugins/module_utils/vllm_argv.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_argv")
release = load("plugins/modules/vllm_release.py")


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
    # Adapters stored by content (name@digest), as this version places them; gamma as a release
    # made before that did (its folder named after the adapter alone).
    modules = [json.dumps({"name": name, "path": f"/srv/vllm/adapters/{name}" + ("" if name == "gamma" else "@0123456789abcdef"),
                           "base_model_name": "tiny"}, separators=(",", ":")) for name in adapters]
    argv = [f"{venv_dir}/bin/vllm", "serve", "/srv/vllm/models/tiny", "--served-model-name", "tiny",
            *(["--enable-lora", "--lora-modules", *modules] if modules else []), "--max-loras", "2"]
    record = {"venv": str(venv_dir), "adapters": adapters, "base_served_name": "tiny", "argv": argv}
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
    assert result["adapter_paths_in_use"] == ["/srv/vllm/adapters/beta@0123456789abcdef", "/srv/vllm/adapters/gamma"]
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


def make_and_activate(capsys: pytest.CaptureFixture[str], software_dir: Path, *release_ids: str) -> None:
    for release_id in release_ids:
        rc, result = deploy(capsys, software_dir, release_id)
        assert rc == 0, result.get("msg")


def test_rollback_returns_the_earlier_releases_record_and_changes_nothing(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A, B)
    before = snapshot(software_dir)
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to="previous")
    assert rc == 0, result.get("msg")
    # rollback.yml installs <dir>/vllm.service and verifies adapters and base_served_name.
    release_dir = software_dir / "releases" / A
    assert result["target"] == {**json.loads((release_dir / "release.json").read_text()),
                                "id": A, "dir": str(release_dir)}
    assert result["target"]["adapters"] == ["alpha"] and result["target"]["base_served_name"] == "tiny"
    assert (result["changed"], result["current"], result["history"], result["removed"]) == (False, B, [A, B], [])
    assert snapshot(software_dir) == before


@pytest.mark.parametrize("to", ["previous", A, C], ids=["previous", "the-current-one", "not-in-history"])
def test_rollback_with_nowhere_to_go_fails_naming_what_there_is(
        software_dir: Path, capsys: pytest.CaptureFixture[str], to: str) -> None:
    make_and_activate(capsys, software_dir, A)
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to=to)
    assert rc == 1
    assert result["msg"].startswith(f"no release to roll back to (asked for {to!r}; current {A}, history [{A!r}]). ")
    assert "Name one of the history's ids" in result["msg"]
    assert (result["current"], result["history"]) == (A, [A])


def test_rollback_on_a_host_without_releases_names_none(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir))
    assert rc == 1
    assert "(asked for 'previous'; current none, history [])" in result["msg"]


def test_activating_an_earlier_release_moves_it_last(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After a rollback to A, "previous" is the release A replaced, not A's old neighbour."""
    make_and_activate(capsys, software_dir, A, B, C)
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=A)
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["previous"], result["removed"]) == (True, C, [])
    assert history(software_dir) == [B, C, A]
    assert os.readlink(software_dir / "current") == os.path.join("releases", A)
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to="previous")
    assert result["target"]["id"] == C


def test_a_release_whose_directory_is_gone_is_no_rollback_target(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A, B, C)
    (software_dir / "releases" / B / "release.json").unlink()
    (software_dir / "releases" / B).rmdir()
    rc, result = run(capsys, state="rollback", software_dir=str(software_dir), to="previous")
    assert rc == 0 and result["target"]["id"] == A and result["history"] == [A, C]


def test_check_mode_activation_of_a_new_release_reports_it_and_writes_nothing(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In check mode the task before did not write releases/<id>/release.json."""
    make_and_activate(capsys, software_dir, A)
    before = snapshot(software_dir)
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=B,
                     _ansible_check_mode=True)
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["current"], result["previous"]) == (True, B, A)
    # The folders the kept release serves, as a real run reports them: prune's check mode must not
    # list them for removal (before, [] here made --check announce the removal of every kept folder).
    assert result["adapter_paths_in_use"] == ["/srv/vllm/adapters/alpha@0123456789abcdef"]
    assert snapshot(software_dir) == before


def test_check_mode_activation_reports_what_it_would_prune_and_changes_nothing(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A, B)
    make_release(software_dir, C, *VENVS[C])
    before = snapshot(software_dir)
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=C, keep=2,
                     _ansible_check_mode=True)
    assert rc == 0, result.get("msg")
    assert result["changed"] is True and result["history"] == [B, C]
    assert sorted(result["removed"]) == sorted([str(software_dir / "releases" / A),
                                                str(software_dir / "venvs" / "sw1")])
    assert snapshot(software_dir) == before


def test_activating_a_release_without_its_record_fails_naming_the_file(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A)
    before = snapshot(software_dir)
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=B)
    assert rc == 1
    assert result["msg"] == f"release {B!r} has no {software_dir}/releases/{B}/release.json"
    assert snapshot(software_dir) == before


def test_keep_zero_still_keeps_the_current_release(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A)
    make_release(software_dir, B, *VENVS[B])
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=B, keep=0)
    assert rc == 0, result.get("msg")
    assert history(software_dir) == [B]
    assert (software_dir / "releases" / B / "release.json").is_file()
    assert (software_dir / "venvs" / "sw2").is_dir() and not (software_dir / "releases" / A).exists()


def test_a_venv_still_being_installed_is_not_removed(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The role marks a finished venv with .complete; one without it may be installing right now."""
    installing = software_dir / "venvs" / "vllm-installing"
    installing.mkdir(parents=True)
    make_and_activate(capsys, software_dir, A)
    assert installing.is_dir()
    (installing / ".complete").write_text("")
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=A)
    assert rc == 0 and result["removed"] == [str(installing)] and not installing.exists()


def test_a_link_left_by_a_killed_run_does_not_stop_the_swap(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A)
    os.symlink(os.path.join("releases", "gone"), software_dir / "current.tmp")
    make_and_activate(capsys, software_dir, B)
    assert os.readlink(software_dir / "current") == os.path.join("releases", B)
    assert not os.path.lexists(software_dir / "current.tmp")


def test_discarding_the_release_being_activated_keeps_it(
        software_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_and_activate(capsys, software_dir, A, B)
    rc, result = run(capsys, state="activate", software_dir=str(software_dir), release_id=B, discard=B)
    assert rc == 0, result.get("msg")
    assert result["removed"] == [] and history(software_dir) == [A, B]
    assert (software_dir / "releases" / B / "release.json").is_file()

"""plugins/modules/vllm_artifact.py: model and adapter directories placed on
the host verified, atomically and without re-copying (tasks/artifacts.yml,
hf_download.yml, prune.yml).

Tested, per state:

- plan: a new host gets every file planned and counted on the mount that will
  hold it; placed files are not planned again (judged by the record and a stat,
  nothing re-hashed) until they or the manifest change; files an interrupted
  run staged completely are not copied again; too little space fails before any
  copy, naming the mount, vllm_disk_reserve_mib and the fix.
- commit: verified files moved into place for the service group and recorded;
  a second commit changes nothing; a corrupt copy is deleted and named while the
  served file stays as it was; a file neither placed nor staged is named; files
  the manifest dropped are removed; check mode changes nothing and does not need
  the service group to exist yet.
- adopt: a host directory is recorded, re-hashing only what changed; declared
  checksums are enforced; check mode writes no record.
- prune: undeclared adapter directories and their records go, declared ones
  and dot-directories stay.

The module runs in-process as Ansible would run it, on real files in tmp_path
laid out like the controller's model directory, /srv/vllm and
/var/lib/vllm-deploy; the copies between plan and commit are made as
artifacts.yml's copy task makes them. Only os.statvfs is replaced, in the one
test that checks the space arithmetic to the byte.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.unit.loader import load
from tests.unit.modules import run_main

files_util = load("plugins/module_utils/vllm_files.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files")  # what the module imports
artifact = load("plugins/modules/vllm_artifact.py")

MIB = 2**20
# commit chowns what it places (root:group), as it does under the role's become.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="commit chowns files to root")

MODEL = {
    "config.json": b'{"model_type": "qwen2", "hidden_size": 64}\n',
    "model.safetensors": bytes(range(256)) * 512,
    "tokenizer/tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def group() -> str:
    """A group other than root that exists here (stands for vllm_group)."""
    return next(entry.gr_name for entry in grp.getgrall() if entry.gr_gid != 0)


@dataclass
class Site:
    """The controller's model directory and the host's /srv/vllm and /var/lib/vllm-deploy."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "controller" / "models" / "qwen"

    @property
    def data_dir(self) -> Path:
        return self.root / "srv-vllm"

    @property
    def dest(self) -> Path:
        return self.data_dir / "models" / "qwen"

    @property
    def staging(self) -> Path:
        return self.data_dir / ".staging"

    @property
    def records(self) -> Path:
        return self.root / "var-lib-vllm-deploy" / "artifacts"

    def write_src(self, content: dict[str, bytes]) -> None:
        for rel, data in content.items():
            (self.src / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.src / rel).write_bytes(data)

    def artifacts(self) -> list[dict[str, Any]]:
        """What vllm_with_manifests hands the module: the artifact plus vllm_manifest's files."""
        files = {
            str(path.relative_to(self.src)): {"sha256": sha(path.read_bytes()), "size": path.stat().st_size}
            for path in sorted(self.src.rglob("*")) if path.is_file()
        }
        return [{"kind": "model", "name": "qwen", "source": "controller",
                 "dest": str(self.dest), "src": str(self.src), "files": files}]

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.records / "model-qwen.json").read_text())
        return data

    def stage(self, transfers: list[dict[str, Any]], staging_dirs: list[str]) -> None:
        """What artifacts.yml does between plan and commit (file task, copy task)."""
        for directory in staging_dirs:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for item in transfers:
            target = self.staging / f"{item['kind']}-{item['name']}" / item["rel"]
            shutil.copyfile(f"{item['src']}/{item['rel']}", target)
            os.chmod(target, 0o600)


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    site.write_src(MODEL)
    return site


def run(capsys: pytest.CaptureFixture[str], **args: Any) -> tuple[int, dict[str, Any]]:
    return run_main(artifact.main, args, capsys)


def plan(capsys: pytest.CaptureFixture[str], site: Site, reserve_mib: int = 0) -> dict[str, Any]:
    rc, result = run(capsys, state="plan", record_dir=str(site.records), staging_dir=str(site.staging),
                     reserve_mib=reserve_mib, artifacts=site.artifacts())
    assert rc == 0, result
    assert result["changed"] is False
    return result


def commit(capsys: pytest.CaptureFixture[str], site: Site, group: str, **args: Any) -> tuple[int, dict[str, Any]]:
    return run(capsys, state="commit", record_dir=str(site.records), staging_dir=str(site.staging),
               group=group, artifacts=site.artifacts(), **args)


def deploy(capsys: pytest.CaptureFixture[str], site: Site, group: str) -> dict[str, Any]:
    """plan, copy, commit: one run of artifacts.yml."""
    planned = plan(capsys, site)
    site.stage(planned["transfers"], planned["staging_dirs"])
    rc, result = commit(capsys, site, group)
    assert rc == 0, result
    return result


def mount_of(path: Path) -> str:
    """The mount point as df sees it."""
    out = subprocess.run(["df", "--output=target", str(path)], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[1].strip()


# plan ----------------------------------------------------------------------------------------------


def test_plan_on_a_new_host_lists_every_file_and_counts_it_on_the_mount_that_will_hold_it(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    result = plan(capsys, site)
    assert [(t["rel"], t["size"], t["src"]) for t in result["transfers"]] == [
        (rel, len(MODEL[rel]), str(site.src)) for rel in sorted(MODEL)]
    assert result["bytes_needed"] == sum(len(data) for data in MODEL.values())
    # /srv/vllm does not exist yet: its space is the space of the mount that will hold it.
    assert not site.data_dir.exists()
    assert result["mounts"] == {mount_of(site.root): result["bytes_needed"]}
    key = site.staging / "model-qwen"
    assert result["staging_dirs"] == [str(key), str(key / "tokenizer")]
    assert not site.staging.exists() and not site.records.exists()  # plan writes nothing


@needs_root
def test_placed_files_are_not_planned_again_until_they_or_the_manifest_change(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    deploy(capsys, site, group)
    with mock.patch.object(files_util, "sha256_file", wraps=files_util.sha256_file) as hashing:
        again = plan(capsys, site)
    assert again["transfers"] == [] and again["bytes_needed"] == 0 and again["mounts"] == {}
    assert hashing.call_count == 0  # judged by the record and a stat, not by re-hashing
    # Someone edits the served config in place, a minute later (same size, new mtime): it is copied again.
    served = site.dest / "config.json"
    placed_ns = served.stat().st_mtime_ns
    served.write_bytes(MODEL["config.json"].replace(b"64", b"99"))
    os.utime(served, ns=(placed_ns + 60 * 10**9, placed_ns + 60 * 10**9))
    assert [t["rel"] for t in plan(capsys, site)["transfers"]] == ["config.json"]
    deploy(capsys, site, group)
    assert served.read_bytes() == MODEL["config.json"]
    # A new tokenizer on the controller: only that file travels.
    site.write_src({"tokenizer/tokenizer.json": b'{"version": "2.0"}\n'})
    assert [t["rel"] for t in plan(capsys, site)["transfers"]] == ["tokenizer/tokenizer.json"]


def test_files_an_interrupted_run_staged_completely_are_not_copied_again(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    first = plan(capsys, site)
    site.stage(first["transfers"], first["staging_dirs"])
    # Killed while copying the weights: half of them arrived.
    weights = site.staging / "model-qwen" / "model.safetensors"
    weights.write_bytes(MODEL["model.safetensors"][: len(MODEL["model.safetensors"]) // 2])
    again = plan(capsys, site)
    assert [t["rel"] for t in again["transfers"]] == ["model.safetensors"]
    assert again["bytes_needed"] == len(MODEL["model.safetensors"])


def test_too_little_space_fails_before_any_copy_naming_mount_variable_and_fix(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    mount = mount_of(site.root)
    stats = os.statvfs(mount)
    reserve_mib = stats.f_bavail * stats.f_frsize // MIB + 1024  # more than the mount has free
    rc, result = run(capsys, state="plan", record_dir=str(site.records), staging_dir=str(site.staging),
                     reserve_mib=reserve_mib, artifacts=site.artifacts())
    assert rc == 1 and result["failed"] is True
    msg = result["msg"]
    assert msg.startswith(f"not enough disk space on {mount}: ")
    assert f"vllm_disk_reserve_mib={reserve_mib} MiB" in msg and "Nothing was copied." in msg
    assert "Free space on that mount or move vllm_data_dir." in msg
    assert result["mount"] == mount and result["needed_bytes"] == sum(len(data) for data in MODEL.values())
    assert not site.staging.exists()


@pytest.mark.parametrize("spare_bytes, fails", [(0, False), (-1, True)])
def test_the_copies_plus_the_reserve_must_fit_to_the_byte(
        site: Site, capsys: pytest.CaptureFixture[str], spare_bytes: int, fails: bool) -> None:
    needed = sum(len(data) for data in MODEL.values())
    real = os.statvfs(site.root)
    free = needed + 5 * MIB + spare_bytes
    # f_bavail (blocks for unprivileged users) counts, not f_bfree (root's reserved blocks too).
    fake = os.statvfs_result((1, 1, real.f_blocks, free + 10 * MIB, free, real.f_files, real.f_ffree,
                              real.f_favail, real.f_flag, real.f_namemax))
    with mock.patch.object(artifact.os, "statvfs", return_value=fake):
        rc, result = run(capsys, state="plan", record_dir=str(site.records), staging_dir=str(site.staging),
                         reserve_mib=5, artifacts=site.artifacts())
    assert (rc == 1) is fails, result
    if fails:
        assert result["needed_bytes"] == needed and "not enough disk space" in result["msg"]


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="needs a second mount: /dev/shm")
def test_each_mount_is_checked_for_the_copies_it_will_hold(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    (site.root / "adapter-src").mkdir()
    (site.root / "adapter-src" / "adapter_model.safetensors").write_bytes(b"\1" * 4096)
    adapter = {"kind": "adapter", "name": "alpha", "source": "controller", "src": str(site.root / "adapter-src"),
               "dest": f"/dev/shm/{site.root.name}-not-created/adapters/alpha",  # nothing is written there
               "files": {"adapter_model.safetensors": {"sha256": sha(b"\1" * 4096), "size": 4096}}}
    rc, result = run(capsys, state="plan", record_dir=str(site.records), staging_dir=str(site.staging),
                     reserve_mib=0, artifacts=site.artifacts() + [adapter])
    assert rc == 0, result
    assert result["mounts"] == {mount_of(site.root): sum(len(data) for data in MODEL.values()), "/dev/shm": 4096}
    assert not os.path.exists(adapter["dest"])


# commit --------------------------------------------------------------------------------------------


@needs_root
def test_commit_places_verified_files_for_the_service_group_and_records_them(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = deploy(capsys, site, group)
    assert result["changed"] is True
    assert sorted(result["items"]) == sorted(f"model-qwen/{rel}" for rel in MODEL)
    gid = grp.getgrnam(group).gr_gid
    record = site.record()
    assert record["dest"] == str(site.dest)
    for rel, data in MODEL.items():
        placed = site.dest / rel
        info = placed.stat()
        assert placed.read_bytes() == data
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, gid, 0o640)  # root-owned, group-readable
        assert record["files"][rel] == {"sha256": sha(data), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    for directory in (site.dest, site.dest / "tokenizer"):
        assert (directory.stat().st_gid, directory.stat().st_mode & 0o777) == (gid, 0o750)
    assert result["records"]["model-qwen"] == record["files"]
    assert not (site.staging / "model-qwen").exists()
    # Converged: the next run copies nothing and its commit changes nothing, not even the record.
    record_file = (site.records / "model-qwen.json").stat()
    rc, again = commit(capsys, site, group)
    assert rc == 0 and again["changed"] is False and again["items"] == []
    rewritten = (site.records / "model-qwen.json").stat()  # a rewrite is a rename: a new inode
    assert (rewritten.st_ino, rewritten.st_mtime_ns) == (record_file.st_ino, record_file.st_mtime_ns)


@needs_root
def test_a_corrupt_copy_is_deleted_and_named_and_the_served_file_stays(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    deploy(capsys, site, group)
    record_before = site.record()
    new_config = b'{"model_type": "qwen2", "hidden_size": 128}\n'
    site.write_src({"config.json": new_config})
    planned = plan(capsys, site)
    site.stage(planned["transfers"], planned["staging_dirs"])
    staged = site.staging / "model-qwen" / "config.json"
    damaged = new_config[:-2] + b"!\n"  # same size, a flipped byte on the way
    staged.write_bytes(damaged)
    rc, result = commit(capsys, site, group)
    assert rc == 1 and result["failed"] is True
    assert result["msg"] == (
        f"model-qwen: config.json arrived with sha256 {sha(damaged)}, the manifest says {sha(new_config)}; "
        "the staged copy was deleted, re-run to copy it again.")
    assert not staged.exists()
    assert (site.dest / "config.json").read_bytes() == MODEL["config.json"]
    assert site.record() == record_before
    # The re-run the message asks for: planned again, copied, placed.
    assert [t["rel"] for t in plan(capsys, site)["transfers"]] == ["config.json"]
    deploy(capsys, site, group)
    assert (site.dest / "config.json").read_bytes() == new_config


@needs_root
def test_a_file_neither_placed_nor_staged_is_named(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    planned = plan(capsys, site)
    site.stage([t for t in planned["transfers"] if t["rel"] != "model.safetensors"], planned["staging_dirs"])
    rc, result = commit(capsys, site, group)
    assert rc == 1
    assert result["msg"] == (f"model-qwen: model.safetensors was neither placed nor staged at "
                             f"{site.staging / 'model-qwen' / 'model.safetensors'}")
    assert not (site.records / "model-qwen.json").exists()


@needs_root
def test_files_the_manifest_no_longer_lists_are_removed(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    site.write_src({"pytorch_model.bin": b"old weights"})
    deploy(capsys, site, group)
    assert (site.dest / "pytorch_model.bin").exists()
    (site.src / "pytorch_model.bin").unlink()
    result = deploy(capsys, site, group)
    assert result["changed"] is True and result["items"] == ["model-qwen/pytorch_model.bin (removed)"]
    assert not (site.dest / "pytorch_model.bin").exists()
    assert set(site.record()["files"]) == set(MODEL)
    assert deploy(capsys, site, group)["changed"] is False


@needs_root
def test_check_mode_changes_nothing_and_needs_no_service_group_yet(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On a new host, install.yml creates the service group only when it really runs."""
    planned = plan(capsys, site)
    # In check mode the copy task copies nothing; here one file is left staged by an earlier run.
    site.stage([t for t in planned["transfers"] if t["rel"] == "config.json"], planned["staging_dirs"])
    rc, result = commit(capsys, site, "vllm-not-created-yet", _ansible_check_mode=True)
    assert rc == 0, result
    assert result["changed"] is True and sorted(result["items"]) == sorted(f"model-qwen/{rel}" for rel in MODEL)
    assert not site.dest.exists() and not site.records.exists()
    assert (site.staging / "model-qwen" / "config.json").read_bytes() == MODEL["config.json"]
    # A placed model with a file the manifest dropped: reported, not removed.
    deploy(capsys, site, group)
    (site.src / "config.json").unlink()
    rc, result = commit(capsys, site, "vllm-not-created-yet", _ansible_check_mode=True)
    assert rc == 0 and result["items"] == ["model-qwen/config.json (removed)"]
    assert (site.dest / "config.json").exists() and "config.json" in site.record()["files"]


def test_an_unknown_service_group_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    planned = plan(capsys, site)
    site.stage(planned["transfers"], planned["staging_dirs"])
    rc, result = commit(capsys, site, "vllm-not-created-yet")
    assert rc == 1 and "unknown owner or group" in result["msg"] and "vllm-not-created-yet" in result["msg"]
    assert not site.dest.exists()


# adopt ---------------------------------------------------------------------------------------------


def adopt(capsys: pytest.CaptureFixture[str], site: Site, path: Path,
          checksums: dict[str, str] | None = None, **args: Any) -> tuple[int, dict[str, Any]]:
    """As tasks/artifacts.yml adopts a vllm_lora_adapters entry with source: host."""
    item = {"kind": "adapter", "name": "alpha", "source": "host", "dest": str(path), "path": str(path),
            "checksums": checksums or {}}
    return run(capsys, state="adopt", record_dir=str(site.records), artifacts=[item], **args)


ADAPTER = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}\n',
    "adapter_model.safetensors": bytes(range(256)) * 16,
}


@pytest.fixture()
def host_adapter(tmp_path: Path) -> Path:
    path = tmp_path / "home-data" / "alpha"
    path.mkdir(parents=True)
    for rel, data in ADAPTER.items():
        (path / rel).write_bytes(data)
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return path


def test_adopt_records_a_host_directory_and_rehashes_only_what_changed(
        site: Site, host_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = adopt(capsys, site, host_adapter)
    assert rc == 0 and result["changed"] is True
    entry = result["records"]["adapter-alpha"]
    assert entry["hashed"] == 2
    assert entry["files"] == {rel: {"sha256": sha(data), "size": len(data)} for rel, data in ADAPTER.items()}
    record = json.loads((site.records / "adapter-alpha.json").read_text())
    assert record["dest"] == str(host_adapter)
    assert {rel: e["mtime_ns"] for rel, e in record["files"].items()} == {
        rel: (host_adapter / rel).stat().st_mtime_ns for rel in ADAPTER}
    # Converged: nothing hashed, nothing changed (no restart notified).
    rc, again = adopt(capsys, site, host_adapter)
    assert rc == 0 and again["changed"] is False and again["records"]["adapter-alpha"]["hashed"] == 0
    # The owner retrains the adapter in place: only that file is hashed again.
    new_weights = bytes(reversed(ADAPTER["adapter_model.safetensors"]))
    (host_adapter / "adapter_model.safetensors").write_bytes(new_weights)
    os.utime(host_adapter / "adapter_model.safetensors", ns=(1, 1))
    rc, third = adopt(capsys, site, host_adapter)
    assert rc == 0 and third["changed"] is True and third["records"]["adapter-alpha"]["hashed"] == 1
    assert third["records"]["adapter-alpha"]["files"]["adapter_model.safetensors"]["sha256"] == sha(new_weights)


def test_adopt_enforces_the_declared_checksums(
        site: Site, host_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {rel: sha(data) for rel, data in ADAPTER.items()}
    rc, result = adopt(capsys, site, host_adapter, checksums=good)
    assert rc == 0, result
    (site.records / "adapter-alpha.json").unlink()
    wrong = sha(b"the weights that were reviewed")
    rc, result = adopt(capsys, site, host_adapter, checksums={**good, "adapter_model.safetensors": wrong})
    assert rc == 1 and result["msg"] == (
        f"adapter-alpha: {host_adapter}/adapter_model.safetensors has sha256 "
        f"{good['adapter_model.safetensors']}, checksums say {wrong}")
    rc, result = adopt(capsys, site, host_adapter, checksums={**good, "tokenizer.json": wrong})
    assert rc == 1
    assert result["msg"] == f"adapter-alpha: tokenizer.json is listed in checksums but missing from {host_adapter}"
    assert not (site.records / "adapter-alpha.json").exists()


def test_adopt_names_a_path_that_is_no_directory(site: Site, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "home-data" / "typo"
    rc, result = adopt(capsys, site, missing)
    assert rc == 1
    assert result["msg"] == f"adapter-alpha: {missing} is not a directory on the host (source: host adopts it in place)"


def test_adopt_in_check_mode_reports_the_change_and_writes_no_record(
        site: Site, host_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = adopt(capsys, site, host_adapter, _ansible_check_mode=True)
    assert rc == 0 and result["changed"] is True
    assert result["records"]["adapter-alpha"]["files"]["adapter_config.json"]["sha256"] == sha(
        ADAPTER["adapter_config.json"])
    assert not site.records.exists()


# prune ---------------------------------------------------------------------------------------------


@pytest.fixture()
def adapter_dir(site: Site) -> Path:
    """/srv/vllm/adapters with alpha (declared), beta (dropped) and their records."""
    root = site.data_dir / "adapters"
    for name in ("alpha", "beta", ".partial-download"):
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
    site.records.mkdir(parents=True)
    for name in ("alpha", "beta"):
        (site.records / f"adapter-{name}.json").write_text("{}")
    (site.records / "model-beta.json").write_text("{}")  # another kind with the same name
    return root


def prune(capsys: pytest.CaptureFixture[str], site: Site, root: Path, keep: list[str],
          **args: Any) -> tuple[int, dict[str, Any]]:
    """As tasks/prune.yml calls it."""
    return run(capsys, state="prune", record_dir=str(site.records),
               prune_dirs=[{"dir": str(root), "kind": "adapter", "keep": keep}], **args)


def test_prune_removes_undeclared_adapters_and_their_records(
        site: Site, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = prune(capsys, site, adapter_dir, keep=["alpha"])
    assert rc == 0 and result["changed"] is True and result["removed"] == [str(adapter_dir / "beta")]
    assert sorted(p.name for p in adapter_dir.iterdir()) == [".partial-download", "alpha"]
    assert sorted(p.name for p in site.records.iterdir()) == ["adapter-alpha.json", "model-beta.json"]
    rc, again = prune(capsys, site, adapter_dir, keep=["alpha"])
    assert rc == 0 and again["changed"] is False and again["removed"] == []


def test_prune_keeps_content_folders_by_path_and_drops_a_record_only_with_its_folder(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """Adapters stored by content (name@digest): a kept release's folder of alpha stays beside the
    current one; a folder no release serves goes, and the record of its name only if it describes
    that folder (the record of alpha's current folder stays when an older alpha folder goes)."""
    root = site.data_dir / "adapters"
    folders = ["alpha@1111111111111111", "alpha@2222222222222222", "alpha@3333333333333333", "beta@4444444444444444"]
    for name in folders:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
    site.records.mkdir(parents=True)
    (site.records / "adapter-alpha.json").write_text(json.dumps({"files": {}, "dest": str(root / folders[1])}))
    (site.records / "adapter-beta.json").write_text(json.dumps({"files": {}, "dest": str(root / folders[3])}))
    # One spelled as an earlier release's argv may spell it (a data dir with a trailing slash).
    keep = [str(root / folders[0]).replace("/adapters/", "//adapters/"), str(root / folders[1])]
    rc, result = prune(capsys, site, root, keep=keep)
    assert rc == 0 and result["removed"] == [str(root / folders[2]), str(root / folders[3])], result
    assert sorted(p.name for p in root.iterdir()) == folders[:2]
    assert sorted(p.name for p in site.records.iterdir()) == ["adapter-alpha.json"]


def test_prune_in_check_mode_lists_and_removes_nothing(
        site: Site, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = prune(capsys, site, adapter_dir, keep=[], _ansible_check_mode=True)
    assert rc == 0 and result["changed"] is True
    assert result["removed"] == [str(adapter_dir / "alpha"), str(adapter_dir / "beta")]
    assert sorted(p.name for p in adapter_dir.iterdir()) == [".partial-download", "alpha", "beta"]
    assert (site.records / "adapter-beta.json").exists()


def test_prune_of_an_adapter_dir_not_made_yet_changes_nothing(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = prune(capsys, site, site.data_dir / "adapters", keep=[])
    assert rc == 0 and result["changed"] is False and result["removed"] == []


def test_prune_leaves_files_and_links_it_did_not_make_and_removes_the_adapters(
        site: Site, adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by this file's author: a plain file sorting after 'beta' made rmtree fail after beta was gone."""
    (adapter_dir / "notes.txt").write_text("the operator's\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep-me").write_text("x")
    (adapter_dir / "linked").symlink_to(outside)
    rc, result = prune(capsys, site, adapter_dir, keep=["alpha"])
    assert rc == 0 and result["removed"] == [str(adapter_dir / "beta")], result
    assert sorted(p.name for p in adapter_dir.iterdir()) == [".partial-download", "alpha", "linked", "notes.txt"]
    assert (outside / "keep-me").exists()


@needs_root
def test_check_mode_reports_a_corrupt_staged_copy_as_a_change_and_deletes_nothing(
        site: Site, group: str, capsys: pytest.CaptureFixture[str]) -> None:
    deploy(capsys, site, group)
    new_config = b'{"model_type": "qwen2", "hidden_size": 256}\n'
    site.write_src({"config.json": new_config})
    planned = plan(capsys, site)
    site.stage(planned["transfers"], planned["staging_dirs"])
    staged = site.staging / "model-qwen" / "config.json"
    staged.write_bytes(b"corrupt")  # an interrupted run's copy
    rc, result = commit(capsys, site, group, _ansible_check_mode=True)
    assert rc == 0 and result["changed"] is True and result["items"] == ["model-qwen/config.json"], result
    assert staged.read_bytes() == b"corrupt"
    assert (site.dest / "config.json").read_bytes() == MODEL["config.json"]

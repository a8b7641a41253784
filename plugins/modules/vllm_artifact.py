#!/usr/bin/python
"""Ansible module: place model/adapter files verified, atomically, without re-copying."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_artifact
short_description: Plan, commit, adopt and prune model and adapter directories on a vLLM host
description:
  - C(plan) compares each artifact's manifest with the record of what this module last placed
    (sizes and mtimes are checked, nothing is re-hashed) and lists the files to transfer. It also
    checks, before anything is copied, that the mount that really holds each destination has room.
  - C(commit) takes the transferred files from the staging directory, checks each sha256 against the
    manifest, moves it into place with a rename (a half-copied file is never in the served
    directory), removes files the manifest no longer lists, and records the result.
  - C(adopt) takes a directory already on the host as it is, hashing only files whose size or mtime
    changed since the last record (whether the service can read it is vllm_sandbox_probe's check).
  - C(prune) removes managed directories that are no longer declared.
options:
  state:
    description: What to do; see the description.
    type: str
    choices: [plan, commit, adopt, prune]
    required: true
  artifacts:
    description: List of {kind, name, dest, files} (plan, commit) or {kind, name, path, checksums} (adopt).
    type: list
    elements: dict
    default: []
  staging_dir:
    description: Where transferred files wait, in one C(<kind>-<name>) subdirectory per artifact; required for plan and commit.
    type: path
  record_dir:
    description: Holds one C(<kind>-<name>.json) record per artifact (the placed files' sha256, size and mtime).
    type: path
    required: true
  reserve_mib:
    description: MiB that must stay free on each destination mount after the copies (plan).
    type: int
    default: 1024
  owner:
    description: Owner of the directories commit creates (placed files are owned by root).
    type: str
    default: root
  group:
    description: Group of the directories and files commit places.
    type: str
    default: root
  prune_dirs:
    description:
      - For prune, {dir, keep, kind} entries (kind defaults to dir's name).
      - Subdirectories of dir not in keep (names or full paths) are removed, with their records.
    type: list
    elements: dict
    default: []
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Plan the copies
  vllm_artifact:
    state: plan
    record_dir: /var/lib/vllm-deploy/artifacts
    staging_dir: /srv/vllm/.staging
    artifacts:
      - {kind: model, name: qwen, dest: /srv/vllm/models/qwen, files: "{{ manifest.files }}"}
"""

RETURN = r"""
transfers:
  description: Files to copy, [{kind, name, rel, size, src}].
  type: list
  elements: dict
  returned: when state is plan
staging_dirs:
  description: Staging directories the transfers need.
  type: list
  elements: str
  returned: when state is plan
bytes_needed:
  description: Bytes to copy.
  type: int
  returned: when state is plan
mounts:
  description: "{mount point: bytes to copy onto it}."
  type: dict
  returned: when state is plan
items:
  description: Files placed or removed, as C(<kind>-<name>/<rel>).
  type: list
  elements: str
  returned: when state is commit
records:
  description: >-
    Per C(<kind>-<name>), the record after the call (commit), or C({files, hashed}) with the
    directory's manifest and the number of files hashed (adopt).
  type: dict
  returned: when state is commit or adopt
digests:
  description: >-
    Per C(<kind>/<name>), the adopted directory's content digest (sha256 over its file names and
    hashes, as vllm_manifest's digest): part of the release, so a change in place is a new release.
  type: dict
  returned: when state is adopt
removed:
  description: Directories removed.
  type: list
  elements: str
  returned: when state is prune
"""

import grp
import os
import pwd
import shutil
from typing import Any, Dict, List

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files import (
    build_manifest, manifest_digest, read_json, sha256_file, write_json_atomic)

FILE_MODE = 0o640
DIR_MODE = 0o750


def record_path(record_dir: str, artifact: Dict[str, Any]) -> str:
    return os.path.join(record_dir, f"{artifact['kind']}-{artifact['name']}.json")


def existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def mount_point(path: str) -> str:
    path = os.path.realpath(existing_ancestor(path))
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def file_is_current(dest: str, rel: str, want: Dict[str, Any], recorded: Dict[str, Any]) -> bool:
    """True when the placed file is the one the manifest wants, judged by the
    record (sha256 from when it was placed) plus a cheap stat: no re-hash."""
    if not recorded or recorded.get("sha256") != want["sha256"]:
        return False
    try:
        info = os.stat(os.path.join(dest, rel))
    except OSError:
        return False
    return info.st_size == recorded.get("size") and info.st_mtime_ns == recorded.get("mtime_ns")


def staged_is_complete(staging: str, rel: str, want: Dict[str, Any]) -> bool:
    path = os.path.join(staging, rel)
    return os.path.isfile(path) and os.path.getsize(path) == want["size"] and sha256_file(path) == want["sha256"]


def plan(module: AnsibleModule) -> None:
    params = module.params
    transfers: List[Dict[str, Any]] = []
    needed_by_mount: Dict[str, int] = {}
    for artifact in params["artifacts"]:
        record = read_json(record_path(params["record_dir"], artifact), {}).get("files", {})
        staging = os.path.join(params["staging_dir"], f"{artifact['kind']}-{artifact['name']}")
        for rel, want in sorted(artifact["files"].items()):
            if file_is_current(artifact["dest"], rel, want, record.get(rel, {})):
                continue
            if staged_is_complete(staging, rel, want):
                continue  # an earlier, interrupted run already brought it
            transfers.append({"kind": artifact["kind"], "name": artifact["name"], "rel": rel,
                              "size": want["size"], "src": artifact.get("src", "")})
            mount = mount_point(artifact["dest"])
            needed_by_mount[mount] = needed_by_mount.get(mount, 0) + int(want["size"])
    reserve = params["reserve_mib"] * 1024 * 1024
    for mount, needed in needed_by_mount.items():
        stats = os.statvfs(mount)
        free = stats.f_bavail * stats.f_frsize
        if needed + reserve > free:
            module.fail_json(
                msg=(
                    f"not enough disk space on {mount}: the copies need {needed / 2**20:.0f} MiB plus "
                    f"vllm_disk_reserve_mib={params['reserve_mib']} MiB, and {free / 2**20:.0f} MiB are free. "
                    "Nothing was copied. Free space on that mount or move vllm_data_dir."
                ),
                needed_bytes=needed, free_bytes=free, mount=mount,
            )
    staging_dirs = sorted({
        os.path.dirname(os.path.join(params["staging_dir"], f"{t['kind']}-{t['name']}", t["rel"])) for t in transfers
    })
    module.exit_json(
        changed=False, transfers=transfers, staging_dirs=staging_dirs,
        bytes_needed=sum(t["size"] for t in transfers),
        mounts=dict(needed_by_mount),
    )


def ids(module: AnsibleModule) -> tuple:
    try:
        uid = pwd.getpwnam(module.params["owner"]).pw_uid
        gid = grp.getgrnam(module.params["group"]).gr_gid
    except KeyError as error:
        module.fail_json(msg=f"unknown owner or group: {error}")
    return uid, gid


def make_dirs(path: str, uid: int, gid: int) -> None:
    if not os.path.isdir(path):
        make_dirs(os.path.dirname(path), uid, gid)
        os.mkdir(path, DIR_MODE)
        os.chown(path, uid, gid)


def commit(module: AnsibleModule) -> None:
    params = module.params
    # In check mode nothing is chowned, and on a new host the service user
    # exists only once install.yml has really run: do not look it up.
    uid, gid = (-1, -1) if module.check_mode else ids(module)
    changed_items: List[str] = []
    records: Dict[str, Any] = {}
    for artifact in params["artifacts"]:
        key = f"{artifact['kind']}-{artifact['name']}"
        rpath = record_path(params["record_dir"], artifact)
        record = read_json(rpath, {}).get("files", {})
        staging = os.path.join(params["staging_dir"], key)
        dest = artifact["dest"]
        new_record: Dict[str, Any] = {}
        for rel, want in sorted(artifact["files"].items()):
            target = os.path.join(dest, rel)
            if file_is_current(dest, rel, want, record.get(rel, {})):
                new_record[rel] = record[rel]
                continue
            staged = os.path.join(staging, rel)
            if not os.path.isfile(staged):
                if module.check_mode:
                    changed_items.append(f"{key}/{rel}")
                    continue
                module.fail_json(msg=f"{key}: {rel} was neither placed nor staged at {staged}")
            actual = sha256_file(staged)
            if actual != want["sha256"] and module.check_mode:
                # A real run would find it corrupt and copy it again: a change, nothing deleted.
                changed_items.append(f"{key}/{rel}")
                continue
            if actual != want["sha256"]:
                os.unlink(staged)
                module.fail_json(
                    msg=f"{key}: {rel} arrived with sha256 {actual}, the manifest says {want['sha256']}; "
                    "the staged copy was deleted, re-run to copy it again."
                )
            changed_items.append(f"{key}/{rel}")
            if not module.check_mode:
                make_dirs(os.path.dirname(target), uid, gid)
                os.chown(staged, 0, gid)
                os.chmod(staged, FILE_MODE)
                os.replace(staged, target)
                info = os.stat(target)
                new_record[rel] = {"sha256": want["sha256"], "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        if os.path.isdir(dest):
            for rel, _info in list(walk_all(dest)):
                if rel not in artifact["files"]:
                    changed_items.append(f"{key}/{rel} (removed)")
                    if not module.check_mode:
                        os.unlink(os.path.join(dest, rel))
        if not module.check_mode:
            make_dirs(dest, uid, gid)
            if new_record != record:
                write_json_atomic(rpath, {"files": new_record, "dest": dest})
            shutil.rmtree(staging, ignore_errors=True)
        records[key] = new_record
    module.exit_json(changed=bool(changed_items), items=changed_items, records=records)


def walk_all(root: str):
    for directory, _dirs, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(directory, name)
            yield os.path.relpath(path, root), None


def adopt(module: AnsibleModule) -> None:
    params = module.params
    changed = False
    records: Dict[str, Any] = {}
    digests: Dict[str, str] = {}
    for artifact in params["artifacts"]:
        key = f"{artifact['kind']}-{artifact['name']}"
        path = artifact["path"]
        if not os.path.isdir(path):
            module.fail_json(msg=f"{key}: {path} is not a directory on the host (source: host adopts it in place)")
        rpath = record_path(params["record_dir"], artifact)
        old = read_json(rpath, {}).get("files", {})
        files, new_cache, hashed = build_manifest(path, old)
        expected = artifact.get("checksums") or {}
        for rel, sha in expected.items():
            if rel not in files:
                module.fail_json(msg=f"{key}: {rel} is listed in checksums but missing from {path}")
            if files[rel]["sha256"] != sha:
                module.fail_json(msg=f"{key}: {path}/{rel} has sha256 {files[rel]['sha256']}, checksums say {sha}")
        # Whether the service can read it is asked the way the service meets it: vllm_sandbox_probe.
        if new_cache != old:
            changed = True
            if not module.check_mode:
                write_json_atomic(rpath, {"files": new_cache, "dest": path})
        records[key] = {"files": files, "hashed": hashed}
        digests[f"{artifact['kind']}/{artifact['name']}"] = manifest_digest(files)
    module.exit_json(changed=changed, records=records, digests=digests)


def prune(module: AnsibleModule) -> None:
    removed: List[str] = []
    for entry in module.params["prune_dirs"]:
        root = entry["dir"]
        # Paths compared as paths: /srv/vllm//adapters/a@x (a data dir spelled with a trailing
        # slash in an earlier release) is the folder /srv/vllm/adapters/a@x.
        keep = {os.path.normpath(k) if "/" in k else k for k in entry.get("keep") or []}
        kind = entry.get("kind", os.path.basename(root.rstrip("/")))
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            # The role makes only directories here; a file or a link someone put there is not an
            # adapter and not ours to remove (rmtree would fail on it half-way through the list).
            # keep names folders by name or by path (adapters stored by content: name@digest).
            if name in keep or os.path.normpath(path) in keep or name.startswith(".") or os.path.islink(path) \
                    or not os.path.isdir(path):
                continue
            removed.append(path)
            if not module.check_mode:
                shutil.rmtree(path)
                # The record of the adapter's name, when it describes this folder.
                record = os.path.join(module.params["record_dir"], f"{kind}-{name.split('@', 1)[0]}.json")
                if os.path.exists(record) and read_json(record, {}).get("dest", path) == path:
                    os.unlink(record)
    module.exit_json(changed=bool(removed), removed=removed)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["plan", "commit", "adopt", "prune"]},
            "artifacts": {"type": "list", "elements": "dict", "default": []},
            "staging_dir": {"type": "path"},
            "record_dir": {"type": "path", "required": True},
            "reserve_mib": {"type": "int", "default": 1024},
            "owner": {"type": "str", "default": "root"},
            "group": {"type": "str", "default": "root"},
            "prune_dirs": {"type": "list", "elements": "dict", "default": []},
        },
        required_if=[("state", "plan", ["staging_dir"]), ("state", "commit", ["staging_dir"])],
        supports_check_mode=True,
    )
    {"plan": plan, "commit": commit, "adopt": adopt, "prune": prune}[module.params["state"]](module)


if __name__ == "__main__":
    main()

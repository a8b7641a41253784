#!/usr/bin/python
"""Ansible module: releases of a vLLM host (activate, roll back, keep the last N)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_release
short_description: Activate, roll back and prune vLLM releases on a host
description:
  - A release is a directory C(releases/<id>) holding C(release.json) (software id, venv, the
    C(vllm serve) argv, adapters, artifact digests) and the unit rendered for it. Its id is a
    hash of that content, so the same declaration gives the same id on every host and a
    converged host makes no new release.
  - C(activate) points C(current) at a release (atomic symlink swap), moves it to the end of
    the history and removes releases beyond the last O(keep) and venvs no kept release uses.
  - C(rollback) finds the release to return to (the previous one, or a named one) without
    changing anything; the caller installs its unit and activates it.
options:
  state:
    description: C(activate) a release, or find the C(rollback) target (changes nothing).
    type: str
    choices: [activate, rollback]
    required: true
  software_dir:
    description: Holds releases/, venvs/ and the current symlink.
    type: path
    required: true
  release_id:
    description: The release to activate (12 lowercase hex characters, as the role makes it).
    type: str
  to:
    description: For rollback, C(previous) or a release id.
    type: str
    default: previous
  keep:
    description: Releases to keep (the current one always stays).
    type: int
    default: 3
  discard:
    description: With activate, a release that failed and never served; it leaves the history and the disk,
      so a later "previous" rollback can never land on it.
    type: str
    default: ""
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Activate the release
  vllm_release:
    state: activate
    software_dir: /opt/vllm
    release_id: 3f2a9c1b7d0e
"""

RETURN = r"""
current:
  description: The active release id after the call.
  type: str
  returned: always
previous:
  description: The release active before the call (for rollback, the one it would roll back from).
  type: str
  returned: always
history:
  description: Release ids, oldest first, current last.
  type: list
  returned: always
target:
  description: For rollback, the release record of the target (with its id and dir).
  type: dict
  returned: when state is rollback
removed:
  description: Releases and venvs removed.
  type: list
  returned: always
adapter_paths_in_use:
  description: The adapter folders some kept release serves (the paths of its --lora-modules; their files must stay).
  type: list
  returned: when state is activate
"""

import os
import re
import shutil
from typing import Any, Dict, List, Optional

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_argv import lora_module_paths
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files import read_json, write_json_atomic


# What roles/vllm/vars/main.yml makes: the first 12 hex characters of a sha256.
# Ids are joined into paths under releases/ that activate may remove, so
# nothing else ("../venvs/x", "/etc", a trailing newline) may pass.
RELEASE_ID = re.compile(r"[0-9a-f]{12}")


def release_id_problem(params: Dict[str, Any]) -> Optional[str]:
    """Pure: a message naming the first parameter that is not a release id, or None."""
    # Each parameter with the words it may carry besides an id ("" = discard nothing).
    for name, words in (("release_id", ()), ("discard", ("",)), ("to", ("previous",))):
        value = params.get(name)
        if value is None or value in words or RELEASE_ID.fullmatch(value):
            continue
        also = "".join(f" or {word!r}" for word in words)
        return (f"{name}={value!r} is not a release id: ids are the 12 lowercase hex characters the role "
                f"names releases/<id> with. Fix: pass an id from releases/history.json{also}.")
    return None


def history_path(software_dir: str) -> str:
    return os.path.join(software_dir, "releases", "history.json")


def current_id(software_dir: str) -> str:
    link = os.path.join(software_dir, "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else ""


def load_history(software_dir: str) -> List[str]:
    history = read_json(history_path(software_dir), {}).get("history", [])
    releases = os.path.join(software_dir, "releases")
    return [rid for rid in history if os.path.isfile(os.path.join(releases, rid, "release.json"))]


def plan_activate(history: List[str], release_id: str, keep: int) -> Dict[str, Any]:
    """Pure: the history after activating release_id, and what falls out of it."""
    previous = history[-1] if history else ""
    new_history = [rid for rid in history if rid != release_id] + [release_id]
    kept = new_history[-max(keep, 1):]
    return {"history": kept, "dropped": [rid for rid in new_history if rid not in kept], "previous": previous}


def rollback_target(history: List[str], current: str, to: str) -> str:
    """Pure: the release a rollback returns to, or '' when there is none."""
    if to != "previous":
        return to if to in history and to != current else ""
    candidates = [rid for rid in history if rid != current]
    return candidates[-1] if candidates else ""


def swap_symlink(target: str, link: str) -> None:
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def paths_in_use(releases: str, history: List[str]) -> List[str]:
    """The adapter folders the releases of `history` serve (their --lora-modules)."""
    return sorted({path for rid in history
                   for path in lora_module_paths(read_json(os.path.join(releases, rid, "release.json"), {}).get("argv", []))})


def activate(module: AnsibleModule) -> None:
    params = module.params
    software_dir, release_id = params["software_dir"], params["release_id"]
    releases = os.path.join(software_dir, "releases")
    if release_id and module.check_mode and not os.path.isfile(os.path.join(releases, release_id, "release.json")):
        # A new release in check mode: its record would have been written by the task before.
        current = current_id(software_dir)
        history = load_history(software_dir)
        # What the kept releases serve stays, as in a real run (prune's check mode lists the rest).
        module.exit_json(changed=True, current=release_id, previous=current, history=history,
                         removed=[], adapter_paths_in_use=paths_in_use(releases, history))
    if not release_id or not os.path.isfile(os.path.join(releases, release_id, "release.json")):
        module.fail_json(msg=f"release {release_id!r} has no {releases}/{release_id}/release.json")
    history = load_history(software_dir)
    discard = params["discard"]
    if discard and discard != release_id and discard in history:
        history = [rid for rid in history if rid != discard]
    plan = plan_activate(history, release_id, params["keep"])
    if discard and discard != release_id and os.path.isdir(os.path.join(releases, discard)):
        plan["dropped"].append(discard)
    current = current_id(software_dir)
    changed = current != release_id or plan["history"] != history or bool(plan["dropped"])
    removed: List[str] = []
    kept_venvs = {read_json(os.path.join(releases, rid, "release.json"), {}).get("venv") for rid in plan["history"]}
    for rid in plan["dropped"]:
        removed.append(os.path.join(releases, rid))
    venvs = os.path.join(software_dir, "venvs")
    if os.path.isdir(venvs):
        for name in sorted(os.listdir(venvs)):
            path = os.path.join(venvs, name)
            if os.path.isdir(path) and path not in kept_venvs and os.path.exists(os.path.join(path, ".complete")):
                removed.append(path)
    changed = changed or bool(removed)
    if changed and not module.check_mode:
        write_json_atomic(history_path(software_dir), {"history": plan["history"]})
        swap_symlink(os.path.join("releases", release_id), os.path.join(software_dir, "current"))
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
            if path.startswith(venvs) and os.path.exists(path + ".requirements.txt"):
                os.unlink(path + ".requirements.txt")
    module.exit_json(changed=changed, current=release_id, previous=current or plan["previous"],
                     history=plan["history"], removed=removed, adapter_paths_in_use=paths_in_use(releases, plan["history"]))


def rollback(module: AnsibleModule) -> None:
    software_dir = module.params["software_dir"]
    history = load_history(software_dir)
    current = current_id(software_dir)
    target = rollback_target(history, current, module.params["to"])
    if not target:
        module.fail_json(
            msg=f"no release to roll back to (asked for {module.params['to']!r}; current {current or 'none'}, "
                f"history {history}). Name one of the history's ids with -e vllm_rollback_to=<id>.",
            history=history, current=current,
        )
    record = read_json(os.path.join(software_dir, "releases", target, "release.json"), {})
    record.update({"id": target, "dir": os.path.join(software_dir, "releases", target)})
    module.exit_json(changed=False, current=current, previous=current, history=history, target=record, removed=[])


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["activate", "rollback"]},
            "software_dir": {"type": "path", "required": True},
            "release_id": {"type": "str"},
            "to": {"type": "str", "default": "previous"},
            "keep": {"type": "int", "default": 3},
            "discard": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    problem = release_id_problem(module.params)
    if problem:
        module.fail_json(msg=problem)  # before anything is read, written or removed
    {"activate": activate, "rollback": rollback}[module.params["state"]](module)


if __name__ == "__main__":
    main()

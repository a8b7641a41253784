#!/usr/bin/python
"""Ansible module: is the running service older than the files it reads?"""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_service_freshness
short_description: Tell whether a running service started before its configuration last changed
description:
  - A run killed after it changed what the service reads (unit, environment file, current release)
    but before its restart handler ran would leave the old process serving, and the next run would find
    nothing to change. This compares the newest mtime of O(paths) with the main process's start time,
    or with the mtime of O(applied_marker) when that is later (a change applied live), so the next run
    restarts it.
  - With O(expected), it also tells which files differ from the content they must have (by sha256),
    in the same call (the unit files rendered on the controller, compared before anything is written).
  - Read-only; C(stale) is for C(changed_when) and C(notify).
options:
  service:
    description: The systemd unit.
    type: str
    required: true
  paths:
    description: Files (or symlinks, by their own mtime) the service reads.
    type: list
    elements: path
    required: true
  applied_marker:
    description: A file touched when a change was applied to the running service without a restart.
    type: path
  expected:
    description: "{path: sha256 of the content it must have}: a missing or unreadable file differs."
    type: dict
    default: {}
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Restart a service older than its configuration
  vllm_service_freshness:
    service: vllm
    paths: [/etc/systemd/system/vllm.service, /etc/vllm/vllm.env, /opt/vllm/current]
  register: freshness
  changed_when: freshness.stale
"""

RETURN = r"""
stale:
  description: The service runs and started before the newest path changed.
  type: bool
  returned: always
newest:
  description: The newest path.
  type: str
  returned: always
differs:
  description: The paths of O(expected) whose content is not the expected one (or that are missing), sorted.
  type: list
  elements: str
  returned: always
"""

import os
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files import sha256_file


def main_start_epoch(service: str) -> Optional[float]:
    """Wall-clock start of the main process, or None when it does not run."""
    out = subprocess.run(
        ["systemctl", "show", service, "-p", "MainPID,ExecMainStartTimestampMonotonic"],
        capture_output=True, text=True, check=False,
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if int(values.get("MainPID", "0") or 0) == 0:
        return None
    started_mono = int(values.get("ExecMainStartTimestampMonotonic", "0") or 0) / 1e6
    return time.time() - (time.clock_gettime(time.CLOCK_MONOTONIC) - started_mono)


def newest(paths: List[str]) -> Tuple[str, float]:
    best, when = "", 0.0
    for path in paths:
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            continue
        if mtime > when:
            best, when = path, mtime
    return best, when


def differing(expected: Dict[str, str]) -> List[str]:
    """The paths whose content's sha256 is not the expected one (a missing or unreadable file differs)."""
    found = []
    for path, digest in sorted(expected.items()):
        try:
            actual = sha256_file(path)
        except OSError:
            actual = ""
        if actual != digest:
            found.append(path)
    return found


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "service": {"type": "str", "required": True},
            "paths": {"type": "list", "elements": "path", "required": True},
            "applied_marker": {"type": "path"},
            "expected": {"type": "dict", "default": {}},
        },
        supports_check_mode=True,
    )
    differs = differing(module.params["expected"])
    started = main_start_epoch(module.params["service"])
    path, mtime = newest(module.params["paths"])
    if started is None:
        module.exit_json(changed=False, stale=False, newest=path, differs=differs, msg="the service does not run")
    marker = module.params["applied_marker"]
    if marker and os.path.exists(marker):
        started = max(started, os.stat(marker).st_mtime)
    # One second of slack: file systems and clocks round differently.
    stale = mtime > started + 1
    module.exit_json(changed=False, stale=stale, newest=path, differs=differs,
                     msg=f"{path} changed after the service started" if stale else "the service is current")


if __name__ == "__main__":
    main()

#!/usr/bin/python
"""Can the service read its adopted folders, as its own user, under its own sandbox?"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vllm_sandbox_probe
short_description: Check that a sandboxed systemd service can read every file of some directories
description:
  - Runs a small reader with C(systemd-run) as the service's user and group, with the unit's own
    sandbox properties (ProtectHome=, ProtectSystem=, PrivateTmp=, BindReadOnlyPaths=, ...), and
    reads one byte of every file under each directory. A check made as root from Unix modes cannot
    tell what the sandbox hides, and vLLM reports an unreadable model as a hub repo id or "No such file".
  - When something cannot be read, the reader runs again without the sandbox to tell what refuses
    it (the sandbox, or the file's permissions), and the module fails naming the path, the cause and the fix.
  - Changes nothing (a transient unit, collected when it ends). Runs in check mode too.
options:
  user:
    description: The service's user; the reader runs as it.
    type: str
    required: true
  group:
    description: The service's group; the reader runs with it.
    type: str
    required: true
  properties:
    description: The unit's sandbox, C(Key=Value) strings, as in the unit file.
    type: list
    elements: str
    default: []
  artifacts:
    description: "[{kind, name, path}]: directories the service must read."
    type: list
    elements: dict
    required: true
  python:
    description: The Python interpreter on the host that runs the reader.
    type: path
    default: /usr/bin/python3
  timeout:
    description: Seconds each read probe may take (also the transient unit's C(RuntimeMaxSec)).
    type: int
    default: 300
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Check that the service can read the adopted model
  vllm_sandbox_probe:
    user: vllm
    group: vllm
    properties: [ProtectHome=tmpfs, BindReadOnlyPaths=/home/beelink/models/qwen]
    artifacts: [{kind: model, name: qwen, path: /home/beelink/models/qwen}]
"""

RETURN = r"""
files:
  description: Number of files read under the sandbox.
  type: int
  returned: success
"""

import grp
import json
import os
import pwd
import stat
import subprocess
from typing import Any, Dict, List, Set

from ansible.module_utils.basic import AnsibleModule

# Runs inside the sandbox: reads a byte of each file, lists each directory,
# prints [{path, error}] for what it could not. Stays within a few hundred
# entries of output however broken the tree is.
READER = r"""
import json, os, stat, sys
bad, count = [], 0
def note(path, error):
    if len(bad) < 200:
        bad.append({"path": path, "error": "%s: %s" % (type(error).__name__, error.strerror or error)})
for root in sys.argv[1:]:
    try:
        os.listdir(root)
    except OSError as error:
        note(root, error)
        continue
    for directory, dirs, files in os.walk(root, onerror=lambda error: note(error.filename, error), followlinks=True):
        if count > 100000:
            break
        for name in files:
            path = os.path.join(directory, name)
            try:
                # Only regular files: a FIFO or device node would block the read.
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
                with open(path, "rb") as handle:
                    handle.read(1)
                count += 1
            except OSError as error:
                note(path, error)
print(json.dumps({"files": count, "bad": bad}))
"""


def run_reader(module: AnsibleModule, properties: List[str], paths: List[str]) -> Dict[str, Any]:
    command = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec",
               "-p", f"RuntimeMaxSec={module.params['timeout']}"]
    for prop in properties:
        command += ["-p", prop]
    command += ["--", module.params["python"], "-c", READER] + paths
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=module.params["timeout"],
                                stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        module.fail_json(msg=f"the read probe did not finish within {module.params['timeout']} s: {paths}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        module.fail_json(msg="could not run the read probe as the service would (systemd-run exited "
                         f"{result.returncode}): {result.stderr.strip()[-1500:]}", cmd=command[:-len(paths) - 2])
    return json.loads(lines[-1])


def describe(path: str) -> str:
    """Owner, group and mode of a path (and its link target), as root sees it."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"({error.strerror})"
    text = f"{owner_name(info.st_uid)}:{group_name(info.st_gid)} {stat.S_IMODE(info.st_mode):04o}"
    if stat.S_ISLNK(info.st_mode):
        text += f", a symlink to {os.path.realpath(path)}"
    return text


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def owner_of(path: str, artifacts: List[Dict[str, Any]]) -> Dict[str, Any]:
    for artifact in artifacts:
        root = str(artifact["path"]).rstrip("/")
        if path == root or path.startswith(root + "/"):
            return artifact
    return artifacts[0]


def explain(entry: Dict[str, str], hidden: bool, artifact: Dict[str, Any], user: str, group: str) -> str:
    path, root = entry["path"], str(artifact["path"]).rstrip("/")
    who = f"{artifact['kind']} '{artifact['name']}'"
    head = f"{who}: {path} ({describe(path)}): the service (user {user}, in its sandbox) cannot read it: {entry['error']}."
    if hidden:
        return (f"{head} User {user} can read it outside the sandbox, so the unit's sandbox hides it: the service sees"
                f" only the declared folders under /home, /root and /run/user (bound read-only), and"
                f" {os.path.realpath(path)} lies outside {root}. Fix: keep the real files inside the declared"
                f" folder (e.g. replace symlinks with the files: cp -rL), or declare the folder that holds them.")
    return (f"{head} User {user} is refused outside the sandbox too: the file permissions deny it. Fix: let the"
            f" service read the folder, e.g. `setfacl -R -m u:{user}:rX {root}` (package acl), or"
            f" `chgrp -R {group} {root} && chmod -R g+rX {root}`, or add {user} to the folder's group"
            f" (`usermod -aG <group> {user}`); or copy it from the controller instead (source: controller).")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "user": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "properties": {"type": "list", "elements": "str", "default": []},
            "artifacts": {"type": "list", "elements": "dict", "required": True},
            "python": {"type": "path", "default": "/usr/bin/python3"},
            "timeout": {"type": "int", "default": 300},
        },
        supports_check_mode=True,
    )
    user, group, artifacts = module.params["user"], module.params["group"], module.params["artifacts"]
    if not artifacts:
        module.exit_json(changed=False, files=0)
    try:
        pwd.getpwnam(user)
    except KeyError:
        # Only in a run that has not created the user yet (check mode on a new host, --tags verify).
        module.exit_json(changed=False, files=0, skipped=True, msg=f"user {user} does not exist yet: nothing to probe")
    identity = [f"User={user}", f"Group={group}"]
    paths = [str(artifact["path"]) for artifact in artifacts]
    for artifact, path in zip(artifacts, paths):
        if not os.path.isdir(path):
            module.fail_json(msg=f"{artifact['kind']} '{artifact['name']}': {path} is not a directory on the host"
                             " (source: host adopts a folder already there). Fix the path, or use source: controller.")
    sandboxed = run_reader(module, identity + module.params["properties"], paths)
    if not sandboxed["bad"]:
        module.exit_json(changed=False, files=sandboxed["files"])
    # What refuses it: the same user outside the sandbox reads it, or the
    # sandbox answered "no such file" for a file root sees: the sandbox.
    plain = run_reader(module, identity, paths)
    refused_plainly = {entry["path"] for entry in plain["bad"]}
    problems: List[str] = [
        explain(entry, hidden_by_sandbox(entry, refused_plainly), owner_of(entry["path"], artifacts), user, group)
        for entry in sandboxed["bad"][:10]
    ]
    more = len(sandboxed["bad"]) - 10
    module.fail_json(msg=" ".join(problems) + (f" ({more} more)" if more > 0 else "")
                     + " The service and its unit were not changed.", unreadable=sandboxed["bad"])


def hidden_by_sandbox(entry: Dict[str, str], refused_plainly: Set[str]) -> bool:
    """The sandbox, not the permissions, keeps the service from the file."""
    path = entry["path"]
    if entry["error"].startswith("FileNotFoundError") and os.path.exists(path):
        return True
    # Outside the sandbox a refusal of a parent folder stands for all below it.
    return not any(path == bad or path.startswith(bad.rstrip("/") + "/") for bad in refused_plainly)


if __name__ == "__main__":
    main()

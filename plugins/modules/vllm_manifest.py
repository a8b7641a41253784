#!/usr/bin/python
"""Ansible module: sha256 manifest of a directory on the controller, cached."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_manifest
short_description: sha256 manifest of a model or adapter directory, hashed once
description:
  - Lists every regular file below O(path) (names starting with '.' skipped) with its size and sha256.
  - Hashes are cached in O(cache_dir) keyed by size and mtime, so a no-op run re-hashes nothing,
    even for multi-GB weights. Run it on the controller (delegate_to localhost).
options:
  path:
    description: Absolute path of the directory.
    type: path
    required: true
  cache_dir:
    description: Where the hash cache lives.
    type: path
    default: ~/.cache/vllm-lora-ansible/manifests
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Manifest of the model on the controller
  vllm_manifest:
    path: /data/models/Qwen2.5-7B-Instruct-AWQ
  delegate_to: localhost
  register: model_manifest
"""

RETURN = r"""
files:
  description: "{relative path: {sha256, size}}"
  type: dict
  returned: always
digest:
  description: sha256 over the sorted names and file hashes.
  type: str
  returned: always
bytes:
  description: Total size.
  type: int
  returned: always
hashed:
  description: Files hashed in this run (0 when the cache was valid).
  type: int
  returned: always
"""

import hashlib
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files import build_manifest, manifest_digest, read_json, write_json_atomic


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "cache_dir": {"type": "path", "default": "~/.cache/vllm-lora-ansible/manifests"},
        },
        supports_check_mode=True,
    )
    path = os.path.realpath(module.params["path"])
    if not os.path.isdir(path):
        module.fail_json(msg=f"{module.params['path']} is not a directory on the controller")
    cache_dir = module.params["cache_dir"]  # type path: ~ is already expanded
    cache_file = os.path.join(cache_dir, hashlib.sha256(path.encode()).hexdigest()[:24] + ".json")
    cache = read_json(cache_file, {})
    files, new_cache, hashed = build_manifest(path, cache.get("files", {}))
    if not files:
        module.fail_json(msg=f"{path} holds no files")
    if hashed:
        write_json_atomic(cache_file, {"path": path, "files": new_cache})
    module.exit_json(
        changed=False, path=path, files=files, digest=manifest_digest(files),
        bytes=sum(entry["size"] for entry in files.values()), hashed=hashed,
    )


if __name__ == "__main__":
    main()

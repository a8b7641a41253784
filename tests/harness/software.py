"""The test hosts' shared software layer: base image + the vLLM venv, built by
the project's own role (site.yml --tags software) and committed once.

One ~7.5 GB venv in one image layer that every test host shares, instead of
one per host; the role then finds each host's software already converged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import docker

from tests.harness import image
from tests.harness.ansible import REPO, run_playbook
from tests.harness.hosts import HostPool, commit, write_inventory
from tests.vllm_cpu import wheelhouse

LOCAL_GROUP_VARS = REPO / "inventory" / "local" / "group_vars"


def software_tag() -> str:
    """Changes with the base image, the lock file, the install tasks and the local declaration."""
    recipe = "\n".join([
        image.base_tag(), wheelhouse.lock_hash(),
        hashlib.sha256((REPO / "roles/vllm/tasks/install.yml").read_bytes()).hexdigest(),
        hashlib.sha256((LOCAL_GROUP_VARS / "vllm_servers.yml").read_bytes()).hexdigest(),
    ])
    return f"{image.REPO}:sw-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def ensure_software_image(workdir: Path, vars_file: Path, log: Path | None = None) -> str:
    tag = software_tag()
    try:
        docker.from_env().images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    with HostPool(image=image.build_base(), count=1, prefix="vllm-swimage") as pool:
        inventory = write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS)
        result = run_playbook("site.yml", inventory, extra_args=["--tags", "software"],
                              extra_vars_files=[vars_file], log=log)
        if result.rc != 0:
            raise RuntimeError(f"building {tag} failed:\n{result.tail()}")
        commit(pool.hosts[0], tag)
    return tag

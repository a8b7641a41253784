"""Test hosts: Debian 12 containers that boot systemd, reached by Ansible.

Every container carries a label with this run's id, so ``HostPool`` removes
exactly its own containers at the end (even when a test fails) and a later run
removes any left over by a run that was killed.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container

LABEL = "io.vllm-lora-ansible.testhost"
OWNER = "io.vllm-lora-ansible.owner-pid"
CACHE = Path(os.environ.get("VLLM_LORA_CACHE", "/var/cache/vllm-lora-ansible"))
WHEELHOUSE_IN_HOST = "/srv/wheelhouse"


def wheelhouse_mount() -> dict[str, dict[str, str]]:
    """The controller's wheelhouse, read-only, where the local inventory expects it."""
    return {str(CACHE / "wheelhouse"): {"bind": WHEELHOUSE_IN_HOST, "mode": "ro"}}


@dataclass
class TestHost:
    """One running container; ``name`` is also its Ansible inventory name."""

    name: str
    container: Container

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the host (docker exec), bounded in time."""
        result = subprocess.run(
            ["docker", "exec", self.name, "sh", "-c", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name}: `{command}` exited {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def system_state(self, timeout: float = 90) -> str:
        """`systemctl is-system-running --wait`, retried while systemd's bus is not up yet."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip()
            if state and state not in ("offline", "unknown"):
                return state
            time.sleep(0.5)
        return state


def remove_stale(client: docker.DockerClient, run_id: str | None = None) -> int:
    """Remove test-host containers: those of one run, or (no run_id) those of
    this process and of processes that no longer exist (a killed earlier run).
    Containers of another live test session are left alone."""
    removed = 0
    filters = {"label": f"{LABEL}={run_id}" if run_id else LABEL}
    for container in client.containers.list(all=True, filters=filters):
        owner = container.labels.get(OWNER, "")
        if run_id is None and owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
            continue
        container.remove(force=True, v=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_host(
    client: docker.DockerClient, name: str, image: str, run_id: str,
    volumes: dict[str, dict[str, str]] | None = None, test_host: bool = True,
) -> TestHost:
    """Start one container the way that boots systemd in this sandbox.

    ``--privileged`` fails here (no CAP_SYS_RESOURCE), so: SYS_ADMIN + NET_ADMIN,
    seccomp unconfined, the host's cgroup namespace and a writable cgroupfs.
    """
    container = client.containers.run(
        image, command=["/sbin/init"], name=name, hostname=name, detach=True,
        # The demo host is not a test host: test runs never remove it.
        labels={LABEL: run_id, OWNER: str(os.getpid())} if test_host else {"io.vllm-lora-ansible.demo": run_id},
        cap_add=["SYS_ADMIN", "NET_ADMIN"],
        security_opt=["seccomp=unconfined"], cgroupns="host",
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}, **(volumes or {})},
        tmpfs={"/run": "", "/run/lock": "", "/tmp": ""},
        environment={"container": "docker"}, stop_signal="SIGRTMIN+3",
    )
    return TestHost(name=name, container=container)


@dataclass
class HostPool:
    """N hosts from one image; use as a context manager."""

    image: str
    count: int = 1
    prefix: str = "vllm-test"
    volumes: dict[str, dict[str, str]] = field(default_factory=wheelhouse_mount)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    hosts: list[TestHost] = field(default_factory=list)

    def __enter__(self) -> HostPool:
        client = docker.from_env()
        try:
            for index in range(1, self.count + 1):
                name = f"{self.prefix}-{self.run_id}-{index}"
                self.hosts.append(start_host(client, name, self.image, self.run_id, self.volumes))
            for host in self.hosts:
                state = host.system_state()
                if state not in ("running", "degraded"):
                    raise RuntimeError(f"{host.name}: systemd state {state!r}")
        except BaseException:
            remove_stale(client, self.run_id)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        remove_stale(docker.from_env(), self.run_id)

    @property
    def names(self) -> list[str]:
        return [host.name for host in self.hosts]


def write_inventory(
    directory: Path, hosts: Sequence[str], group: str = "vllm_servers",
    group_vars_from: Path | None = None, host_vars: dict[str, dict[str, object]] | None = None,
    extra_groups: dict[str, Sequence[str]] | None = None,
) -> Path:
    """An inventory for containers reached through ``community.docker.docker``.

    ``group_vars_from`` (e.g. the repo's inventory/local/group_vars) is linked
    in, so tests run with the same declaration the demo uses.
    """
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    if group_vars_from is not None:
        link = directory / "group_vars"
        if not link.exists():
            link.symlink_to(group_vars_from.resolve())
    def entries(names: Sequence[str]) -> dict[str, dict[str, object]]:
        return {
            name: {
                "ansible_connection": "community.docker.docker",
                "ansible_host": name,
                "ansible_python_interpreter": "/usr/bin/python3",
                **(host_vars or {}).get(name, {}),
            }
            for name in names
        }

    groups = {group: hosts, **(extra_groups or {})}
    inventory: dict[str, Any] = {"all": {"children": {name: {"hosts": entries(members)} for name, members in groups.items()}}}
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def commit(host: TestHost, tag: str) -> str:
    """Freeze a converged host into an image layer other hosts share."""
    # The CLI, not the SDK: committing a ~9 GB layer outlasts the SDK's 60 s read timeout.
    subprocess.run(["docker", "commit", "--change", 'CMD ["/sbin/init"]', host.name, tag],
                   check=True, capture_output=True, timeout=1800)
    return tag

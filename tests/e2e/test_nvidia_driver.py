"""The nvidia_driver role for real, on a Debian 12 systemd test host without GPU.

The source is Debian's own archive (the CUDA repository is out of reach here), with the
branch-named nvidia-tesla-<branch>-* userspace packages: the container's kernel is the
machine's, so no DKMS module can be built for it (nvidia_driver_kernel_module: false).
Everything else is the role's real path: the non-free repositories, the branch pin,
the holds, the nouveau blacklist and its initramfs handler, the Secure Boot read
("EFI variables are not supported" = off), nvidia-persistenced, the local fact; then
idempotence, a clean --check --diff, the GPU gate refusing the host for want of a GPU,
and a branch upgrade 470 -> 535 that unholds, installs, removes the old branch, re-holds.

The tests share one host and run in order (each stage builds on the previous one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.ansible import REPO, PlayResult, run_playbook
from tests.harness import hosts
from tests.harness.hosts import HostPool, write_inventory
from tests.harness.image import base_tag

pytestmark = pytest.mark.e2e

LOG = Path(os.environ.get("VLLM_LORA_TEST_LOGS", REPO / "build" / "test-logs")) / "nvidia-driver.log"
PLAYBOOK = "drivers.yml"
SKIP_GATE = ["--skip-tags", "gpu_gate"]


def packages(branch: int) -> list[str]:
    """The role's Debian-archive plan for a branch, userspace only."""
    return [f"nvidia-tesla-{branch}-smi", f"libnvidia-tesla-{branch}-cuda1", f"libnvidia-tesla-{branch}-cfg1",
            "nvidia-persistenced"]


def branch_vars(branch: int, **more: object) -> list[str]:
    return ["-e", json.dumps({"nvidia_driver_branch": branch, **more})]


@dataclass
class Stage:
    host: hosts.TestHost
    inventory: Path
    cpu_alias: str

    def play(self, *args: str) -> PlayResult:
        started = time.monotonic()
        result = run_playbook(PLAYBOOK, self.inventory, extra_args=list(args), log=LOG, timeout=1500)
        elapsed = time.monotonic() - started
        recap = result.recap.get(self.host.name, {})
        line = (f"[nvidia e2e] {' '.join(args) or '(no extra args)'}: rc={result.rc} {elapsed:.0f}s "
                f"changed={recap.get('changed')} ok={recap.get('ok')} failed={recap.get('failed')}")
        print(line)
        with LOG.open("a") as handle:
            handle.write(line + "\n")
        return result

    def held(self) -> list[str]:
        return sorted(self.host.sh("apt-mark showhold").stdout.split())

    def installed(self, package: str) -> bool:
        result = self.host.sh(f"dpkg-query -W -f='${{Status}}' {package}", check=False)
        return result.returncode == 0 and result.stdout.endswith(" ok installed")  # "hold ok installed" when held


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("needs a running docker engine")
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    with HostPool(image=base_tag(), count=1, prefix="nv") as pool:
        host = pool.hosts[0]
        cpu_alias = f"{host.name}-cpu"
        inventory = write_inventory(
            tmp_path_factory.mktemp("inventory"), [host.name, cpu_alias],
            host_vars={
                host.name: {
                    "vllm_device": "cuda",
                    "nvidia_driver_source": "distribution",
                    "nvidia_driver_branch": 470,
                    # The container's kernel is the machine's: no module to build, no reboot to do.
                    "nvidia_driver_kernel_module": False,
                    "nvidia_driver_reboot": False,
                },
                # The same container seen as a CPU host: it must get neither driver nor gate.
                cpu_alias: {"ansible_host": host.name, "vllm_device": "cpu"},
            },
        )
        yield Stage(host=host, inventory=inventory, cpu_alias=cpu_alias)


def test_converge_installs_pins_and_holds_from_debians_archive(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE)
    assert result.rc == 0, result.tail()
    assert result.recap[stage.host.name]["changed"] > 0
    assert result.recap[stage.cpu_alias]["changed"] == 0
    assert "CPU host: NVIDIA driver skipped" in result.output
    # Secure Boot was read; a container has no EFI variables, which counts as off.
    assert "Secure Boot: no-efi" in result.output
    host = stage.host

    sources = host.sh("cat /etc/apt/sources.list.d/nvidia-driver-debian-nonfree.sources").stdout
    assert "Components: contrib non-free non-free-firmware" in sources
    assert "Suites: bookworm bookworm-updates" in sources
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in sources
    assert host.sh("test -f /etc/apt/sources.list.d/nvidia-driver-debian-security-nonfree.sources", check=False).returncode == 0
    assert host.sh("test -e /etc/apt/sources.list.d/nvidia-driver-cuda.sources", check=False).returncode != 0

    for package in packages(470):
        assert stage.installed(package), package
    assert stage.held() == sorted(packages(470))
    assert "Pin: version /^([0-9]+:)?470\\./" in host.sh("cat /etc/apt/preferences.d/nvidia-driver.pref").stdout
    policy = host.sh("apt-cache policy nvidia-tesla-470-smi").stdout
    assert " 1001" in policy, policy  # the pin is in force

    blacklist = host.sh("cat /etc/modprobe.d/blacklist-nouveau.conf").stdout
    assert "blacklist nouveau" in blacklist and "options nouveau modeset=0" in blacklist
    assert "RUNNING HANDLER [inference.vllm_lora.nvidia_driver : Regenerate the initramfs without nouveau]" in result.output
    # nvidia_driver_reboot: false, so the driver change is reported instead of rebooting
    assert "RUNNING HANDLER [inference.vllm_lora.nvidia_driver : Warn that the NVIDIA driver waits for a reboot]" in result.output

    assert host.sh("systemctl is-enabled nvidia-persistenced.service").stdout.strip() == "enabled"
    record = json.loads(host.sh("cat /etc/ansible/facts.d/nvidia_driver.fact").stdout)
    assert record == {"branch": 470, "source": "distribution", "packages": packages(470)}


def test_second_run_changes_nothing(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE)
    assert result.rc == 0, result.tail()
    assert result.recap[stage.host.name]["changed"] == 0, result.tail(120)


def test_check_diff_run_is_clean(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE, "--check", "--diff")
    assert result.rc == 0, result.tail()
    assert result.recap[stage.host.name]["changed"] == 0, result.tail(120)


def test_gate_refuses_the_host_for_want_of_a_gpu(stage: Stage) -> None:
    result = stage.play()  # install (unchanged) then the gate
    assert result.rc != 0
    recap = result.recap[stage.host.name]
    assert recap["failed"] == 1 and recap["changed"] == 0, result.tail()
    assert result.recap[stage.cpu_alias]["failed"] == 0  # the CPU host is skipped, not failed
    assert f"GPU gate: {stage.host.name} is not ready for vLLM 0.11: no NVIDIA GPU is present" in result.output
    assert "vllm_device: cpu" in result.output


def test_branch_change_is_refused_without_the_upgrade_flag(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE, *branch_vars(535))
    assert result.rc != 0
    assert result.recap[stage.host.name]["changed"] == 0
    assert "runs NVIDIA driver branch 470" in result.output and "nvidia_driver_upgrade=true" in result.output
    assert stage.held() == sorted(packages(470))


def test_branch_upgrade_unholds_installs_removes_and_reholds(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE, *branch_vars(535, nvidia_driver_upgrade=True))
    assert result.rc == 0, result.tail()
    assert result.recap[stage.host.name]["changed"] > 0
    for package in packages(535):
        assert stage.installed(package), package
    for package in packages(470):
        if package != "nvidia-persistenced":  # shared by both branches: stays, still held
            assert not stage.installed(package), package
    assert stage.held() == sorted(packages(535))
    host = stage.host
    assert "Pin: version /^([0-9]+:)?535\\./" in host.sh("cat /etc/apt/preferences.d/nvidia-driver.pref").stdout
    assert "tesla-535" in host.sh("readlink -f /usr/bin/nvidia-smi").stdout
    record = json.loads(host.sh("cat /etc/ansible/facts.d/nvidia_driver.fact").stdout)
    assert record["branch"] == 535 and record["packages"] == packages(535)


def test_after_the_upgrade_a_normal_run_changes_nothing(stage: Stage) -> None:
    result = stage.play(*SKIP_GATE, *branch_vars(535))
    assert result.rc == 0, result.tail()
    assert result.recap[stage.host.name]["changed"] == 0, result.tail(120)

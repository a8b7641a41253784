"""The GPU gate (plugins/modules/nvidia_gpu_facts.py) on recorded nvidia-smi outputs.

Each test feeds what a real host printed (tests/unit/data/nvidia_smi/, sources in its
README) and checks both the decision and that the message names the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_PATH = REPO / "plugins" / "modules" / "nvidia_gpu_facts.py"
DATA = Path(__file__).resolve().parent / "data" / "nvidia_smi"


def load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nvidia_gpu_facts", MODULE_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["nvidia_gpu_facts"] = module
    spec.loader.exec_module(module)
    return module


gate = load_module()


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def runner(query: tuple[int, str], banner: tuple[int, str] | None = None) -> Callable[[list[str]], tuple[int, str]]:
    """A fake `run` that answers the query and the banner with recorded outputs."""

    calls: list[list[str]] = []

    def run(command: list[str]) -> tuple[int, str]:
        calls.append(command)
        if any(argument.startswith("--query-gpu=") for argument in command):
            assert command[1:] == list(gate.QUERY_ARGS)
            return query
        assert banner is not None, f"unexpected call {command}"
        return banner

    run.calls = calls  # type: ignore[attr-defined]
    return run


def evidence(gpus_on_pci: int | None = 1, module_version: str | None = None):
    return lambda: gate.HostEvidence(nvidia_gpus_on_pci=gpus_on_pci, kernel_module_version=module_version)


def requirements(**overrides: object):
    return gate.Requirements(**overrides)


# --- a healthy GPU -------------------------------------------------------------


def test_healthy_rtx5070_passes_and_exports_the_fact() -> None:
    run = runner((0, recorded("healthy_rtx5070_570.query.txt")), (0, recorded("healthy_rtx5070_570.banner.txt")))
    fact = gate.gather(run, "/usr/bin/nvidia-smi", evidence(), requirements())
    assert fact["ready"] is True
    assert fact["problems"] == []
    assert fact["driver_version"] == "570.133.07"
    assert fact["driver_branch"] == 570
    assert fact["cuda_version"] == "12.8"
    assert fact["gpu_count"] == 1
    assert fact["gpus"] == [{
        "index": 0, "name": "NVIDIA GeForce RTX 5070", "uuid": "GPU-00000000-0000-0000-0000-000000005070",
        "memory_total_mib": 12227, "compute_capability": "12.0", "persistence_mode": "Disabled",
    }]
    assert fact["min_compute_capability"] == "12.0"
    assert fact["usable_memory_mib"] == 11004  # floor(12227 * 0.9)
    assert fact["quantization_kernel"] is None
    # persistence mode Off is reported, not fatal
    assert any("persistence mode Disabled" in warning for warning in fact["warnings"])
    json.dumps(fact)  # the fact must travel as JSON


def test_two_a100_parse_and_pick_awq_marlin() -> None:
    gpus = gate.parse_query_csv(recorded("healthy_2x_a100_570.query.txt"))
    assert [(gpu.index, gpu.name, gpu.memory_total_mib, gpu.compute_capability) for gpu in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
        (1, "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ]
    verdict = gate.assess(gpus, requirements(quantization="awq", required_memory_mib=60000, min_gpus=2))
    assert verdict.problems == []
    assert verdict.quantization_kernel == "awq_marlin"
    assert verdict.usable_memory_mib == 73728


def test_t4_runs_awq_with_the_plain_awq_kernel() -> None:
    gpus = gate.parse_query_csv(recorded("healthy_t4_570.query.txt"))
    verdict = gate.assess(gpus, requirements(quantization="awq"))
    assert verdict.problems == []
    assert verdict.quantization_kernel == "awq"


@pytest.mark.parametrize(
    ("capability", "kernel"),
    [((12, 0), "awq_marlin"), ((9, 0), "awq_marlin"), ((8, 0), "awq_marlin"), ((8, 6), "awq_marlin"),
     ((7, 5), "awq"), ((7, 0), None), ((6, 1), None)],
)
def test_awq_kernel_by_compute_capability(capability: tuple[int, int], kernel: str | None) -> None:
    chosen, problem = gate.quantization_kernel("awq", capability)
    assert chosen == kernel
    assert (problem is None) == (kernel is not None)
    if problem:
        assert "7.5" in problem and "8.0" in problem and "unquantized" in problem


def test_unquantized_model_needs_no_kernel() -> None:
    assert gate.quantization_kernel("none", (7, 0)) == (None, None)


def test_volta_cannot_run_awq_and_says_why() -> None:
    v100 = gate.Gpu(0, "Tesla V100-SXM2-32GB", "GPU-x", "570.86.15", 32768, "7.0", "Enabled")
    verdict = gate.assess([v100], requirements(quantization="awq"))
    assert len(verdict.problems) == 1
    assert "Tesla V100-SXM2-32GB" in verdict.problems[0] and "compute capability 7.0" in verdict.problems[0]


def test_pascal_is_below_what_vllm_supports() -> None:
    p100 = gate.Gpu(0, "Tesla P100-PCIE-16GB", "GPU-x", "570.86.15", 16384, "6.0", "Enabled")
    verdict = gate.assess([p100], requirements())
    assert any("needs 7.0 or newer" in problem for problem in verdict.problems)


def test_not_enough_memory_names_the_numbers_and_the_fixes() -> None:
    run = runner((0, recorded("healthy_rtx5070_570.query.txt")), (0, recorded("healthy_rtx5070_570.banner.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(), requirements(required_memory_mib=20000, gpu_memory_utilization=0.9))
    assert fact["ready"] is False
    (problem,) = fact["problems"]
    assert "11004 MiB of the 12227 MiB" in problem and "20000 MiB" in problem
    assert "0.90" in problem and "tensor parallelism" in problem


def test_memory_uses_the_smallest_gpu() -> None:
    big = gate.Gpu(0, "NVIDIA A100-SXM4-80GB", "a", "570.86.15", 81920, "8.0", "Enabled")
    small = gate.Gpu(1, "Tesla T4", "b", "570.86.15", 15360, "7.5", "Enabled")
    verdict = gate.assess([big, small], requirements(required_memory_mib=20000))
    assert any("GPU 1 (Tesla T4)" in problem for problem in verdict.problems)


def test_too_few_gpus_for_tensor_parallelism() -> None:
    gpus = gate.parse_query_csv(recorded("healthy_rtx5070_570.query.txt"))
    verdict = gate.assess(gpus, requirements(min_gpus=2))
    assert any("found 1 GPU(s)" in problem and "needs 2" in problem for problem in verdict.problems)


# --- an old driver ---------------------------------------------------------------


def test_old_driver_535_is_refused_with_the_upgrade_path() -> None:
    run = runner((0, recorded("old_driver_535_a100.query.txt")), (0, recorded("old_driver_535.banner.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(), requirements())
    assert fact["ready"] is False
    assert fact["driver_branch"] == 535
    assert fact["cuda_version"] == "12.2"
    (problem,) = fact["problems"]
    assert "535.129.03 (branch 535)" in problem and "older than branch 570" in problem
    assert "CUDA 12.8" in problem
    assert "nvidia_driver_branch" in problem and "nvidia_driver_upgrade=true" in problem
    assert "nvidia_driver_source: cuda" in problem  # Debian 12's archive stops at 535


def test_min_branch_is_a_variable() -> None:
    gpus = gate.parse_query_csv(recorded("old_driver_535_a100.query.txt"))
    assert gate.assess(gpus, requirements(min_driver_branch=535)).problems == []


def test_nvidia_smi_without_compute_cap_is_an_old_driver() -> None:
    run = runner((2, recorded("old_driver_no_compute_cap.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(), requirements())
    assert fact["ready"] is False
    (problem,) = fact["problems"]
    assert "compute_cap" in problem and "branch 570" in problem and "nvidia_driver_upgrade=true" in problem
    assert len(run.calls) == 1  # no banner asked from a failing nvidia-smi


# --- no device / no driver ----------------------------------------------------------


def test_driver_not_loaded_points_at_reboot_secure_boot_and_dkms() -> None:
    run = runner((9, recorded("no_driver_loaded.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=2), requirements())
    (problem,) = fact["problems"]
    assert "cannot talk to the NVIDIA kernel driver" in problem
    assert "2 NVIDIA GPU(s) are on the PCI bus" in problem
    assert "reboot" in problem and "mokutil --sb-state" in problem and "dkms status" in problem


def test_no_devices_found_with_a_gpu_on_the_bus() -> None:
    run = runner((6, recorded("no_devices.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=1), requirements())
    (problem,) = fact["problems"]
    assert "loaded but sees no GPU" in problem
    assert "RmInitAdapter" in problem and "nvidia_driver_open_kernel_modules" in problem


@pytest.mark.parametrize(
    ("fixture", "rc"),
    [("no_devices.txt", 6), ("no_driver_loaded.txt", 9), ("container_no_gpu_nvml_unknown_error.txt", 255)],
)
def test_a_host_without_gpu_is_told_to_be_a_cpu_host(fixture: str, rc: int) -> None:
    run = runner((rc, recorded(fixture)))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=0), requirements())
    assert fact["ready"] is False
    (problem,) = fact["problems"]
    assert problem.startswith("no NVIDIA GPU is present")
    assert "vllm_device: cpu" in problem


def test_nvidia_smi_missing_on_a_gpu_host_means_install_the_driver() -> None:
    fact = gate.gather(runner((0, "")), None, evidence(gpus_on_pci=4), requirements())
    (problem,) = fact["problems"]
    assert "nvidia-smi was not found" in problem and "4 NVIDIA GPU(s)" in problem
    assert "nvidia_driver role" in problem


def test_nvidia_smi_missing_without_gpu_means_no_gpu() -> None:
    fact = gate.gather(runner((0, "")), None, evidence(gpus_on_pci=0), requirements())
    assert fact["problems"][0].startswith("no NVIDIA GPU is present")


def test_nvml_unknown_error_with_a_gpu_suggests_reboot_and_device_passthrough() -> None:
    run = runner((255, recorded("container_no_gpu_nvml_unknown_error.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=1), requirements())
    (problem,) = fact["problems"]
    assert "could not initialise NVML" in problem and "Unknown Error" in problem and "/dev/nvidia" in problem


# --- driver/library mismatch -----------------------------------------------------


def test_mismatch_570_says_reboot() -> None:
    run = runner((18, recorded("mismatch_570.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=1), requirements())
    (problem,) = fact["problems"]
    assert "NVML library version 570.124" in problem
    assert "Fix: reboot the host" in problem


def test_mismatch_580_names_the_loaded_module_version() -> None:
    module_version = gate.parse_kernel_module_version(recorded("mismatch_580.proc_driver_nvidia_version.txt"))
    assert module_version == "580.173.02"
    run = runner((18, recorded("mismatch_580.txt")))
    fact = gate.gather(run, "nvidia-smi", evidence(gpus_on_pci=1, module_version=module_version), requirements())
    (problem,) = fact["problems"]
    assert "kernel module (580.173.02" in problem and "NVML library version 580.178" in problem


def test_open_kernel_module_version_line_is_read_too() -> None:
    text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)"
    assert gate.parse_kernel_module_version(text) == "570.86.15"


# --- parsing details -------------------------------------------------------------


def test_banner_cuda_version() -> None:
    assert gate.parse_cuda_version(recorded("healthy_rtx5070_570.banner.txt")) == "12.8"
    assert gate.parse_cuda_version("| NVIDIA-SMI 535.129.03   Driver Version: 535.129.03   CUDA Version: N/A      |") is None


def test_unexpected_csv_shape_is_a_clear_problem() -> None:
    with pytest.raises(gate.NvidiaSmiParseError):
        gate.parse_query_csv("NVIDIA A100-SXM4-80GB, 81920, 535.129.03\n")
    with pytest.raises(gate.NvidiaSmiParseError):
        gate.parse_query_csv("0, NVIDIA A100, GPU-x, 570.86.15, [N/A], 8.0, Enabled\n")
    fact = gate.gather(runner((0, "garbage\n")), "nvidia-smi", evidence(), requirements())
    assert fact["ready"] is False and "could not read nvidia-smi's answer" in fact["problems"][0]


def test_empty_answer_counts_as_no_devices() -> None:
    fact = gate.gather(runner((0, "")), "nvidia-smi", evidence(gpus_on_pci=1), requirements())
    assert "sees no GPU" in fact["problems"][0]


def test_driver_branch() -> None:
    assert gate.driver_branch("570.86.15") == 570
    assert gate.driver_branch("580.105.08") == 580
    with pytest.raises(gate.NvidiaSmiParseError):
        gate.driver_branch("[N/A]")


def test_pci_evidence_counts_only_nvidia_display_devices() -> None:
    devices = [
        ("0x10de\n", "0x030200\n"),  # 3D controller: a data centre GPU
        ("0x10de\n", "0x030000\n"),  # VGA controller: a workstation GPU
        ("0x10de\n", "0x040300\n"),  # its HDMI audio function
        ("0x10de\n", "0x068000\n"),  # an NVSwitch
        ("0x1af4\n", "0x020000\n"),  # virtio network
    ]
    assert gate.count_nvidia_gpus(devices) == 2


def test_host_evidence_from_sysfs_and_procfs(tmp_path: Path) -> None:
    pci = tmp_path / "devices"
    for name, vendor, pci_class in [("0000:00:04.0", "0x10de", "0x030200"), ("0000:00:03.0", "0x1af4", "0x020000")]:
        (pci / name).mkdir(parents=True)
        (pci / name / "vendor").write_text(vendor + "\n")
        (pci / name / "class").write_text(pci_class + "\n")
    version = tmp_path / "version"
    version.write_text(recorded("mismatch_580.proc_driver_nvidia_version.txt"))
    found = gate.read_host_evidence(str(pci), str(version))
    assert found == gate.HostEvidence(nvidia_gpus_on_pci=1, kernel_module_version="580.173.02")
    missing = gate.read_host_evidence(str(tmp_path / "none"), str(tmp_path / "none"))
    assert missing == gate.HostEvidence(nvidia_gpus_on_pci=None, kernel_module_version=None)


# --- the module as Ansible runs it ----------------------------------------------


def fake_nvidia_smi(directory: Path, query: str, query_rc: int, banner: str = "") -> Path:
    """An executable that answers like nvidia-smi from recorded files."""
    (directory / "query.txt").write_text(query)
    (directory / "banner.txt").write_text(banner)
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=*) cat "$(dirname "$0")/query.txt"; exit ' + str(query_rc) + ";; esac\n"
        'cat "$(dirname "$0")/banner.txt"\n'
    )
    script.chmod(0o755)
    return script


def run_module(tmp_path: Path, args: dict[str, object]) -> dict:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    result = subprocess.run(
        [sys.executable, str(MODULE_PATH), str(args_file)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_module_main_healthy(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, recorded("healthy_2x_a100_570.query.txt"), 0,
                          recorded("healthy_rtx5070_570.banner.txt"))
    out = run_module(tmp_path, {"nvidia_smi": str(smi), "quantization": "awq", "min_gpus": 2,
                                "required_memory_mib": 40000, "gpu_memory_utilization": 0.85})
    assert out["changed"] is False
    fact = out["ansible_facts"]["nvidia_driver_gpu"]
    assert fact["ready"] is True and fact["quantization_kernel"] == "awq_marlin" and fact["gpu_count"] == 2


def test_module_main_without_gpu(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, recorded("container_no_gpu_nvml_unknown_error.txt"), 255)
    pci = tmp_path / "pci" / "0000:00:03.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1af4\n")
    (pci / "class").write_text("0x020000\n")
    out = run_module(tmp_path, {"nvidia_smi": str(smi), "pci_devices_dir": str(pci.parent),
                                "driver_version_file": str(tmp_path / "absent")})
    fact = out["ansible_facts"]["nvidia_driver_gpu"]
    assert fact["ready"] is False and fact["problems"][0].startswith("no NVIDIA GPU is present")
    assert out.get("failed") is not True  # the gate's assert fails, not the module


def test_module_rejects_a_utilization_out_of_range(tmp_path: Path) -> None:
    out = run_module(tmp_path, {"gpu_memory_utilization": 1.5})
    assert out["failed"] is True and "gpu_memory_utilization" in out["msg"]

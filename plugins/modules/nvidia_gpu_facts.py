#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Read the host's NVIDIA GPUs through nvidia-smi and judge them for vLLM 0.11.

Runs on the target with the standard library only. Every decision is a pure,
typed function of text that nvidia-smi (or sysfs/procfs) printed, so the unit
tests feed it recorded real outputs (tests/unit/data/nvidia_smi/).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nvidia_gpu_facts
short_description: Read NVIDIA GPUs through nvidia-smi and judge them for vLLM 0.11
description:
  - Runs C(nvidia-smi --query-gpu=... --format=csv,noheader,nounits) and the plain
    C(nvidia-smi) banner, reads the PCI bus and C(/proc/driver/nvidia/version) when
    nvidia-smi fails, and decides whether vLLM 0.11.0 (CUDA 12.8) can run.
  - Never fails for a GPU problem; it returns C(ready=false) and C(problems), each
    naming the problem and its fix, and sets the fact C(nvidia_driver_gpu).
options:
  min_driver_branch:
    description: Oldest driver branch accepted (CUDA 12.8 needs R570).
    type: int
    default: 570
  required_memory_mib:
    description: GPU memory (MiB) the model needs on each GPU; 0 skips the check.
    type: int
    default: 0
  gpu_memory_utilization:
    description: Share of each GPU's memory vLLM may use (its --gpu-memory-utilization).
    type: float
    default: 0.9
  quantization:
    description: Quantization family of the served model.
    type: str
    choices: [awq, none]
    default: none
  min_gpus:
    description: GPUs the service needs (its tensor parallel size).
    type: int
    default: 1
  nvidia_smi:
    description: nvidia-smi command name or path.
    type: str
    default: nvidia-smi
  pci_devices_dir:
    description: sysfs directory of PCI devices, read when nvidia-smi fails.
    type: path
    default: /sys/bus/pci/devices
  driver_version_file:
    description: procfs file the loaded NVIDIA kernel module writes its version to.
    type: path
    default: /proc/driver/nvidia/version
author:
  - vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Read the GPUs and judge them for an AWQ model
  inference.vllm_lora.nvidia_gpu_facts:
    min_driver_branch: 570
    required_memory_mib: 12000
    quantization: awq

- name: Stop when the host cannot run vLLM
  ansible.builtin.assert:
    that: ansible_facts['nvidia_driver_gpu'].ready
    fail_msg: "{{ ansible_facts['nvidia_driver_gpu'].problems | join(' ') }}"
"""

RETURN = r"""
ansible_facts:
  description: C(nvidia_driver_gpu) with ready, problems, driver_version, driver_branch,
    cuda_version, gpu_count, gpus (index, name, uuid, memory_total_mib,
    compute_capability, persistence_mode), min_memory_total_mib, usable_memory_mib,
    min_compute_capability, quantization, quantization_kernel.
  returned: always
  type: dict
"""

import csv
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

from ansible.module_utils.basic import AnsibleModule

QUERY_FIELDS = (
    "index", "name", "uuid", "driver_version", "memory.total", "compute_cap", "persistence_mode",
)
QUERY_ARGS = ("--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits")
NVIDIA_PCI_VENDOR = "0x10de"
# PCI base class 0x03 = display controller (VGA 0x0300, 3D 0x0302); NVIDIA's
# audio functions (0x0403) and NVSwitches (0x0680) are not GPUs.
DISPLAY_CLASS_PREFIX = "0x03"
# vLLM 0.11 runs on compute capability 7.0 (Volta) and newer.
VLLM_MIN_CAPABILITY = (7, 0)
# vLLM's AWQ kernels: awq_marlin from 8.0 (Ampere), the plain awq kernel from 7.5 (Turing).
AWQ_MARLIN_MIN_CAPABILITY = (8, 0)
AWQ_MIN_CAPABILITY = (7, 5)
CUDA_FOR_VLLM = "12.8"
RUNBOOK = "docs/nvidia-driver.md"

Runner = Callable[[List[str]], Tuple[int, str]]


class NvidiaSmiParseError(ValueError):
    """nvidia-smi answered, but not in the CSV shape this module asked for."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    driver_version: str
    memory_total_mib: int
    compute_capability: str
    persistence_mode: str

    def capability(self) -> Tuple[int, int]:
        return parse_capability(self.compute_capability)

    def public(self) -> dict:
        data = asdict(self)
        data.pop("driver_version")
        return data


@dataclass(frozen=True)
class Requirements:
    min_driver_branch: int = 570
    required_memory_mib: int = 0
    gpu_memory_utilization: float = 0.9
    quantization: str = "none"
    min_gpus: int = 1


@dataclass(frozen=True)
class HostEvidence:
    """What the host says besides nvidia-smi: read only when nvidia-smi fails."""

    nvidia_gpus_on_pci: Optional[int]  # None: sysfs could not be read
    kernel_module_version: Optional[str]  # None: no NVIDIA module loaded


@dataclass
class Verdict:
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    quantization_kernel: Optional[str] = None
    usable_memory_mib: Optional[int] = None


# --- parsing -----------------------------------------------------------------


def parse_capability(text: str) -> Tuple[int, int]:
    """'8.0' -> (8, 0); '12.0' -> (12, 0)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if not match:
        raise NvidiaSmiParseError(f"compute capability {text!r} is not MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


def format_capability(capability: Tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def driver_branch(version: str) -> int:
    """'570.86.15' -> 570 (the branch is the first component)."""
    match = re.match(r"\s*(\d+)\.", version)
    if not match:
        raise NvidiaSmiParseError(f"driver version {version!r} is not BRANCH.x")
    return int(match.group(1))


def parse_query_csv(text: str) -> List[Gpu]:
    """Rows of `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`."""
    gpus: List[Gpu] = []
    for row in csv.reader(text.strip().splitlines(), skipinitialspace=True):
        if not row:
            continue
        if len(row) != len(QUERY_FIELDS):
            raise NvidiaSmiParseError(
                f"expected {len(QUERY_FIELDS)} fields ({', '.join(QUERY_FIELDS)}), got {len(row)}: {row!r}"
            )
        values = dict(zip(QUERY_FIELDS, (value.strip() for value in row)))
        try:
            index = int(values["index"])
            memory = int(values["memory.total"])
        except ValueError as error:
            raise NvidiaSmiParseError(f"not a number in {row!r}: {error}") from error
        parse_capability(values["compute_cap"])
        driver_branch(values["driver_version"])
        gpus.append(Gpu(
            index=index, name=values["name"], uuid=values["uuid"],
            driver_version=values["driver_version"], memory_total_mib=memory,
            compute_capability=values["compute_cap"], persistence_mode=values["persistence_mode"],
        ))
    return gpus


def parse_cuda_version(banner: str) -> Optional[str]:
    """'... CUDA Version: 12.8 |' in the plain nvidia-smi table -> '12.8'."""
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", banner)
    return match.group(1) if match else None


def parse_kernel_module_version(text: str) -> Optional[str]:
    """/proc/driver/nvidia/version -> '580.173.02' (proprietary or open module)."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def parse_nvml_library_version(text: str) -> Optional[str]:
    """'NVML library version: 570.124' printed with a driver/library mismatch."""
    match = re.search(r"NVML library version:\s*(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def count_nvidia_gpus(devices: List[Tuple[str, str]]) -> int:
    """[(vendor, class)] as sysfs prints them ('0x10de', '0x030200') -> NVIDIA GPUs."""
    return sum(
        1 for vendor, pci_class in devices
        if vendor.strip().lower() == NVIDIA_PCI_VENDOR and pci_class.strip().lower().startswith(DISPLAY_CLASS_PREFIX)
    )


# --- decisions ---------------------------------------------------------------


def quantization_kernel(family: str, capability: Tuple[int, int]) -> Tuple[Optional[str], Optional[str]]:
    """The vLLM quantization kernel for the weakest GPU, or why there is none.

    Returns (kernel, problem); kernel is None for an unquantized model.
    """
    if family == "none":
        return None, None
    if family != "awq":
        return None, f"quantization family {family!r} is unknown to the GPU gate (known: awq, none)."
    if capability >= AWQ_MARLIN_MIN_CAPABILITY:
        return "awq_marlin", None
    if capability >= AWQ_MIN_CAPABILITY:
        return "awq", None
    return None, (
        f"the GPU has compute capability {format_capability(capability)}; vLLM's AWQ kernels need "
        f"{format_capability(AWQ_MIN_CAPABILITY)} (awq) or {format_capability(AWQ_MARLIN_MIN_CAPABILITY)} "
        "(awq_marlin), so this AWQ model cannot run here. Fix: serve an unquantized model on this GPU, "
        "or use a Turing (7.5), Ampere (8.0) or newer GPU."
    )


def old_driver_problem(version: str, branch: int, minimum: int) -> str:
    return (
        f"NVIDIA driver {version} (branch {branch}) is older than branch {minimum}, the minimum for "
        f"CUDA {CUDA_FOR_VLLM} which vLLM 0.11.0's wheel is built with. Fix: set nvidia_driver_branch to "
        f"{minimum} or newer (on Debian 12 also nvidia_driver_source: cuda, Debian's archive stops at 535) "
        f"and run the driver role once with -e nvidia_driver_upgrade=true ({RUNBOOK}, "
        "'Upgrading the driver branch')."
    )


def assess(gpus: List[Gpu], requirements: Requirements) -> Verdict:
    """Judge parsed GPUs against what the vLLM declaration needs."""
    verdict = Verdict()
    if not gpus:
        verdict.problems.append("nvidia-smi listed no GPU.")
        return verdict
    version = gpus[0].driver_version
    branch = driver_branch(version)
    if branch < requirements.min_driver_branch:
        verdict.problems.append(old_driver_problem(version, branch, requirements.min_driver_branch))
    if len(gpus) < requirements.min_gpus:
        verdict.problems.append(
            f"found {len(gpus)} GPU(s), the vLLM declaration needs {requirements.min_gpus} "
            "(its tensor parallel size). Fix: a host with enough GPUs, or a smaller tensor parallel size."
        )
    weakest = min(gpus, key=lambda gpu: gpu.capability())
    if weakest.capability() < VLLM_MIN_CAPABILITY:
        verdict.problems.append(
            f"GPU {weakest.index} ({weakest.name}) has compute capability {weakest.compute_capability}; "
            f"vLLM 0.11 needs {format_capability(VLLM_MIN_CAPABILITY)} or newer. Fix: a Volta or newer GPU."
        )
    kernel, problem = quantization_kernel(requirements.quantization, weakest.capability())
    verdict.quantization_kernel = kernel
    if problem:
        verdict.problems.append(f"GPU {weakest.index} ({weakest.name}): {problem}")
    smallest = min(gpus, key=lambda gpu: gpu.memory_total_mib)
    usable = math.floor(smallest.memory_total_mib * requirements.gpu_memory_utilization)
    verdict.usable_memory_mib = usable
    if requirements.required_memory_mib > usable:
        verdict.problems.append(
            f"GPU memory is too small for the model: with gpu-memory-utilization "
            f"{requirements.gpu_memory_utilization:.2f}, vLLM may use {usable} MiB of the "
            f"{smallest.memory_total_mib} MiB on GPU {smallest.index} ({smallest.name}), and the model needs "
            f"{requirements.required_memory_mib} MiB per GPU. Fix: a GPU with more memory, more GPUs "
            "(tensor parallelism), a smaller or quantized model, or a higher gpu-memory-utilization if "
            "nothing else uses the GPU."
        )
    for gpu in gpus:
        if gpu.persistence_mode.lower() != "enabled":
            verdict.warnings.append(
                f"GPU {gpu.index} ({gpu.name}) has persistence mode {gpu.persistence_mode}: "
                "is nvidia-persistenced running?"
            )
    return verdict


def diagnose_failure(output: str, evidence: HostEvidence, smi_found: bool) -> str:
    """Why nvidia-smi could not list GPUs, and the fix, from its text and the host."""
    said = " / ".join(line.strip() for line in output.strip().splitlines() if line.strip())[:300]
    if evidence.nvidia_gpus_on_pci == 0:
        return (
            "no NVIDIA GPU is present: the PCI bus (/sys/bus/pci/devices) has no display device of vendor "
            "0x10de, so vLLM's CUDA build cannot run here. Fix: run vLLM on a GPU host, or declare this host "
            "a CPU host (vllm_device: cpu) so that the NVIDIA driver role and this gate are skipped."
        )
    on_bus = (
        f"{evidence.nvidia_gpus_on_pci} NVIDIA GPU(s) are on the PCI bus"
        if evidence.nvidia_gpus_on_pci is not None else "the PCI bus could not be read"
    )
    if not smi_found:
        return (
            f"nvidia-smi was not found: the NVIDIA driver is not installed ({on_bus}). "
            "Fix: apply the nvidia_driver role to this host (playbooks/drivers.yml)."
        )
    if "Driver/library version mismatch" in output:
        library = parse_nvml_library_version(output) or "unknown"
        module = evidence.kernel_module_version or "unknown"
        return (
            f"the loaded NVIDIA kernel module ({module}, /proc/driver/nvidia/version) does not match the "
            f"installed driver libraries (NVML library version {library}): the driver packages changed after "
            "the module was loaded. Fix: reboot the host (the nvidia_driver role reboots when it changes the "
            "driver; with nvidia_driver_reboot: false that is left to you), then run this gate again."
        )
    if "couldn't communicate with the NVIDIA driver" in output or "couldn\u2019t communicate" in output:
        return (
            f"nvidia-smi cannot talk to the NVIDIA kernel driver ({on_bus}; nvidia-smi said: {said}): the "
            "kernel module is not loaded. Fix: reboot if the driver was just installed; otherwise find out "
            "why the module does not load: `mokutil --sb-state` (Secure Boot refuses a module signed with a "
            "key that is not enrolled), `dkms status` (no module built for `uname -r`: install that kernel's "
            "headers), `journalctl -k | grep -i -e nvidia -e nouveau`."
        )
    if "No devices were found" in output:
        return (
            f"the NVIDIA driver is loaded but sees no GPU although {on_bus}. Fix: read `journalctl -k | grep "
            "NVRM`: 'RmInitAdapter failed' or Xid 79 ('fallen off the bus') need a power cycle or firmware "
            "settings (Above 4G decoding, Resizable BAR); a GPU that needs the open kernel modules (Blackwell) "
            "needs nvidia_driver_open_kernel_modules: true; a GPU bound to vfio-pci belongs to a VM."
        )
    if re.search(r'Field "[^"]+" is not a valid field to query', output):
        return (
            f"this nvidia-smi does not know the query fields {', '.join(QUERY_FIELDS)} (it said: {said}): "
            "the driver predates the compute_cap field, so it is far older than branch 570 that CUDA "
            f"{CUDA_FOR_VLLM} needs. Fix: set nvidia_driver_branch to 570 or newer and run the driver role "
            f"once with -e nvidia_driver_upgrade=true ({RUNBOOK}, 'Upgrading the driver branch')."
        )
    if "Failed to initialize NVML" in output:
        return (
            f"nvidia-smi could not initialise NVML ({on_bus}; nvidia-smi said: {said}). Fix: reboot the host; "
            "if it persists read `journalctl -k | grep -i -e NVRM -e Xid`; inside a container, check that "
            "the /dev/nvidia* devices are passed through."
        )
    return (
        f"nvidia-smi failed ({on_bus}; it said: {said or 'nothing'}). Fix: run `nvidia-smi` on the host and "
        "read `journalctl -k | grep -i nvidia`."
    )


def gather(run: Runner, smi: Optional[str], evidence_reader: Callable[[], HostEvidence],
           requirements: Requirements) -> dict:
    """The fact `nvidia_driver_gpu`: what the host has, and whether vLLM can run on it."""
    fact: dict = {
        "ready": False, "problems": [], "warnings": [], "driver_version": None, "driver_branch": None,
        "cuda_version": None, "gpu_count": 0, "gpus": [], "min_memory_total_mib": None,
        "usable_memory_mib": None, "min_compute_capability": None,
        "quantization": requirements.quantization, "quantization_kernel": None,
        "min_driver_branch": requirements.min_driver_branch,
    }
    output = ""
    gpus: List[Gpu] = []
    failed = smi is None
    if smi is not None:
        rc, output = run([smi, *QUERY_ARGS])
        if rc == 0:
            try:
                gpus = parse_query_csv(output)
            except NvidiaSmiParseError as error:
                fact["problems"].append(f"could not read nvidia-smi's answer ({error}).")
                return fact
            failed = not gpus
            if not gpus:
                output = output or "No devices were found"
        else:
            failed = True
    if failed:
        fact["problems"].append(diagnose_failure(output, evidence_reader(), smi_found=smi is not None))
        return fact
    if smi is None:  # failed is true when smi is None: never reached
        raise AssertionError("nvidia-smi is missing but was not reported")
    banner_rc, banner = run([smi])
    fact["cuda_version"] = parse_cuda_version(banner) if banner_rc == 0 else None
    verdict = assess(gpus, requirements)
    weakest = min(gpus, key=lambda gpu: gpu.capability())
    fact.update(
        problems=verdict.problems, warnings=verdict.warnings, ready=not verdict.problems,
        driver_version=gpus[0].driver_version, driver_branch=driver_branch(gpus[0].driver_version),
        gpu_count=len(gpus), gpus=[gpu.public() for gpu in gpus],
        min_memory_total_mib=min(gpu.memory_total_mib for gpu in gpus),
        usable_memory_mib=verdict.usable_memory_mib,
        min_compute_capability=weakest.compute_capability,
        quantization_kernel=verdict.quantization_kernel,
    )
    return fact


# --- the host ----------------------------------------------------------------


def read_host_evidence(pci_devices_dir: str, driver_version_file: str) -> HostEvidence:
    devices: Optional[List[Tuple[str, str]]] = []
    try:
        for name in sorted(os.listdir(pci_devices_dir)):
            base = os.path.join(pci_devices_dir, name)
            with open(os.path.join(base, "vendor")) as vendor, open(os.path.join(base, "class")) as pci_class:
                devices.append((vendor.read(), pci_class.read()))  # type: ignore[union-attr]
    except OSError:
        devices = None
    module_version: Optional[str] = None
    try:
        with open(driver_version_file) as handle:
            module_version = parse_kernel_module_version(handle.read())
    except OSError:
        module_version = None
    return HostEvidence(
        nvidia_gpus_on_pci=None if devices is None else count_nvidia_gpus(devices),
        kernel_module_version=module_version,
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "min_driver_branch": {"type": "int", "default": 570},
            "required_memory_mib": {"type": "int", "default": 0},
            "gpu_memory_utilization": {"type": "float", "default": 0.9},
            "quantization": {"type": "str", "choices": ["awq", "none"], "default": "none"},
            "min_gpus": {"type": "int", "default": 1},
            "nvidia_smi": {"type": "str", "default": "nvidia-smi"},
            "pci_devices_dir": {"type": "path", "default": "/sys/bus/pci/devices"},
            "driver_version_file": {"type": "path", "default": "/proc/driver/nvidia/version"},
        },
        supports_check_mode=True,
    )
    params = module.params
    if not 0 < params["gpu_memory_utilization"] <= 1:
        module.fail_json(msg=f"gpu_memory_utilization must be in (0, 1], got {params['gpu_memory_utilization']}")
    requirements = Requirements(
        min_driver_branch=params["min_driver_branch"], required_memory_mib=params["required_memory_mib"],
        gpu_memory_utilization=params["gpu_memory_utilization"], quantization=params["quantization"],
        min_gpus=params["min_gpus"],
    )
    smi = params["nvidia_smi"]
    if os.sep not in smi:
        smi = module.get_bin_path(smi, opt_dirs=["/usr/bin", "/usr/local/nvidia/bin"])
    elif not os.access(smi, os.X_OK):
        smi = None

    def run(command: List[str]) -> Tuple[int, str]:
        rc, stdout, stderr = module.run_command(command)
        return rc, stdout + stderr

    fact = gather(
        run, smi, lambda: read_host_evidence(params["pci_devices_dir"], params["driver_version_file"]),
        requirements,
    )
    for warning in fact["warnings"]:
        module.warn(warning)
    module.exit_json(changed=False, ansible_facts={"nvidia_driver_gpu": fact})


if __name__ == "__main__":
    main()

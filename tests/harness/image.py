"""Build the test hosts' base image: Debian 12 that boots systemd.

No image registry is reachable here, so the image is made with debootstrap and
``docker import``. The tag carries a hash of the recipe below: a changed recipe
builds a new image, an unchanged one is reused (rebuilding takes ~1-2 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = "vllm-lora-testhost"
SUITE = "bookworm"
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,ca-certificates,"
    "curl,iproute2,procps,sudo,kmod,gnupg"
)
# Run inside the chroot after debootstrap: a container has no console to wait
# on and no hardware clock, and units that need either only slow the boot.
POST_INSTALL = """
set -e
systemctl mask getty@tty1.service serial-getty@ttyS0.service console-getty.service \
  systemd-remount-fs.service systemd-udevd.service systemd-udevd-kernel.socket \
  systemd-udevd-control.socket systemd-modules-load.service sys-kernel-config.mount \
  systemd-firstboot.service systemd-timesyncd.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
echo 'testhost' > /etc/hostname
rm -f /etc/machine-id && touch /etc/machine-id
apt-get clean
"""


def debian_mirror() -> str:
    """The Debian mirror this machine itself uses (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [
        Path("/etc/apt/sources.list")
    ]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                uri = [w for w in words[1:] if not w.startswith("[")][0]
                return uri
    return "http://deb.debian.org/debian"


def base_tag() -> str:
    recipe = "\n".join([SUITE, PACKAGES, POST_INSTALL, debian_mirror()])
    return f"{REPO}:base-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, check=False
        ).returncode
        == 0
    )


def build_base() -> str:
    tag = base_tag()
    if image_exists(tag):
        print(f"[image] {tag} present")
        return tag
    mirror = debian_mirror()
    print(f"[image] building {tag} with debootstrap from {mirror} (~1-2 min)")
    workdir = Path(tempfile.mkdtemp(prefix="testhost-rootfs-"))
    root = workdir / "root"
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE,
             str(root), mirror],
            check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", POST_INSTALL], check=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["/sbin/init"]', "-", tag],
            stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL,
        )
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"[image] built {tag}")
    return tag


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["base", "tag"])
    args = parser.parse_args(argv)
    if args.what == "tag":
        print(base_tag())
    else:
        build_base()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

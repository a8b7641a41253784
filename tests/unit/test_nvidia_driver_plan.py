"""Each distribution's plan for the nvidia_driver role: repositories, packages, holds, pin.

The role's data is rendered the way Ansible renders it (ansible-core's Templar over the
role's own defaults, vars files and task expressions), so a wrong package name, a wrong
repository or a hold on the wrong list fails here, for the releases no test host can run
(Ubuntu, the CUDA repository). The Secure Boot filters are tested on mokutil's texts.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

from scripts import gen_var_docs

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "nvidia_driver"
CUDA = "https://developer.download.nvidia.com/compute/cuda/repos"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RELEASES = {("Ubuntu", "22"): "Ubuntu-22.yml", ("Ubuntu", "24"): "Ubuntu-24.yml", ("Debian", "12"): "Debian-12.yml"}


def load(path: Path) -> Any:
    return DataLoader().load_from_file(str(path), trusted_as_template=True)


def templar(distribution: str, major: str, *, arch: str = "x86_64", kernel: str = "6.8.0-45-generic",
            **inventory: Any) -> Templar:
    """A Templar holding what the role sees on such a host, inventory overrides included."""
    facts = {"distribution": distribution, "distribution_major_version": major, "architecture": arch,
             "kernel": kernel, "distribution_version": major}
    variables: dict[str, Any] = {}
    variables.update(load(ROLE / "defaults" / "main.yml"))
    variables.update(inventory)
    variables.update(load(ROLE / "vars" / RELEASES[(distribution, major)]))
    variables.update(load(ROLE / "vars" / "main.yml"))
    variables.update(ansible_facts=facts, inventory_hostname="gpu-1", role_path=str(ROLE))
    return Templar(loader=DataLoader(), variables=variables)


def render(t: Templar, name: str) -> Any:
    return t.template(t.available_variables[name])


def plan(distribution: str, major: str, **inventory: Any) -> dict[str, Any]:
    t = templar(distribution, major, **inventory)
    return {
        "source": render(t, "__nvidia_driver_source"),
        "packages": render(t, "__nvidia_driver_planned_packages"),
        "headers": render(t, "__nvidia_driver_headers"),
        "repositories": render(t, "__nvidia_driver_plan")["repositories"],
        "removed_repositories": [repo["name"] for repo in render(t, "__nvidia_driver_other_repositories")],
        "record": render(t, "__nvidia_driver_record"),
    }


def task(file: str, name: str) -> dict[str, Any]:
    for entry in load(ROLE / "tasks" / file):
        for candidate in [entry, *entry.get("block", [])]:
            if candidate.get("name") == name:
                return candidate
    raise AssertionError(f"no task {name!r} in tasks/{file}")


def cuda_repo(distro: str, arch: str = "x86_64") -> dict[str, Any]:
    url = f"{CUDA}/{distro}/{arch}/"
    return {"name": "nvidia-driver-cuda", "uris": [url], "suites": ["/"], "signed_by": f"{url}3bf863cc.pub"}


# --- Ubuntu ----------------------------------------------------------------------


@pytest.mark.parametrize("major", ["22", "24"])
def test_ubuntu_default_is_the_archive_server_branch_with_open_modules(major: str) -> None:
    got = plan("Ubuntu", major)
    assert got["source"] == "distribution"
    assert got["packages"] == [
        "nvidia-headless-no-dkms-570-server-open", "nvidia-utils-570-server", "nvidia-dkms-570-server-open",
    ]
    assert got["headers"] == ["linux-headers-6.8.0-45-generic"]
    assert got["repositories"] == []  # restricted is part of Ubuntu's own sources
    assert got["removed_repositories"] == ["nvidia-driver-cuda"]


def test_ubuntu_proprietary_modules_and_another_branch() -> None:
    got = plan("Ubuntu", "24", nvidia_driver_branch=580, nvidia_driver_open_kernel_modules=False)
    assert got["packages"] == ["nvidia-headless-no-dkms-580-server", "nvidia-utils-580-server", "nvidia-dkms-580-server"]


@pytest.mark.parametrize(("major", "distro"), [("22", "ubuntu2204"), ("24", "ubuntu2404")])
def test_ubuntu_cuda_repository(major: str, distro: str) -> None:
    got = plan("Ubuntu", major, nvidia_driver_source="cuda")
    assert got["repositories"] == [cuda_repo(distro)]
    assert got["packages"] == ["nvidia-headless-no-dkms-570-open", "nvidia-utils-570", "nvidia-dkms-570-open"]
    assert got["removed_repositories"] == []


def test_ubuntu_cuda_repository_on_arm64_servers_is_sbsa() -> None:
    got = plan("Ubuntu", "24", nvidia_driver_source="cuda", arch="aarch64")
    assert got["repositories"] == [cuda_repo("ubuntu2404", "sbsa")]


# --- Debian 12 ---------------------------------------------------------------------


def test_debian_default_is_nvidias_cuda_repository() -> None:
    got = plan("Debian", "12", kernel="6.1.0-26-amd64")
    assert got["source"] == "cuda"
    assert got["repositories"] == [
        {"name": "nvidia-driver-debian-contrib", "uris": ["http://deb.debian.org/debian"],
         "suites": ["bookworm", "bookworm-updates"], "components": ["contrib"], "signed_by": DEBIAN_KEYRING},
        cuda_repo("debian12"),
    ]
    assert got["packages"] == ["nvidia-driver-cuda", "nvidia-smi", "libcuda1", "nvidia-persistenced",
                               "nvidia-kernel-open-dkms"]
    assert got["headers"] == ["linux-headers-6.1.0-26-amd64"]
    assert got["removed_repositories"] == ["nvidia-driver-debian-nonfree", "nvidia-driver-debian-security-nonfree"]


def test_debian_cuda_proprietary_module() -> None:
    got = plan("Debian", "12", nvidia_driver_open_kernel_modules=False)
    assert got["packages"][-1] == "nvidia-kernel-dkms"


def test_debian_archive_plan_is_non_free_tesla_branch_packages() -> None:
    got = plan("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
               nvidia_driver_open_kernel_modules=False, nvidia_driver_debian_mirror="http://mirror.example/debian")
    nonfree = ["contrib", "non-free", "non-free-firmware"]
    assert got["repositories"] == [
        {"name": "nvidia-driver-debian-nonfree", "uris": ["http://mirror.example/debian"],
         "suites": ["bookworm", "bookworm-updates"], "components": nonfree, "signed_by": DEBIAN_KEYRING},
        {"name": "nvidia-driver-debian-security-nonfree", "uris": ["http://deb.debian.org/debian-security"],
         "suites": ["bookworm-security"], "components": nonfree, "signed_by": DEBIAN_KEYRING},
    ]
    assert got["packages"] == ["nvidia-tesla-535-smi", "libnvidia-tesla-535-cuda1", "libnvidia-tesla-535-cfg1",
                               "nvidia-persistenced", "nvidia-tesla-535-kernel-dkms"]
    assert got["removed_repositories"] == ["nvidia-driver-debian-contrib", "nvidia-driver-cuda"]


def test_debian_userspace_only_plan_is_what_the_e2e_test_installs() -> None:
    got = plan("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=470,
               nvidia_driver_kernel_module=False)
    assert got["packages"] == ["nvidia-tesla-470-smi", "libnvidia-tesla-470-cuda1", "libnvidia-tesla-470-cfg1",
                               "nvidia-persistenced"]
    assert got["headers"] == []
    assert got["record"] == {"branch": 470, "source": "distribution", "packages": got["packages"]}


def test_explicit_package_list_replaces_the_plan() -> None:
    got = plan("Debian", "12", nvidia_driver_packages=["nvidia-smi"])
    assert got["packages"] == ["nvidia-smi"]


# --- preflight: what the role refuses --------------------------------------------------


def assertion_holds(t: Templar, file: str, name: str) -> bool:
    entry = task(file, name)
    conditions = entry.get("when", [])
    applies = all(t.evaluate_conditional(c) for c in (conditions if isinstance(conditions, list) else [conditions]))
    return (not applies) or t.evaluate_conditional(entry["ansible.builtin.assert"]["that"])


def test_debian_archive_refuses_branch_570_and_says_use_cuda() -> None:
    name = "Stop on a branch the distribution's archive does not carry"
    assert not assertion_holds(templar("Debian", "12", nvidia_driver_source="distribution"), "preflight.yml", name)
    assert assertion_holds(templar("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
                                   nvidia_driver_open_kernel_modules=False), "preflight.yml", name)
    assert assertion_holds(templar("Ubuntu", "24"), "preflight.yml", name)  # Ubuntu's list is open-ended
    message = task("preflight.yml", name)["ansible.builtin.assert"]["fail_msg"]
    rendered = templar("Debian", "12", nvidia_driver_source="distribution").template(message)
    assert "470, 535 only, not 570" in rendered and "nvidia_driver_source: cuda" in rendered


def test_debian_archive_refuses_open_modules_it_does_not_have() -> None:
    name = "Stop on open kernel modules the distribution's archive does not carry"
    assert not assertion_holds(templar("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535),
                               "preflight.yml", name)
    assert assertion_holds(templar("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
                                   nvidia_driver_kernel_module=False), "preflight.yml", name)


def test_unknown_release_loads_the_unsupported_vars() -> None:
    entry = task("main.yml", "Load the plan for this distribution release")
    files = entry["vars"]["__nvidia_driver_vars_files"]["files"]
    t = templar("Ubuntu", "24")
    assert t.template(files) == ["Ubuntu-24.yml", "unsupported.yml"]
    for name in RELEASES.values():
        assert load(ROLE / "vars" / name)["__nvidia_driver_supported"] is True
    assert load(ROLE / "vars" / "unsupported.yml")["__nvidia_driver_supported"] is False


# --- holds and the upgrade path -----------------------------------------------------------


def installed_state(t: Templar, record: dict[str, Any] | None, held: list[str]) -> dict[str, Any]:
    """Render preflight's set_fact as Ansible would after reading the record and apt-mark showhold."""
    entry = task("preflight.yml", "Remember what is installed and what changes")
    content = {"content": base64.b64encode(json.dumps(record).encode()).decode()} if record else {"failed": False}
    t.available_variables = {
        **t.available_variables, "__nvidia_driver_record_file": content,
        "__nvidia_driver_showhold": {"stdout_lines": held},
        **entry["vars"],
    }
    facts = {key: t.template(value) for key, value in entry["ansible.builtin.set_fact"].items()}
    t.available_variables = {**t.available_variables, **facts}
    return facts


def test_first_install_is_no_change_and_holds_the_planned_packages() -> None:
    t = templar("Ubuntu", "24")
    facts = installed_state(t, None, [])
    assert facts["__nvidia_driver_changes"] is False
    hold = task("packages.yml", "Hold the driver packages so that apt upgrades leave them alone")
    assert hold["ansible.builtin.dpkg_selections"]["selection"] == "hold"
    assert t.template(hold["loop"]) == [
        "nvidia-headless-no-dkms-570-server-open", "nvidia-utils-570-server", "nvidia-dkms-570-server-open",
    ]
    install = task("packages.yml", "Install the driver packages")["ansible.builtin.apt"]
    assert t.template(install["name"]) == t.template(hold["loop"]) + ["linux-headers-6.8.0-45-generic"]
    assert t.template(install["state"]) == "present"
    assert install["install_recommends"] is False


def test_same_plan_again_is_no_change() -> None:
    t = templar("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
                nvidia_driver_kernel_module=False)
    planned = plan("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
                   nvidia_driver_kernel_module=False)["record"]
    assert installed_state(t, planned, planned["packages"])["__nvidia_driver_changes"] is False


def test_branch_change_is_refused_without_the_upgrade_flag() -> None:
    old = {"branch": 550, "source": "distribution",
           "packages": ["nvidia-headless-no-dkms-550-server-open", "nvidia-utils-550-server", "nvidia-dkms-550-server-open"]}
    t = templar("Ubuntu", "22")
    facts = installed_state(t, old, old["packages"] + ["unrelated-held-package"])
    assert facts["__nvidia_driver_changes"] is True
    refuse = task("preflight.yml", "Refuse to change the installed driver without nvidia_driver_upgrade")
    assert all(t.evaluate_conditional(condition) for condition in refuse["when"])
    message = t.template(refuse["ansible.builtin.fail"]["msg"])
    assert "branch 550" in message and "branch 570" in message and "-e nvidia_driver_upgrade=true" in message


def test_upgrade_unholds_installs_latest_removes_the_old_branch_and_reholds() -> None:
    old = {"branch": 550, "source": "distribution",
           "packages": ["nvidia-headless-no-dkms-550-server-open", "nvidia-utils-550-server", "nvidia-dkms-550-server-open"]}
    t = templar("Ubuntu", "22", nvidia_driver_upgrade=True)
    facts = installed_state(t, old, old["packages"] + ["unrelated-held-package"])
    refuse = task("preflight.yml", "Refuse to change the installed driver without nvidia_driver_upgrade")
    assert not all(t.evaluate_conditional(condition) for condition in refuse["when"])
    unhold = task("packages.yml", "Release the holds this upgrade must move")
    assert unhold["ansible.builtin.dpkg_selections"]["selection"] == "install"
    assert sorted(t.template(unhold["loop"])) == sorted(old["packages"])  # never someone else's hold
    install = task("packages.yml", "Install the driver packages")["ansible.builtin.apt"]
    assert t.template(install["state"]) == "latest"
    assert sorted(facts["__nvidia_driver_retired_packages"]) == sorted(old["packages"])
    remove = task("packages.yml", "Remove the packages of the previous driver")
    assert remove["ansible.builtin.apt"]["state"] == "absent"
    assert all(t.evaluate_conditional(condition) for condition in remove["when"])
    assert t.template(task("packages.yml", "Hold the driver packages so that apt upgrades leave them alone")["loop"]) == [
        "nvidia-headless-no-dkms-570-server-open", "nvidia-utils-570-server", "nvidia-dkms-570-server-open",
    ]


def test_source_change_on_debian_counts_as_a_driver_change() -> None:
    old = plan("Debian", "12", nvidia_driver_source="distribution", nvidia_driver_branch=535,
               nvidia_driver_open_kernel_modules=False)["record"]
    t = templar("Debian", "12")
    assert installed_state(t, old, old["packages"])["__nvidia_driver_changes"] is True


# --- the pin ---------------------------------------------------------------------------------


def pin_file(branch: int) -> str:
    t = templar("Ubuntu", "24", nvidia_driver_branch=branch)
    return t.template(
        load_template("etc/apt/preferences.d/nvidia-driver.pref.j2")
    )


def load_template(relative: str) -> Any:
    from ansible.template import trust_as_template

    return trust_as_template((ROLE / "templates" / relative).read_text())


def test_pin_file_pins_the_branch_for_every_driver_package() -> None:
    text = pin_file(570)
    fields = dict(line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert fields["Package"] == "*nvidia* libcuda* libnvcuvid* libnvoptix* cuda-drivers*"
    assert fields["Pin"] == r"version /^([0-9]+:)?570\./"
    assert fields["Pin-Priority"] == "1001"
    version = re.compile(fields["Pin"].removeprefix("version /").removesuffix("/"))
    for pinned in ["570.86.15-0ubuntu1", "570.172.08-1", "1:570.133.20-1", "570.195.03-0ubuntu0.24.04.1"]:
        assert version.search(pinned), pinned
    for other in ["575.51.03-1", "580.65.06-1", "535.261.03-1", "5700.1"]:
        assert not version.search(other), other


# --- variables: every one documented and typed --------------------------------------------


def test_every_default_has_a_comment_and_a_typed_argument_spec() -> None:
    lines = (ROLE / "defaults" / "main.yml").read_text().splitlines()
    defaults = yaml.safe_load("\n".join(lines))
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    options = {**specs["main"]["options"], **specs["gate"]["options"]}
    for name in defaults:
        assert name.startswith("nvidia_driver_")
        line = next(i for i, text in enumerate(lines) if text.startswith(f"{name}:"))
        assert lines[line - 1].startswith("# "), f"{name} has no one-line comment above it"
        assert name in options and "type" in options[name], f"{name} is not typed in meta/argument_specs.yml"
        if options[name]["type"] != "list":
            assert options[name]["default"] == defaults[name], name
    assert set(options) == set(defaults)
    assert options["nvidia_driver_source"]["choices"] == ["auto", "distribution", "cuda"]
    assert options["nvidia_driver_gate_quantization"]["choices"] == ["awq", "none"]


# --- Secure Boot: mokutil's texts ------------------------------------------------------------


def load_filters() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nvidia_driver_filters", REPO / "plugins" / "filter" / "nvidia_driver.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filters = load_filters()


@pytest.mark.parametrize(
    ("output", "state"),
    [
        # https://github.com/linux-surface/linux-surface/issues/906
        ("SecureBoot enabled\n", "enabled"),
        # lcp/mokutil src/mokutil.c sb_state(): "SecureBoot disabled", plus "Platform is in Setup Mode"
        ("SecureBoot disabled\n", "disabled"),
        ("SecureBoot disabled\nPlatform is in Setup Mode\n", "disabled"),
        # after `mokutil --disable-validation`: shim loads unsigned modules
        ("SecureBoot enabled\nSecureBoot validation is disabled in shim\n", "validation-disabled"),
        # recorded in this project's Debian 12 test container (mokutil 0.6.0, stderr, exit 1); also
        # https://github.com/darlinghq/darling/issues/1025
        ("\nEFI variables are not supported on this system\n", "no-efi"),
        ("This system doesn't support Secure Boot\n", "no-efi"),
        ("Failed to read SecureBoot\n", "no-efi"),
        ("mokutil: command not found\n", "unknown"),
    ],
)
def test_secure_boot_state(output: str, state: str) -> None:
    assert filters.secure_boot_state(output) == state


@pytest.mark.parametrize(
    ("output", "state"),
    [
        ("/var/lib/dkms/mok.pub is already enrolled\n", "enrolled"),  # lcp/mokutil test_key()
        ("/var/lib/dkms/mok.pub is not enrolled\n", "not-enrolled"),
        ("/var/lib/shim-signed/mok/MOK.der is already in the enrollment request\n", "pending"),
        ("Failed to open /var/lib/dkms/mok.pub\n", "not-enrolled"),
    ],
)
def test_mok_key_state(output: str, state: str) -> None:
    assert filters.mok_key_state(output) == state


def test_secure_boot_refusal_message_says_what_to_do() -> None:
    t = templar("Debian", "12")
    t.available_variables = {**t.available_variables, "__nvidia_driver_mok_state": "not-enrolled",
                             "__nvidia_driver_secure_boot": "enabled"}
    entry = task("secure-boot.yml", "Refuse to install a driver that Secure Boot would not load")
    message = t.template(entry["ansible.builtin.fail"]["msg"])
    assert "Secure Boot is enabled on gpu-1" in message
    assert "mokutil --import /var/lib/dkms/mok.pub" in message and "Enroll MOK" in message
    assert "disable Secure Boot" in message
    ubuntu = templar("Ubuntu", "24")
    ubuntu.available_variables = {**ubuntu.available_variables, "__nvidia_driver_mok_state": "pending"}
    message = ubuntu.template(entry["ansible.builtin.fail"]["msg"])
    assert "update-secureboot-policy --new-key" in message and "waits for a reboot" in message


# --- docs/nvidia-driver.md's variable table is generated from the role (scripts/gen_var_docs.py) -------

def test_docs_variable_table_is_current() -> None:
    text = (REPO / "docs" / "nvidia-driver.md").read_text()
    assert gen_var_docs.TABLE_BEGIN in text and gen_var_docs.TABLE_END in text
    assert text == gen_var_docs.render_nvidia_driver_doc(), "run scripts/gen_var_docs.py"
    table = gen_var_docs.nvidia_driver_variables_table()
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert all(f"| `{name}` |" in table for name in defaults)

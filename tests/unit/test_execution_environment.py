"""execution-environment.yml (AWX / AAP): the image needs registries out of reach here, so what
is tested is what can be: ansible-builder accepts the definition and makes its build context,
and every package the image pins is pinned alike in requirements.txt (the tested controller)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.unit.loader import REPO

DEFINITION = REPO / "execution-environment.yml"
BUILDER = Path(sys.executable).parent / "ansible-builder"


def pins(lines: list[str]) -> dict[str, str]:
    """{lower-case name: version} of `name==version` lines; comments and blanks skipped."""
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+)\s*(#.*)?", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def image_pins(definition: dict) -> dict[str, str]:
    deps = definition["dependencies"]
    return pins([deps["ansible_core"]["package_pip"], *deps["python"]])


def test_every_package_of_the_image_is_pinned_as_the_tested_controller() -> None:
    controller = pins((REPO / "requirements.txt").read_text().splitlines())
    image = image_pins(yaml.safe_load(DEFINITION.read_text()))
    # What the playbooks need on the controller: ansible-core, the collections the `ansible`
    # package bundles (community.general, ansible.posix), Jinja2.
    assert {"ansible-core", "ansible", "jinja2"} <= set(image), image
    assert {name: controller.get(name) for name in image} == image


def test_a_pin_that_drifts_from_requirements_is_caught() -> None:
    definition = yaml.safe_load(DEFINITION.read_text())
    definition["dependencies"]["ansible_core"]["package_pip"] = "ansible-core==2.18.0"
    controller = pins((REPO / "requirements.txt").read_text().splitlines())
    image = image_pins(definition)
    assert {name: controller.get(name) for name in image} != image


def test_ansible_builder_makes_the_build_context(tmp_path: Path) -> None:
    context = tmp_path / "context"
    result = subprocess.run([str(BUILDER), "create", "-f", str(DEFINITION), "--context", str(context)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    built = pins((context / "_build" / "requirements.txt").read_text().splitlines())
    assert built == {k: v for k, v in image_pins(yaml.safe_load(DEFINITION.read_text())).items() if k != "ansible-core"}
    # ansible-core and ansible-runner go in together, as the definition pins them.
    deps = yaml.safe_load(DEFINITION.read_text())["dependencies"]
    refs = f'ANSIBLE_INSTALL_REFS="{deps["ansible_core"]["package_pip"]} {deps["ansible_runner"]["package_pip"]}"'
    assert refs in (context / "Dockerfile").read_text()


def test_ansible_builder_refuses_a_broken_definition(tmp_path: Path) -> None:
    definition = yaml.safe_load(DEFINITION.read_text())
    definition["dependencies"]["ansible_core"] = {"package_pipp": "ansible-core==2.19.14"}
    broken = tmp_path / "execution-environment.yml"
    broken.write_text(yaml.safe_dump(definition))
    result = subprocess.run([str(BUILDER), "create", "-f", str(broken), "--context", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "package_pipp" in result.stdout + result.stderr

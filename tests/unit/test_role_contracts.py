"""The role's documentation and validation agree with its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts import gen_var_docs

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parents[1] for p in REPO.glob("roles/*/meta/argument_specs.yml"))


def test_variable_reference_is_generated_from_the_specs() -> None:
    assert (REPO / "docs/variables.md").read_text() == gen_var_docs.render(), "run scripts/gen_var_docs.py"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_is_specified_and_every_spec_option_has_a_default(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]
    specified: dict[str, dict] = {}
    for entry in specs.values():
        specified.update(entry.get("options", {}))
    assert set(defaults) <= set(specified), f"undocumented defaults: {set(defaults) - set(specified)}"
    for name, spec in specified.items():
        if name in defaults and "default" in spec:
            assert spec["default"] == defaults[name], f"{role.name}: {name} default differs between specs and defaults"
    for name in defaults:
        assert name.startswith(role.name + "_"), f"{name} is not prefixed with the role name"

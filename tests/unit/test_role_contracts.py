"""The role's documentation and validation agree with its defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scripts import gen_var_docs

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parents[1] for p in REPO.glob("roles/*/meta/argument_specs.yml"))


def test_variable_reference_is_generated_from_the_specs() -> None:
    assert (REPO / "docs/variables.md").read_text() == gen_var_docs.render(), "run scripts/gen_var_docs.py"


@pytest.mark.parametrize("role", sorted(p.parents[1].name for p in REPO.glob("roles/*/meta/argument_specs.yml")))
def test_each_role_readme_is_generated_from_its_specs(role: str) -> None:
    readme = (REPO / "roles" / role / "README.md").read_text()
    assert readme == gen_var_docs.render_role_readme(role), "run scripts/gen_var_docs.py"
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    for entry, spec in specs.items():
        assert f"`{entry}`" in readme and spec["short_description"].split(" (")[0] in readme
        for option in spec.get("options", {}):
            assert f"`{option}`" in readme, (role, entry, option)


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


def _walk_assigned(node: object, found: set[str]) -> None:
    """Names a task sets: `register:` and set_fact keys."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "register" and isinstance(value, str):
                found.add(value)
            if key == "ansible.builtin.set_fact" and isinstance(value, dict):
                found.update(value)
            _walk_assigned(value, found)
    elif isinstance(node, list):
        for item in node:
            _walk_assigned(item, found)


def test_every_variable_the_playbooks_read_is_documented_or_internal() -> None:
    """A vllm_* name a playbook (or its template) reads is a role's option, a fact a task sets, an
    internal value (__vllm_*), or documented in meta/playbook_variables.yml (docs/variables.md):
    nothing an operator may set goes unlisted, and nothing listed is unread."""
    options: set[str] = set()
    for path in REPO.glob("roles/*/meta/argument_specs.yml"):
        for spec in yaml.safe_load(path.read_text())["argument_specs"].values():
            options |= set(spec.get("options") or {})
    derived = set().union(*(set(yaml.safe_load(p.read_text()) or {}) for p in REPO.glob("roles/*/vars/main.yml")))
    assigned: set[str] = set()
    for path in [*REPO.glob("playbooks/**/*.yml"), *REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("roles/*/handlers/*.yml")]:
        _walk_assigned(yaml.safe_load(path.read_text()), assigned)
    read: set[str] = set()
    for path in [*REPO.glob("playbooks/**/*.yml"), *REPO.glob("templates/**/*.j2")]:
        body = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        read |= set(re.findall(r"(?<![.\w])vllm_[a-z0-9_]+\b", body))
    groups = {"vllm_servers", "vllm_monitoring"}
    documented = set(yaml.safe_load((REPO / "meta" / "playbook_variables.yml").read_text()))
    assert read - options - derived - assigned - groups == documented


@pytest.mark.parametrize("role", sorted(p.parents[1].name for p in REPO.glob("roles/*/vars/main.yml")))
def test_a_role_s_derived_values_are_internal(role: str) -> None:
    """vars/main.yml outranks the inventory: a derived value there named like a setting
    (vllm_model_path, vllm_check_url, ...) silently beat the operator's. Every name there is
    internal (__<role>_*), so no inventory name can collide with one."""
    prefix = {"vllm": "__vllm_", "vllm_observability": "__vllm_observability_", "nvidia_driver": "__nvidia_driver_",
              "vllm_balancer": "__vllm_balancer_"}[role]
    names = yaml.safe_load((REPO / "roles" / role / "vars" / "main.yml").read_text()) or {}
    assert [name for name in names if not name.startswith(prefix)] == []


def _task_lists(path: Path) -> list[list[dict]]:
    data = yaml.safe_load(path.read_text()) or []
    if path.parent.name == "playbooks":
        return [play.get(key) or [] for play in data for key in ("pre_tasks", "tasks", "post_tasks")]
    return [data]


def _names(tasks: list[dict], registered: dict[str, set[str]], facts: dict[str, set[str]], where: str) -> None:
    for task in tasks:
        if not isinstance(task, dict):
            continue
        for key in ("block", "rescue", "always"):
            _names(task.get(key) or [], registered, facts, where)
        if "register" in task:
            registered.setdefault(task["register"], set()).add(where)
        if isinstance(task.get("ansible.builtin.set_fact"), dict):
            for name in task["ansible.builtin.set_fact"]:
                facts.setdefault(name, set()).add(where)


def test_no_name_is_both_a_registered_result_and_a_fact() -> None:
    """Both live at the same precedence and the later one wins: the copy plan of artifacts.yml was
    registered as vllm_plan, the name of the service plan (service.yml), so a run whose tags skipped
    the service stage would have reported the copy plan as what it did to the service."""
    registered: dict[str, set[str]] = {}
    facts: dict[str, set[str]] = {}
    paths = [*REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("playbooks/*.yml"), *REPO.glob("playbooks/tasks/*.yml")]
    for path in paths:
        for tasks in _task_lists(path):
            _names(tasks, registered, facts, str(path.relative_to(REPO)))
    assert registered and facts
    assert "vllm_plan" in facts and "vllm_copy_plan" in registered
    both = {name: (registered[name], facts[name]) for name in set(registered) & set(facts)}
    assert not both, both


def test_plays_and_other_roles_read_only_the_vllm_role_s_documented_facts() -> None:
    """The playbooks, the balancer and observability roles and the report template read the vllm
    role's outputs (meta/facts.yml, rendered into its README), never its working values: before,
    rolling_restart.yml read a fact a handler set (vllm_restart_pending), playbooks read
    vllm_ready.elapsed and the balancer vllm_ready_at, all registered or set deep inside the role."""
    registered: dict[str, set[str]] = {}
    facts: dict[str, set[str]] = {}
    for path in REPO.glob("roles/vllm/tasks/*.yml"):
        _names(yaml.safe_load(path.read_text()) or [], registered, facts, path.name)
    documented = set(yaml.safe_load((REPO / "roles/vllm/meta/facts.yml").read_text()))
    role_sets = (set(registered) | set(facts)) - {n for n in set(registered) | set(facts) if n.startswith("__")}
    assert documented <= role_sets, documented - role_sets
    readers = [*REPO.glob("playbooks/*.yml"), *REPO.glob("playbooks/tasks/*.yml"), *REPO.glob("templates/*.j2"),
               *REPO.glob("roles/vllm_balancer/**/*.yml"), *REPO.glob("roles/vllm_observability/**/*.yml")]
    undocumented = {}
    for path in readers:
        text = path.read_text()
        for name in role_sets - documented:
            if re.search(rf"\b{re.escape(name)}\b", text):
                undocumented.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not undocumented, undocumented
    readme = (REPO / "roles/vllm/README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in documented)

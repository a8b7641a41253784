"""The vllm role's variables and templates as Ansible renders them, without a host: its
defaults, a shipped inventory's group_vars, overrides (as -e would) and its vars/main.yml,
through Ansible's own Templar and this collection's filters (tests/unit/conftest.py
configured the collection loader: collections/ links to the repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible._internal._datatag._tags import TrustedAsTemplate
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import filter_loader
from ansible.template import Templar
from ansible.utils.collection_loader import AnsibleCollectionConfig

from tests.unit.loader import REPO

ROLE = REPO / "roles" / "vllm"


def _load(path: Path) -> Any:
    return DataLoader().load_from_file(str(path), trusted_as_template=True)


def templar(inventory: str, role: Path = ROLE, **overrides: Any) -> Templar:
    """A Templar over the role's variables for `inventory` (a folder of inventory/); the GPU
    gate's kernel as on an RTX (compute capability 8.9)."""
    assert AnsibleCollectionConfig.collection_finder is not None
    filter_loader.add_directory(str(REPO / "plugins" / "filter"))
    variables: dict[str, Any] = {}
    variables.update(_load(ROLE / "defaults" / "main.yml"))
    for path in sorted((REPO / "inventory" / inventory / "group_vars").glob("*.yml")):
        variables.update(_load(path))
    variables.update(overrides)
    variables.update(_load(ROLE / "vars" / "main.yml"))
    variables.update(nvidia_driver_gpu={"quantization_kernel": "awq_marlin"}, ansible_managed="Ansible managed",
                     inventory_hostname="host-1", role_path=str(role), playbook_dir=str(REPO / "playbooks"))
    return Templar(loader=DataLoader(), variables=variables)


def render_file(template: Path, inventory: str, role: Path = ROLE, **overrides: Any) -> str:
    """A template file of the role, rendered; the role's own file is trusted, as the template
    action trusts it."""
    return str(templar(inventory, role, **overrides).template(TrustedAsTemplate().tag(template.read_text())))


def render_var(name: str, inventory: str, **overrides: Any) -> Any:
    """One variable of the role (e.g. __vllm_release_record), fully rendered."""
    return templar(inventory, **overrides).template(TrustedAsTemplate().tag("{{ " + name + " }}"))

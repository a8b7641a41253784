"""Every tier: Ansible's collection loader, before any test imports a plugin or renders with
ansible-core. This collection's plugins, and the module_utils its modules and filters import,
resolve by their FQCN (ansible_collections.inference.vllm_lora...) through collections/, which
links to the repository root, as ansible-playbook resolves them."""

from __future__ import annotations

from pathlib import Path

from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

# Once a process: a second configuration is refused by Ansible (with a warning).
if AnsibleCollectionConfig.collection_finder is None:
    init_plugin_loader([str(Path(__file__).resolve().parents[1] / "collections")])

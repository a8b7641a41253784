#!/usr/bin/python
"""Ansible module: check LoRA adapters against the base model and vLLM 0.11.0's rules.

Why: vLLM refuses a bad static adapter only when the service starts (and some
only at the first request, or never: an adapter for another base model whose
shapes fit is served with wrong output). Checking the files first, before
anything on a host changes, turns a failed restart into a clear error.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vllm_adapter_check
short_description: Check PEFT LoRA adapters against a base model and vLLM 0.11.0's rules
description:
  - Reads each adapter's C(adapter_config.json), its C(adapter_model.safetensors) (the
    header, then the LoRA tensors' values in bounded chunks; F16, BF16, F32 and F64 are
    read, other dtypes are skipped with a warning), and the base model's C(config.json).
    A pickled C(adapter_model.bin)/C(.pt) is never unpickled.
  - Fails, with one line per problem naming the adapter, the field, the value and the
    fix, on what vLLM 0.11.0 refuses or would serve wrongly - not LoRA (C(peft_type));
    DoRA (C(use_dora)); C(modules_to_save) set; C(bias) not C(none); a target module
    the base has no LoRA support for; a rank (C(r), C(rank_pattern), the tensor shapes)
    above the max LoRA rank; C(rank_pattern)/C(alpha_pattern) that vLLM would scale
    differently than trained; tensor shapes or layer indices that do not fit the base
    model; C(base_model_name_or_path) naming another model; no weights file; only a
    pickled C(adapter_model.bin)/C(.pt) (unless the adapter has C(allow_pickle=true),
    then a warning that its tensors are not checked); NaN or Inf in a LoRA tensor; every
    lora_B all zeros (an untrained adapter, which changes nothing); missing
    C(r)/C(lora_alpha)/C(target_modules); a name that is empty, duplicated, a served
    model name or unsafe in a path or URL; a checksum mismatch.
  - Also checks the engine settings - O(max_lora_rank) must be one of 8, 16, 32, 64, 128,
    256, 320, 512 (0 derives the smallest that fits every adapter), O(max_cpu_loras)
    must be at least O(max_loras); more adapters than O(max_loras) is a warning.
  - Only reads; never changes anything. Uses only the Python standard library, so it
    runs on the controller (C(delegate_to=localhost)) or on a target host.
options:
  adapters:
    description:
      - The adapters, each a dict with C(name) (the served name), C(path) (the adapter
        directory where this module runs) and optionally C(allow_pickle) (bool, default
        false - accept a C(.bin)/C(.pt) without C(adapter_model.safetensors), unchecked).
        Other keys are ignored.
    type: list
    elements: dict
    required: true
  base_model_config:
    description:
      - The base model's C(config.json) - a path to it, a path to the model directory,
        or the parsed dict.
    type: raw
    required: true
  base_model_names:
    description:
      - Names under which the base model is accepted in an adapter's
        C(base_model_name_or_path), for example the hub repo id and the model
        directory's name. Compared by basename, case-insensitively, ignoring
        quantisation suffixes (C(-AWQ), C(-GPTQ-Int4), C(-bnb-4bit), ...).
      - Empty - the name is not checked.
    type: list
    elements: str
    default: []
  base_model_mismatch:
    description: What a C(base_model_name_or_path) naming another model is.
    type: str
    choices: [error, warn]
    default: error
  served_model_names:
    description: Names the base model is served under; an adapter may not take one.
    type: list
    elements: str
    default: []
  max_lora_rank:
    description: vLLM C(--max-lora-rank); 0 derives the smallest allowed value that fits every adapter.
    type: int
    default: 0
  max_loras:
    description: vLLM C(--max-loras).
    type: int
    default: 1
  max_cpu_loras:
    description: vLLM C(--max-cpu-loras); 0 is unset (vLLM uses O(max_loras)).
    type: int
    default: 0
  supported_modules:
    description:
      - Module names the base model supports LoRA for in vLLM. Default by the base model's
        architecture (C(Qwen2ForCausalLM) - q_proj, k_proj, v_proj, o_proj, gate_proj,
        up_proj, down_proj); for an unknown architecture they are not checked (a warning).
    type: list
    elements: str
    required: false
  checksums:
    description:
      - "Per adapter name, a manifest C({relative path: sha256}) (or C({relative path: {sha256: ...}})
        as C(vllm_manifest) writes); every listed file must exist and match."
    type: dict
    required: false
author:
  - vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Check the adapters on the controller before touching the hosts
  vllm_adapter_check:
    adapters: "{{ vllm_lora_adapters }}"
    base_model_config: "{{ vllm_model.path }}/config.json"
    base_model_names: [Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-7B-Instruct-AWQ]
    served_model_names: "{{ vllm_served_model_names }}"
    max_lora_rank: "{{ vllm_max_lora_rank }}"
    max_loras: "{{ vllm_max_loras }}"
    max_cpu_loras: "{{ vllm_max_cpu_loras }}"
  delegate_to: localhost
  run_once: true
  register: vllm_adapter_check

- name: Use the derived rank
  ansible.builtin.debug:
    msg: "--max-lora-rank {{ vllm_adapter_check.max_lora_rank_effective }}"
"""

RETURN = r"""
max_lora_rank_effective:
  description: O(max_lora_rank), or the derived value when it is 0 (vLLM's default 16 without adapters).
  returned: always
  type: int
  sample: 16
ranks:
  description: Largest rank of each adapter (C(r), C(rank_pattern), tensor shapes); null when unknown.
  returned: always
  type: dict
  sample: {alpha: 8, beta: 16}
adapters:
  description: One report per adapter.
  returned: always
  type: list
  elements: dict
  contains:
    name: {description: Adapter name., type: str}
    path: {description: Adapter directory., type: str}
    rank: {description: Largest rank seen., type: int}
    weights: {description: "C(safetensors), C(bin), C(pt), or null when missing.", type: str}
    problems: {description: Errors for this adapter., type: list, elements: str}
    warnings: {description: Warnings for this adapter., type: list, elements: str}
errors:
  description: Every error (the lines of C(msg)).
  returned: on failure
  type: list
  elements: str
  sample: ["adapter 'dora': adapter_config.json use_dora = true: vLLM 0.11.0 does not support DoRA ..."]
"""

import json
from typing import Any, Dict

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_adapters import check_all

ARGUMENT_SPEC: Dict[str, Any] = {
    "adapters": {"type": "list", "elements": "dict", "required": True},
    "base_model_config": {"type": "raw", "required": True},
    "base_model_names": {"type": "list", "elements": "str", "default": []},
    "base_model_mismatch": {"type": "str", "choices": ["error", "warn"], "default": "error"},
    "served_model_names": {"type": "list", "elements": "str", "default": []},
    "max_lora_rank": {"type": "int", "default": 0},
    "max_loras": {"type": "int", "default": 1},
    "max_cpu_loras": {"type": "int", "default": 0},
    "supported_modules": {"type": "list", "elements": "str"},
    "checksums": {"type": "dict"},
}


def base_config_source(value: Any) -> Any:
    """A dict, a JSON object string (e.g. from a file lookup), or a path."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    source = base_config_source(p["base_model_config"])
    if not isinstance(source, (str, dict)):
        module.fail_json(msg="base_model_config must be a path to config.json or a dict, "
                             f"not {type(source).__name__}", changed=False)
    result = check_all(
        p["adapters"], source,
        base_model_names=p["base_model_names"],
        served_model_names=p["served_model_names"],
        max_lora_rank=p["max_lora_rank"],
        max_loras=p["max_loras"],
        max_cpu_loras=p["max_cpu_loras"],
        base_model_mismatch=p["base_model_mismatch"],
        supported_modules=p["supported_modules"],
        checksums=p["checksums"],
    )
    for warning in result["warnings"]:
        module.warn(warning)
    facts = {key: result[key] for key in ("max_lora_rank_effective", "ranks", "adapters")}
    if result["errors"]:
        module.fail_json(msg="\n".join(result["errors"]), errors=result["errors"], changed=False, **facts)
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()

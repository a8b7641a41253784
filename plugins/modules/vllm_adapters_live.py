#!/usr/bin/python
"""Ansible module: bring a running vLLM's adapters to the declared set without a restart."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_adapters_live
short_description: Load and unload LoRA adapters in a running vLLM 0.11 (runtime updating)
description:
  - Compares the adapters the server lists in C(/v1/models) with the declared ones and calls
    C(/v1/unload_lora_adapter) and C(/v1/load_lora_adapter) for the difference; an adapter whose
    files changed (its digest differs from the running release's) is unloaded and loaded again.
  - Needs the server started with C(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1). Runs on the host itself,
    where the load endpoints are reachable.
options:
  url:
    description: Base URL of the server, without C(/v1), e.g. http://127.0.0.1:8000.
    type: str
    required: true
  api_key:
    description: API key, sent as a Bearer token in C(Authorization); omit if the server has none.
    type: str
  admin_key_file:
    description: The host's root-only file holding C(VLLM_ADMIN_KEY=...), the deployer's key the
      shipped access guard asks of the adapter endpoints (sent as C(X-Vllm-Admin-Key)); read here,
      on the host, so the key never travels.
    type: path
  adapters:
    description: Declared adapters, [{name, path}] (paths on the host).
    type: list
    elements: dict
    required: true
  changed_names:
    description: Adapters whose files changed since the running release (reloaded).
    type: list
    elements: str
    default: []
  timeout:
    description: Seconds allowed for each HTTP request.
    type: int
    default: 120
  applied_marker:
    description: A file touched after a change was applied (see vllm_service_freshness).
    type: path
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Load and unload adapters live
  vllm_adapters_live:
    url: http://127.0.0.1:8000
    adapters: [{name: sql, path: /srv/vllm/adapters/sql}]
"""

RETURN = r"""
loaded:
  description: Adapters loaded.
  type: list
  returned: always
unloaded:
  description: Adapters unloaded.
  type: list
  returned: always
"""

import json
import os
import urllib.error
from typing import Any, Dict, List, Optional, Tuple

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url


def plan(served: List[str], declared: List[str], changed: List[str]) -> Tuple[List[str], List[str]]:
    """Pure: (to unload, to load)."""
    unload = [name for name in served if name not in declared or name in changed]
    load = [name for name in declared if name not in served or name in changed]
    return unload, load


def admin_key(path: Optional[str]) -> str:
    """VLLM_ADMIN_KEY from the environment file the role made on the host ("" without one)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            name, _sep, value = line.strip().partition("=")
            if name == "VLLM_ADMIN_KEY":
                return value
    return ""


def call(url: str, api_key: Optional[str], method: str, path: str, body: Optional[Dict[str, Any]], timeout: int,
         admin: str = "") -> Tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if admin:
        headers["X-Vllm-Admin-Key"] = admin
    try:
        # use_netrc=False: a ~/.netrc entry must not replace the Authorization header.
        with open_url(url.rstrip("/") + path, data=data, headers=headers, method=method, timeout=timeout,
                      use_netrc=False) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:  # refused, timed out: no answer at all
        return 0, f"no answer from {url.rstrip('/')}{path}: {getattr(error, 'reason', error)}"


ROUTE_MISSING = '{"detail":"Not Found"}'  # FastAPI's own 404: vLLM started without runtime updating


def fix_for(status: int, text: str = "") -> str:
    """What an operator does about a refused adapter request, by vLLM's (or the guard's) answer."""
    if status == 0:
        return "Is the service running (systemctl status vllm) and vllm_listen_host/vllm_port its address?"
    if status == 401:
        return "The API key was refused: vllm_api_key must be the key the running service was started with."
    if status == 403:
        return ("The deployer's admin key was refused: the service reads it at start (vllm-admin.env); "
                "run site.yml to restart it with the current key.")
    if status == 404 and text.strip() == ROUTE_MISSING:
        return ("The running service has no runtime updating: set vllm_allow_runtime_lora_updating: true "
                "and run site.yml (it restarts the service).")
    return "The answer above is vLLM's; fix the adapter it names, or run site.yml to apply the set with a restart."


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "api_key": {"type": "str", "no_log": True},
            "admin_key_file": {"type": "path"},
            "adapters": {"type": "list", "elements": "dict", "required": True},
            "changed_names": {"type": "list", "elements": "str", "default": []},
            "timeout": {"type": "int", "default": 120},
            "applied_marker": {"type": "path"},
        },
        supports_check_mode=True,
    )
    params = module.params
    status, text = call(params["url"], params["api_key"], "GET", "/v1/models", None, params["timeout"])
    if status != 200:
        module.fail_json(msg=f"GET /v1/models answered {status}: {text[:300]}. {fix_for(status, text)}")
    cards = json.loads(text).get("data", [])
    served = [card["id"] for card in cards if card.get("parent")]
    paths = {str(a["name"]): str(a["path"]) for a in params["adapters"]}
    unload, load = plan(served, list(paths), params["changed_names"])
    if module.check_mode or not (unload or load):
        module.exit_json(changed=bool(unload or load), loaded=load, unloaded=unload)
    admin = admin_key(params["admin_key_file"])
    for name in unload:
        status, text = call(params["url"], params["api_key"], "POST", "/v1/unload_lora_adapter",
                            {"lora_name": name}, params["timeout"], admin)
        if status != 200:
            module.fail_json(msg=f"unloading adapter '{name}' answered {status}: {text[:300]}. {fix_for(status, text)}")
    for name in load:
        status, text = call(params["url"], params["api_key"], "POST", "/v1/load_lora_adapter",
                            {"lora_name": name, "lora_path": paths[name]}, params["timeout"], admin)
        if status != 200:
            module.fail_json(msg=f"loading adapter '{name}' from {paths[name]} answered {status}: {text[:300]}. "
                                 f"{fix_for(status, text)}")
    if params["applied_marker"]:
        with open(params["applied_marker"], "a", encoding="utf-8"):
            pass
        os.utime(params["applied_marker"], None)
    module.exit_json(changed=True, loaded=load, unloaded=unload)


if __name__ == "__main__":
    main()

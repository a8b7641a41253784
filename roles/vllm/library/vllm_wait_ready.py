#!/usr/bin/python
"""Ansible module: wait until vLLM answers /health, failing early on a crash."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_wait_ready
short_description: Wait for a vLLM service's /health, bounded, and fail early when it crashes
description:
  - vLLM has no sd_notify, so readiness is polled on C(/health) (connection refused until the engine is up).
  - Polls the systemd unit too: a unit that failed or restarted during the wait ends the wait at once,
    with the tail of its journal, instead of after the whole timeout.
options:
  url:
    description: Base URL, e.g. http://127.0.0.1:8000
    type: str
    required: true
  service:
    description: systemd unit name.
    type: str
    required: true
  timeout:
    description: Seconds to wait at most.
    type: int
    default: 900
  interval:
    description: Seconds between polls.
    type: float
    default: 2
author: vllm-lora-ansible
"""

EXAMPLES = r"""
- name: Wait for vLLM
  vllm_wait_ready:
    url: http://127.0.0.1:8000
    service: vllm
    timeout: 900
"""

RETURN = r"""
elapsed:
  description: Seconds waited.
  type: float
  returned: always
active_enter:
  description: When the unit last entered the active state (ActiveEnterTimestampMonotonic, microseconds).
  type: int
  returned: always
"""

import subprocess
import time
import urllib.error
import urllib.request
from typing import Dict

from ansible.module_utils.basic import AnsibleModule


def unit_state(service: str) -> Dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", service, "-p", "ActiveState,SubState,NRestarts,ActiveEnterTimestampMonotonic,Result"],
        capture_output=True, text=True, check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def journal_tail(service: str, lines: int = 25) -> str:
    return subprocess.run(
        ["journalctl", "-u", service, "-n", str(lines), "--no-pager", "-o", "cat"],
        capture_output=True, text=True, check=False,
    ).stdout


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "service": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 900},
            "interval": {"type": "float", "default": 2},
        },
        supports_check_mode=True,
    )
    url, service = module.params["url"], module.params["service"]
    start = time.monotonic()
    first = unit_state(service)
    restarts = first.get("NRestarts", "0")
    status = 0
    while time.monotonic() - start < module.params["timeout"]:
        status = health(url)
        state = unit_state(service)
        if status == 200:
            module.exit_json(changed=False, elapsed=round(time.monotonic() - start, 1), status=status,
                             active_enter=int(state.get("ActiveEnterTimestampMonotonic", "0") or 0))
        if state.get("ActiveState") == "failed" or state.get("NRestarts", "0") != restarts:
            module.fail_json(
                msg=(f"{service} stopped while loading (state {state.get('ActiveState')}/{state.get('SubState')}, "
                     f"result {state.get('Result')}, restarts {restarts}->{state.get('NRestarts')}) after "
                     f"{time.monotonic() - start:.0f}s; last journal lines:\n{journal_tail(service)}"),
                elapsed=round(time.monotonic() - start, 1),
            )
        time.sleep(module.params["interval"])
    module.fail_json(
        msg=(f"{service}: {url}/health did not answer 200 within {module.params['timeout']}s (last status "
             f"{status or 'connection refused'}). Raise vllm_health_timeout if the model needs longer to load; "
             f"last journal lines:\n{journal_tail(service)}"),
        elapsed=round(time.monotonic() - start, 1),
    )


if __name__ == "__main__":
    main()

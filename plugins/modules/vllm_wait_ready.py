#!/usr/bin/python
"""Ansible module: one bounded slice of waiting for vLLM's /health, failing early on a crash."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_wait_ready
short_description: Wait (one slice) for a vLLM service's /health, and notice a crash at once
description:
  - vLLM has no sd_notify, so readiness is polled on C(/health) (connection refused until the engine is up).
  - Waits at most O(slice) seconds and returns C(ready), so the task can loop with C(until) and the
    operator sees each slice ("RETRYING ... N retries left") with how long the service has been loading.
  - Polls the systemd unit too; a unit that failed, or restarted since O(restarts_baseline), returns
    C(crashed) with the tail of its journal, ending the wait at once instead of after the bound.
options:
  url:
    description: Base URL, e.g. http://127.0.0.1:8000
    type: str
    required: true
  service:
    description: systemd unit name.
    type: str
    required: true
  slice:
    description: Seconds to wait in this call.
    type: int
    default: 15
  bound:
    description: The whole wait's bound in seconds (named in messages; the journal is attached once it is reached).
    type: int
    default: 900
  restarts_baseline:
    description:
      - The unit's NRestarts before the wait began; a higher count means it crashed meanwhile.
      - 0 after a start or restart by hand or by Ansible, which resets systemd's count (seen on systemd 252).
    type: int
    default: 0
  socket:
    description: The socket unit that must hold the API port (the role's C(<service>-proxy.socket)); an
      answer while it is not active comes from another process and fails the wait.
    type: str
    default: ""
  poll:
    description: Seconds between two looks at /health and the unit; every second of it can add to a host's time out of service.
    type: float
    default: 0.25
  restart:
    description:
      - Restart the unit (C(systemctl restart)) before this slice, in the same call, so that no task's round
        trip lies between the old process's stop and the first look at the new one. The call reports a change.
      - Only for one call (not in an C(until) loop, which would restart again); later slices omit it.
      - O(restarts_baseline) is then 0 (systemd resets the count on a restart it did not schedule).
    type: bool
    default: false
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Wait for vLLM
  vllm_wait_ready:
    url: http://127.0.0.1:8000
    service: vllm
    bound: 900
  register: ready
  until: ready.ready or ready.crashed
  retries: 60
  delay: 0
  failed_when: not ready.ready
"""

RETURN = r"""
ready:
  description: /health answered 200.
  type: bool
  returned: always
crashed:
  description: The unit failed or restarted during the wait.
  type: bool
  returned: always
elapsed:
  description: Seconds since the unit last became active (how long vLLM has been loading, or took to load).
  type: float
  returned: always
ready_at:
  description: When /health first answered 200, in seconds since the epoch by the host's clock.
  type: float
  returned: when ready
ready_monotonic:
  description: The same moment on the host's CLOCK_MONOTONIC (seconds; for durations, which a clock step must not skew).
  type: float
  returned: when ready
restarted_monotonic:
  description: When the restart was asked for (the old process still served until then), on the host's
    CLOCK_MONOTONIC; minus it, this or a later call's RV(ready_monotonic) is the time from the restart to the first
    answer.
  type: float
  returned: when O(restart)
"""

import subprocess
import time
import urllib.error
from typing import Any, Dict

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url


def socket_problem(socket: str, state: Dict[str, str]) -> str:
    """Why an answer on the API port is not the service's own ("" when it is): the port must be held by
    the service's socket unit, else another process (an old `vllm serve`, units under an old name, a local
    user who bound the port while the service restarted) answered, and would be verified in its place."""
    if state.get("ActiveState") in ("active", "reloading") or state.get("LoadState") == "not-found":
        return ""  # not-found: a release made before the socket units listens itself
    return (f"the API port answered, but {socket} is {state.get('ActiveState', '?')}/{state.get('SubState', '?')}"
            f" (result {state.get('Result', '?')}): another process holds the port. Find it with"
            " `ss -ltnp`, stop it, and run the play again")


def unit_state(service: str) -> Dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", service, "-p",
         "LoadState,ActiveState,SubState,NRestarts,ActiveEnterTimestampMonotonic,Result"],
        capture_output=True, text=True, check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def since_active(state: Dict[str, str]) -> float:
    """Seconds since the unit entered 'active' (systemd's monotonic clock is CLOCK_MONOTONIC)."""
    entered = int(state.get("ActiveEnterTimestampMonotonic", "0") or 0)
    return round(time.clock_gettime(time.CLOCK_MONOTONIC) - entered / 1e6, 1) if entered else 0.0


def health(url: str) -> int:
    try:
        with open_url(url.rstrip("/") + "/health", method="GET", timeout=5, use_netrc=False) as response:
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
            "slice": {"type": "int", "default": 15},
            "bound": {"type": "int", "default": 900},
            "restarts_baseline": {"type": "int", "default": 0},
            "poll": {"type": "float", "default": 0.25},
            "socket": {"type": "str", "default": ""},
            "restart": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    url, service, bound = module.params["url"], module.params["service"], module.params["bound"]
    done: Dict[str, Any] = {"changed": module.params["restart"]}
    baseline = module.params["restarts_baseline"]
    if module.params["restart"]:
        if module.check_mode:
            module.exit_json(ready=False, crashed=False, elapsed=0.0, msg=f"{service} would be restarted", **done)
        done["restarted_monotonic"] = time.clock_gettime(time.CLOCK_MONOTONIC)
        restarted = subprocess.run(["systemctl", "restart", f"{service}.service"],
                                   capture_output=True, text=True, check=False)
        if restarted.returncode != 0:
            module.fail_json(msg=f"systemctl restart {service}.service failed ({restarted.returncode}): "
                                 f"{restarted.stderr.strip()}; last journal lines:\n{journal_tail(service)}", **done)
        baseline = 0
    deadline = time.monotonic() + module.params["slice"]
    status = 0
    while True:
        status = health(url)
        state = unit_state(service)
        elapsed = since_active(state)
        problem = socket_problem(module.params["socket"], unit_state(module.params["socket"])) \
            if status == 200 and module.params["socket"] else ""
        if problem:
            module.exit_json(ready=False, crashed=True, elapsed=elapsed,
                             msg=f"{service}: {problem}; its journal:\n{journal_tail(module.params['socket'])}", **done)
        if status == 200:
            module.exit_json(ready=True, crashed=False, elapsed=elapsed, ready_at=time.time(),
                             ready_monotonic=time.clock_gettime(time.CLOCK_MONOTONIC),
                             msg=f"{service} ready, {elapsed:.0f}s after it started", **done)
        restarts = int(state.get("NRestarts", "0") or 0)
        if state.get("ActiveState") in ("failed", "inactive") or restarts > baseline:
            module.exit_json(
                ready=False, crashed=True, elapsed=elapsed,
                msg=(f"{service} stopped while loading (state {state.get('ActiveState')}/{state.get('SubState')}, "
                     f"result {state.get('Result')}, restarts {baseline}->{restarts}); "
                     f"last journal lines:\n{journal_tail(service)}"),
                **done,
            )
        if time.monotonic() >= deadline:
            break
        time.sleep(module.params["poll"])
    final = elapsed >= bound
    module.exit_json(
        ready=False, crashed=False, elapsed=elapsed, **done,
        msg=(f"{service}: {url}/health not ready {elapsed:.0f}s after the service started (bound {bound}s, last "
             f"status {status or 'connection refused'})"
             + (f". Raise vllm_health_timeout if the model needs longer to load; last journal lines:\n"
                f"{journal_tail(service)}" if final else "")),
    )


if __name__ == "__main__":
    main()

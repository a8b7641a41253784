#!/usr/bin/python
"""Ansible module: set one HAProxy server's state through the runtime API, and drain it in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_haproxy_server
short_description: Put an HAProxy server in ready, drain or maint state, waiting for its sessions to end
description:
  - Talks to HAProxy's runtime API (C(stats socket ... level admin)) on the host it runs on; no reload.
  - With O(state=maint) and O(wait_idle) above 0, the server is drained first (no new requests), the module
    waits until HAProxy counts no session to it (C(scur) = 0), then puts it in maintenance; all in one call,
    because every task round trip adds to the host's time out of service.
  - With O(vllm_metrics), the wait also covers requests that reached vLLM without HAProxy; it reads vLLM's
    C(/metrics) at the server's address as HAProxy knows it (C(addr) in C(show stat)) until
    C(vllm:num_requests_running) + C(vllm:num_requests_waiting) is 0. A server that does not answer has nothing
    in flight.
  - Fails on anything HAProxy answers to a command (C(No such server.), C(No such backend.)), so a typo cannot
    pass for a drained host.
  - Reports changed only when the server's state changes.
options:
  socket:
    description: Path of the runtime API socket.
    type: path
    required: true
  backend:
    description: HAProxy backend.
    type: str
    required: true
  server:
    description: Server name in the backend.
    type: str
    required: true
  state:
    description: C(ready) serves, C(drain) takes no new requests, C(maint) is out of the backend.
    type: str
    required: true
    choices: [ready, drain, maint]
  wait_idle:
    description: For drain and maint, seconds to wait until the server has no session (0 does not wait).
    type: int
    default: 0
  vllm_metrics:
    description: For drain and maint with O(wait_idle), also wait for vLLM's own in-flight count to reach 0.
    type: bool
    default: false
  poll:
    description: Seconds between two looks at the session count.
    type: float
    default: 0.2
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Drain gpu2 and take it out once its requests are done
  vllm_haproxy_server:
    socket: /run/haproxy/admin.sock
    backend: vllm
    server: gpu2
    state: maint
    wait_idle: 300
  delegate_to: lb1
"""

RETURN = r"""
status_before:
  description: The server's status in C(show stat) before the call (UP, DOWN, DRAIN, MAINT, ...).
  type: str
  returned: always
sessions:
  description: The server's current sessions (C(scur)) when the module returned.
  type: int
  returned: always
in_flight:
  description: vLLM's running + waiting requests when the module returned (O(vllm_metrics) only, else 0).
  type: float
  returned: always
waited:
  description: Seconds spent waiting for the sessions to end.
  type: float
  returned: always
sessions_at_drain:
  description: >-
    The server's sessions (C(scur)) just after it was put in drain: requests that were in flight
    when it stopped taking new ones, and that the wait let finish (0 when no drain was done).
  type: int
  returned: always
switched_monotonic:
  description: >-
    The balancer host's C(CLOCK_MONOTONIC) when HAProxy stopped sending the server new requests
    (drain, maint) or sent them again (ready): right after it accepted that command, or when the call
    began if the server already was out (or in). Two calls on one balancer give the time between the
    two switches as HAProxy applied them, without either call's round trip.
  type: float
  returned: when not in check mode
"""

import csv
import socket
import time
import urllib.error
from typing import Callable, Dict, List, Optional

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_metrics import in_flight

Send = Callable[[str], str]
# vLLM /metrics text for one server -> None when the server does not answer.
Metrics = Callable[[str], Optional[str]]


class HaproxyError(Exception):
    pass


def unix_send(path: str) -> Send:
    """One command per connection (HAProxy's non-interactive mode closes after answering)."""

    def send(command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(path)
            conn.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    return send


def fetch_metrics(addr: str) -> Optional[str]:
    try:
        with open_url(f"http://{addr}/metrics", method="GET", timeout=5, use_netrc=False) as response:
            return response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None


def parse_stat(text: str) -> List[Dict[str, str]]:
    """`show stat` CSV (header line starts with '# ') -> one dict per row."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise HaproxyError(f"unexpected answer to 'show stat': {text[:200]!r}")
    header = lines[0][2:]
    return list(csv.DictReader([header, *lines[1:]]))


def server_row(rows: List[Dict[str, str]], backend: str, server: str) -> Dict[str, str]:
    for row in rows:
        if row.get("pxname") == backend and row.get("svname") == server:
            return row
    known = sorted(f"{r['pxname']}/{r['svname']}" for r in rows if r.get("svname") not in ("FRONTEND", "BACKEND"))
    raise HaproxyError(f"HAProxy has no server {backend}/{server}; its servers: {', '.join(known) or 'none'}")


def in_state(status: str, state: str) -> bool:
    """Does a `show stat` status (UP, UP 1/2, DOWN, DRAIN, MAINT, MAINT (via x/y), no check) mean `state`?"""
    word = status.split(" ")[0].upper()
    if state == "maint":
        return word == "MAINT"
    if state == "drain":
        return word == "DRAIN"
    return word not in ("MAINT", "DRAIN")


def command(send: Send, text: str) -> None:
    answer = send(text).strip()
    if answer:
        raise HaproxyError(f"HAProxy refused '{text}': {answer}")


def apply(send: Send, backend: str, server: str, state: str, wait_idle: int, poll: float,
          check_mode: bool = False, metrics: Optional[Metrics] = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Dict[str, object]:
    row = server_row(parse_stat(send("show stat")), backend, server)
    before = row.get("status", "")
    result: Dict[str, object] = {"changed": not in_state(before, state), "status_before": before,
                                 "sessions": int(row.get("scur") or 0), "in_flight": 0.0, "waited": 0.0,
                                 "sessions_at_drain": 0}
    if check_mode:
        return result
    target = f"set server {backend}/{server} state"
    current = before
    # Already out (drain, maint) or already in: it switched before this call.
    switched = clock() if in_state(before, "ready") == (state == "ready") else None
    if state != "ready" and wait_idle > 0 and not in_state(current, "maint"):
        if not in_state(current, "drain"):
            command(send, f"{target} drain")
            switched = clock()
            current = "DRAIN"
        start = clock()
        first = True
        while True:
            row = server_row(parse_stat(send("show stat")), backend, server)
            sessions = int(row.get("scur") or 0)
            if first:
                result["sessions_at_drain"], first = sessions, False
            busy = in_flight(metrics(row.get("addr", ""))) if metrics and sessions == 0 else 0.0
            result["sessions"], result["in_flight"], result["waited"] = sessions, busy, round(clock() - start, 2)
            if sessions == 0 and busy == 0:
                break
            if clock() - start >= wait_idle:
                what = f"{sessions} session(s)" if sessions else f"{busy:g} request(s) in vLLM (not through HAProxy)"
                raise HaproxyError(
                    f"{backend}/{server} still has {what} after {wait_idle}s of draining; "
                    "it was left in drain state (raise vllm_balancer_drain_timeout for longer requests)")
            sleep(poll)
    if not in_state(current, state):
        command(send, f"{target} {state}")
        switched = clock() if switched is None else switched
    result["switched_monotonic"] = switched
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "required": True},
            "backend": {"type": "str", "required": True},
            "server": {"type": "str", "required": True},
            "state": {"type": "str", "required": True, "choices": ["ready", "drain", "maint"]},
            "wait_idle": {"type": "int", "default": 0},
            "vllm_metrics": {"type": "bool", "default": False},
            "poll": {"type": "float", "default": 0.2},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        result = apply(unix_send(p["socket"]), p["backend"], p["server"], p["state"], p["wait_idle"], p["poll"],
                       check_mode=module.check_mode, metrics=fetch_metrics if p["vllm_metrics"] else None)
    except (HaproxyError, OSError) as error:
        module.fail_json(msg=f"{p['backend']}/{p['server']} -> {p['state']} through {p['socket']}: {error}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()

"""A real Prometheus (Debian's package, installed by the vllm_observability role) in a
test host, read through its HTTP API from the controller."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from tests.harness.balancer import ip_of
from tests.harness.hosts import TestHost

PORT = 9090  # Debian's prometheus listens on all addresses, port 9090
# What node_exporter is told on the vLLM test hosts, as the README tells an operator: the
# textfile directory Debian's package reads, and systemd's restart counter of the unit.
NODE_EXPORTER_ARGS = ("--collector.systemd --collector.systemd.enable-restarts-metrics"
                      " --collector.systemd.unit-include=vllm.service")


def api(host: TestHost, path: str, **params: str) -> Any:
    """GET /api/v1/<path>: the `data` of a successful answer."""
    reply = httpx.get(f"http://{ip_of(host)}:{PORT}/api/v1/{path}", params=params, timeout=30)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (path, params, reply.text[:2000])
    return body["data"]


def query(host: TestHost, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector (or matrix/scalar as Prometheus returns it)."""
    data = api(host, "query", query=expr)
    result = data["result"]
    return [result] if data["resultType"] == "scalar" else list(result)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll `check` until it returns something true; its last value in the failure message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {last!r}")


def install_node_exporter(hosts: Sequence[TestHost]) -> None:
    """Debian's prometheus-node-exporter on each host (an operator's own node_exporter, which the
    vllm-node job scrapes), with the systemd collector's restart counter for vllm.service."""
    def install(host: TestHost) -> None:
        host.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
                " --no-install-recommends prometheus-node-exporter >/dev/null"
                f" && echo 'ARGS=\"{NODE_EXPORTER_ARGS}\"' > /etc/default/prometheus-node-exporter"
                " && systemctl restart prometheus-node-exporter", timeout=600)

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(install, hosts))

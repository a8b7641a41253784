"""An HAProxy test host in front of vLLM test hosts, as a small fleet has.

HAProxy comes from Debian's archive (2.6 on Debian 12); its runtime API socket
is where the vllm_balancer role expects it. Server names are the inventory
names of the vLLM hosts.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tests.harness import image
from tests.harness.hosts import HostPool, TestHost
from tests.unit.loader import load

HAPROXY_CFG = """global
    stats socket /run/haproxy/admin.sock mode 660 level admin
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # No second chance: a request sent to a host that is going down fails, and the
    # rolling test sees it. (HAProxy retries a failed connection 3 times by default.)
    retries 0
frontend api
    bind *:80
    default_backend vllm
# HAProxy's own Prometheus exporter, as its documentation configures it (the
# vllm_observability role's vllm-balancer job scrapes it).
frontend prometheus
    bind *:8405
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
backend vllm
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


def ip_of(host: TestHost) -> str:
    host.container.reload()
    return str(host.container.attrs["NetworkSettings"]["IPAddress"])


def url(lb: TestHost) -> str:
    return f"http://{ip_of(lb)}"


@contextmanager
def haproxy(backends: Sequence[TestHost], prefix: str, port: int = 8000) -> Iterator[TestHost]:
    """A running HAProxy host balancing over `backends` (health-checked on /health every second)."""
    with HostPool(image=image.build_base(), count=1, prefix=prefix) as pool:
        lb = pool.hosts[0]
        lb.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null",
              timeout=600)
        servers = "\n".join(f"    server {h.name} {ip_of(h)}:{port} check inter 1s fall 2 rise 2" for h in backends)
        lb.sh(f"cat > /etc/haproxy/haproxy.cfg <<'CFG'\n{HAPROXY_CFG.format(servers=servers)}CFG\n"
              "haproxy -c -f /etc/haproxy/haproxy.cfg && systemctl restart haproxy")
        yield lb


# One parser of `show stat` for the role and its tests: the balancer role's own module.
HAPROXY_MODULE = load("plugins/modules/vllm_haproxy_server.py", "vllm_haproxy_server_for_tests")
STATS = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
         "s.sendall(b'show stat\\n'); print(s.makefile().read())")


def show_stat(lb: TestHost) -> list[dict[str, str]]:
    """HAProxy's own counters and states (`show stat` on its runtime API), one dict a proxy/server."""
    return HAPROXY_MODULE.parse_stat(lb.sh(f"python3 -c {shlex.quote(STATS)}", timeout=30).stdout)  # type: ignore[no-any-return]

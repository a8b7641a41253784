"""What Prometheus is told about the vLLM hosts, derived from the inventory.

vllm_observability_targets: the file_sd target groups (vLLM, balancer,
node_exporter) for every host of vllm_servers, whether or not it answers today:
a host missing from the targets is a host no alert watches.
vllm_observability_scrape_configs: the scrape jobs that read those files.
vllm_observability_api_key: the one key to scrape with, when /metrics needs it.
vllm_observability_verify_textfile / vllm_observability_gate_textfile: what a
vLLM host publishes about its own last verification and GPU gate, as a
node_exporter textfile (the alerts' vllm_deploy_* series).

Plain typed Python so that the same inventory gives the same files, tested
without a host. Sorted output, no timestamps: a re-run changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ansible_collections.inference.vllm_lora.plugins.filter.vllm import _listen_ip

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # unit tests without Ansible on the path
    AnsibleFilterError = ValueError  # type: ignore[assignment,misc]


# What address a listen host names is decided in the vllm filters, once.


# Scrape jobs, each reading one file_sd file. The alert rules select on these
# job names (files/prometheus/vllm.rules.yml); change them together.
JOBS = {
    "vllm": {"file": "vllm.json"},
    "vllm-health": {"file": "vllm.json", "metrics_path": "/health"},
    "vllm-balancer": {"file": "balancer.json"},
    "vllm-node": {"file": "node.json"},
}
UNKNOWN_RELEASE = "unknown"
# A label value is any UTF-8 text; a label name is not (Prometheus' data model). A name
# Prometheus refuses makes it refuse the whole file_sd file, and keep the old targets.
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by the inventory (host, release, role) or by Prometheus itself: a target label `job`
# would win over the scrape job's name, and every job="vllm" alert would miss that host.
RESERVED_LABELS = {"host", "release", "role", "job", "instance"}


def _get(hostvars: Mapping[str, Any], host: str, name: str, default: Any) -> Any:
    """A host's variable; hostvars of a host that is in no play of this run hold only the inventory."""
    values = hostvars.get(host) or {}
    value = values.get(name) if hasattr(values, "get") else None
    return default if value is None or value == "" else value


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reach(hostvars: Mapping[str, Any], host: str) -> str:
    """How the monitoring host reaches `host`: the inventory's address, else its name."""
    return str(_get(hostvars, host, "ansible_host", host))


def _vllm_address(hostvars: Mapping[str, Any], host: str, monitor: str, defaults: Mapping[str, Any]) -> str:
    override = _get(hostvars, host, "vllm_observability_scrape_address", "")
    if override:
        return str(override)
    listen = str(_get(hostvars, host, "vllm_listen_host", defaults.get("vllm_listen_host", "127.0.0.1")))
    port = int(_get(hostvars, host, "vllm_port", defaults.get("vllm_port", 8000)))
    address = _listen_ip(listen)
    if not address:
        raise AnsibleFilterError(f"{host}: vllm_listen_host={listen!r} is not an IP address")
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        if host != monitor:
            raise AnsibleFilterError(
                f"{host}: vLLM listens on {listen} (vllm_listen_host), which the monitoring host {monitor} cannot"
                " reach. Fix: run Prometheus on that host (put it in vllm_monitoring), listen on an address the"
                " monitoring host reaches (vllm_listen_host, with vllm_api_key), or set"
                " vllm_observability_scrape_address to the host:port that reaches it (a tunnel, a reverse proxy).")
        return _address(address, port)
    if ip.is_unspecified:
        return _address("127.0.0.1" if host == monitor else _reach(hostvars, host), port)
    return _address(address, port)


def _labels(hostvars: Mapping[str, Any], host: str, role: str, release: str | None) -> dict[str, str]:
    """The target's labels: the operator's extra ones, then host, role and (vLLM targets only)
    release. node_exporter's targets get no release: a deploy would relabel every node series."""
    extra = _get(hostvars, host, "vllm_observability_target_labels", {}) or {}
    bad = sorted(str(name) for name in extra
                 if name in RESERVED_LABELS or str(name).startswith("__") or not LABEL_NAME.fullmatch(str(name)))
    if bad:
        raise AnsibleFilterError(f"{host}: vllm_observability_target_labels may not set {', '.join(bad)}"
                                 " (host, release and role come from the inventory, job and instance from"
                                 " Prometheus, names starting with __ are Prometheus' own; a name is a letter"
                                 " or _, then letters, digits, _)")
    labels = {**{str(k): str(v) for k, v in extra.items()}, "host": host, "role": role}
    if release is not None:
        labels["release"] = release
    return labels


def _release(hostvars: Mapping[str, Any], host: str, previous: Mapping[str, str]) -> str:
    """The release read from the host in this run; else what the targets said before (a host
    that is down keeps its label, so its alert keeps its identity); else unknown."""
    read = str(_get(hostvars, host, "vllm_observability_release", ""))
    return read or previous.get(host) or UNKNOWN_RELEASE


def _previous_releases(previous: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    found: dict[str, str] = {}
    for group in previous or []:
        labels = group.get("labels") or {} if isinstance(group, Mapping) else {}
        if labels.get("host") and labels.get("release") and labels["release"] != UNKNOWN_RELEASE:
            found[str(labels["host"])] = str(labels["release"])
    return found


def vllm_observability_targets(
    servers: Iterable[str],
    hostvars: Mapping[str, Any],
    monitor: str,
    defaults: Mapping[str, Any] | None = None,
    node_exporter_port: int = 0,
    balancer_metrics_port: int = 0,
    previous: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """File_sd target groups {"vllm.json": [...], "balancer.json": [...], "node.json": [...]}: one group
    per host, sorted by host. `monitor` is the inventory name of the host Prometheus runs on;
    `defaults` the vllm role's defaults (vllm_listen_host, vllm_port); `previous` the vllm.json
    written before (releases of hosts that could not be read now)."""
    defaults = defaults or {}
    hosts = sorted(set(servers))
    known = _previous_releases(previous)
    vllm, node = [], []
    balancers: set[str] = set()
    errors = []
    for host in hosts:
        release = _release(hostvars, host, known)
        try:
            vllm.append({"targets": [_vllm_address(hostvars, host, monitor, defaults)],
                         "labels": _labels(hostvars, host, "vllm", release)})
        except AnsibleFilterError as exc:
            errors.append(str(exc))
            continue
        if int(node_exporter_port) > 0:
            reach = "127.0.0.1" if host == monitor else _reach(hostvars, host)
            node.append({"targets": [_address(reach, int(node_exporter_port))],
                         "labels": _labels(hostvars, host, "node", None)})
        balancer = str(_get(hostvars, host, "vllm_balancer_host", ""))
        if balancer:
            balancers.add(balancer)
    if errors:
        raise AnsibleFilterError(" ".join(errors))
    balancer_groups = []
    if int(balancer_metrics_port) > 0:
        for balancer in sorted(balancers):
            if balancer not in hostvars:
                raise AnsibleFilterError(
                    f"vllm_balancer_host={balancer!r} is not a host of this inventory, so the monitoring host"
                    " cannot tell how to reach its exporter. Fix: name the balancer by its inventory name (and"
                    " give it ansible_host), or set vllm_observability_balancer_metrics_port: 0.")
            reach = "127.0.0.1" if balancer == monitor else _reach(hostvars, balancer)
            balancer_groups.append({"targets": [_address(reach, int(balancer_metrics_port))],
                                    "labels": {"host": balancer, "role": "balancer"}})
    return {"vllm.json": vllm, "balancer.json": balancer_groups, "node.json": node}


def vllm_observability_scrape_configs(file_sd_dir: str, credentials_file: str = "",
                                      scrape_interval: str = "", health_fallback_protocol: str = "") -> list[dict[str, Any]]:
    """The scrape jobs for prometheus.yml. /metrics gets the credentials file when one is given;
    /health never needs a key (the role's guard leaves the probes open). vLLM answers /health
    with an empty body and no Content-Type: Prometheus 2 parses that as an empty exposition
    (up=1), Prometheus 3 refuses it unless the job names a fallback_scrape_protocol, a field
    Prometheus 2 does not know."""
    jobs = []
    for name, job in JOBS.items():
        config: dict[str, Any] = {"job_name": name}
        if scrape_interval:
            config["scrape_interval"] = scrape_interval
        if "metrics_path" in job:
            config["metrics_path"] = job["metrics_path"]
        if name == "vllm-health" and health_fallback_protocol:
            config["fallback_scrape_protocol"] = health_fallback_protocol
        if name == "vllm" and credentials_file:
            config["authorization"] = {"type": "Bearer", "credentials_file": credentials_file}
        config["file_sd_configs"] = [{"files": [f"{file_sd_dir.rstrip('/')}/{job['file']}"]}]
        jobs.append(config)
    return jobs


def vllm_observability_prometheus_config(scrape_configs: list[dict[str, Any]], rules_dir: str,
                                         alertmanagers: Iterable[str] = ()) -> dict[str, Any]:
    """A whole prometheus.yml for a monitoring host the role manages: Prometheus' own job, the
    vLLM jobs, the rules directory, the alertmanagers if any."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [f"{rules_dir.rstrip('/')}/*.yml"],
        "scrape_configs": [{"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]},
                           *scrape_configs],
    }
    managers = [str(target) for target in alertmanagers]
    if managers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": managers}]}]}
    return config


def vllm_observability_api_key(servers: Iterable[str], hostvars: Mapping[str, Any]) -> str:
    """The vllm_api_key every vLLM host shares (one credentials file serves one scrape job)."""
    keys = {host: str(_get(hostvars, host, "vllm_api_key", "")) for host in sorted(set(servers))}
    missing = [host for host, key in keys.items() if not key]
    if missing:
        raise AnsibleFilterError("vllm_observability_scrape_api_key is true but vllm_api_key is empty on "
                                 + ", ".join(missing) + ". Fix: set the key, or scrape without it (the probes,"
                                 " /metrics among them, are open).")
    if len(set(keys.values())) > 1:
        raise AnsibleFilterError("vllm_observability_scrape_api_key needs one vllm_api_key for all vLLM hosts;"
                                 " they differ (hosts: " + ", ".join(keys) + "). Fix: one key in group_vars,"
                                 " or scrape without it.")
    return next(iter(keys.values()), "")


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, help_text: str, samples: list[tuple[dict[str, Any], int]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
        lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
    return lines


def vllm_observability_verify_textfile(declared: Iterable[Any], verified: Iterable[Any], release: str) -> str:
    """The host's last verification: the adapters the inventory declares, those the
    verification proved by real requests, and the release that answered."""
    declared_names = sorted({str(name) for name in declared})
    verified_names = sorted({str(name) for name in verified})
    lines = _family("vllm_deploy_adapter_declared",
                    "LoRA adapter declared for this host (vllm_lora_adapters) at its last verification.",
                    [({"adapter": name}, 1) for name in declared_names])
    lines += _family("vllm_deploy_adapter_verified",
                     "LoRA adapter its last verification proved by a real request (answer differs from the base).",
                     [({"adapter": name}, 1) for name in verified_names])
    lines += _family("vllm_deploy_release_info", "The release that answered its last verification.",
                     [({"release": release or UNKNOWN_RELEASE}, 1)])
    return "\n".join(lines) + "\n"


def vllm_observability_gate_textfile(ready: Any) -> str:
    """The host's last GPU gate: 1 passed, 0 refused the host (or did not get to a verdict)."""
    ok = 1 if ready is True or str(ready).lower() in ("true", "1", "yes") else 0
    return "\n".join(_family("vllm_deploy_gpu_gate_ok",
                             "1 when the last GPU gate passed on this host, 0 when it refused the host.",
                             [({}, ok)])) + "\n"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_observability_targets": vllm_observability_targets,
            "vllm_observability_scrape_configs": vllm_observability_scrape_configs,
            "vllm_observability_prometheus_config": vllm_observability_prometheus_config,
            "vllm_observability_api_key": vllm_observability_api_key,
            "vllm_observability_verify_textfile": vllm_observability_verify_textfile,
            "vllm_observability_gate_textfile": vllm_observability_gate_textfile,
        }

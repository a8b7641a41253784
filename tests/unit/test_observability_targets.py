"""Prometheus targets and scrape jobs from the inventory (the role's filter plugin), and the
textfiles the vLLM hosts publish: the same inventory gives the same files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.loader import REPO, load
from tests.unit.promql import run_promtool

obs = load("plugins/filter/vllm_observability.py", "vllm_observability_filters")
VLLM_DEFAULTS = yaml.safe_load((REPO / "roles/vllm/defaults/main.yml").read_text())
ROLE_DEFAULTS = yaml.safe_load((REPO / "roles/vllm_observability/defaults/main.yml").read_text())

FLEET: dict[str, dict[str, Any]] = {
    "gpu1": {"ansible_host": "10.0.0.11", "vllm_listen_host": "0.0.0.0", "vllm_api_key": "k",
             "vllm_balancer_host": "lb", "vllm_observability_release": "3f2a9c1b7d0e"},
    "gpu2": {"ansible_host": "10.0.0.12", "vllm_listen_host": "10.0.0.12", "vllm_port": 9000, "vllm_api_key": "k",
             "vllm_balancer_host": "lb", "vllm_observability_release": "3f2a9c1b7d0e"},
    "gpu3": {"ansible_host": "fd00::13", "vllm_listen_host": "::", "vllm_api_key": "k", "vllm_balancer_host": "lb",
             "vllm_observability_target_labels": {"site": "lab"}},
    "lb": {"ansible_host": "10.0.0.2"},
    "mon": {"ansible_host": "10.0.0.3"},
}


def targets(servers: list[str], hostvars: dict[str, Any], monitor: str = "mon", **kwargs: Any) -> dict[str, Any]:
    return obs.vllm_observability_targets(servers, hostvars, monitor, VLLM_DEFAULTS, **kwargs)


def test_a_fleet_gives_one_group_per_host_with_its_labels() -> None:
    found = targets(["gpu1", "gpu2", "gpu3"], FLEET, balancer_metrics_port=8405)
    assert found["vllm.json"] == [
        {"targets": ["10.0.0.11:8000"], "labels": {"host": "gpu1", "release": "3f2a9c1b7d0e", "role": "vllm"}},
        {"targets": ["10.0.0.12:9000"], "labels": {"host": "gpu2", "release": "3f2a9c1b7d0e", "role": "vllm"}},
        {"targets": ["[fd00::13]:8000"],
         "labels": {"host": "gpu3", "release": "unknown", "role": "vllm", "site": "lab"}},
    ]
    assert found["balancer.json"] == [{"targets": ["10.0.0.2:8405"], "labels": {"host": "lb", "role": "balancer"}}]
    assert found["node.json"] == []


def test_the_same_inventory_gives_the_same_targets_whatever_the_order() -> None:
    expected = json.dumps(targets(["gpu1", "gpu2", "gpu3"], FLEET, node_exporter_port=9100), sort_keys=True)
    for seed in range(5):
        servers = ["gpu1", "gpu2", "gpu3"]
        random.Random(seed).shuffle(servers)
        hostvars = dict(random.Random(seed).sample(sorted(FLEET.items()), len(FLEET)))
        again = targets(servers, hostvars, node_exporter_port=9100)
        assert json.dumps(again, sort_keys=True) == expected


def test_the_beelink_is_scraped_by_a_prometheus_on_itself() -> None:
    """The Beelink listens on loopback (inventory/beelink): only a Prometheus on the host reaches it."""
    inventory = yaml.safe_load((REPO / "inventory/beelink/hosts.yml").read_text())
    group_vars = yaml.safe_load((REPO / "inventory/beelink/group_vars/vllm_servers.yml").read_text())
    hosts = inventory["all"]["children"]["vllm_servers"]["hosts"]
    hostvars = {name: {**group_vars, **values} for name, values in hosts.items()}
    found = targets(list(hosts), hostvars, monitor="beelink", node_exporter_port=9100)
    assert found["vllm.json"] == [{"targets": ["127.0.0.1:8000"],
                                   "labels": {"host": "beelink", "release": "unknown", "role": "vllm"}}]
    assert found["node.json"][0]["targets"] == ["127.0.0.1:9100"]
    assert found["balancer.json"] == []


def test_a_loopback_host_is_refused_for_a_remote_prometheus_with_the_fix() -> None:
    hostvars = {"beelink": {"ansible_host": "192.0.2.10"}}  # vllm_listen_host from the vllm role: 127.0.0.1
    with pytest.raises(obs.AnsibleFilterError) as error:
        targets(["beelink"], hostvars, monitor="mon")
    message = str(error.value)
    assert "beelink" in message and "127.0.0.1" in message and "vllm_observability_scrape_address" in message


def test_a_scrape_address_overrides_the_derived_one() -> None:
    hostvars = {"beelink": {"vllm_observability_scrape_address": "tunnel.example:18000"}}
    assert targets(["beelink"], hostvars)["vllm.json"][0]["targets"] == ["tunnel.example:18000"]


def test_a_host_without_ansible_host_is_reached_by_its_name() -> None:
    hostvars = {"gpu7.example": {"vllm_listen_host": "0.0.0.0"}}
    assert targets(["gpu7.example"], hostvars)["vllm.json"][0]["targets"] == ["gpu7.example:8000"]


def test_a_host_that_cannot_be_read_keeps_its_release_label() -> None:
    """A host that is down keeps its label, so its VllmHostDown alert keeps its identity."""
    previous = targets(["gpu1", "gpu2"], FLEET)["vllm.json"]
    down = {**FLEET, "gpu1": {k: v for k, v in FLEET["gpu1"].items() if k != "vllm_observability_release"}}
    again = targets(["gpu1", "gpu2"], down, previous=previous)["vllm.json"]
    assert again[0]["labels"]["release"] == "3f2a9c1b7d0e"
    assert targets(["gpu1", "gpu2"], down)["vllm.json"][0]["labels"]["release"] == "unknown"


def test_a_new_release_replaces_the_old_label() -> None:
    previous = targets(["gpu1"], FLEET)["vllm.json"]
    moved = {**FLEET, "gpu1": {**FLEET["gpu1"], "vllm_observability_release": "aaaaaaaaaaaa"}}
    assert targets(["gpu1"], moved, previous=previous)["vllm.json"][0]["labels"]["release"] == "aaaaaaaaaaaa"


@pytest.mark.parametrize("labels", [{"host": "x"}, {"role": "x"}, {"__metrics_path__": "/x"}, {"bad-name": "x"},
                                    {"job": "x"}, {"instance": "x"}, {"1dc": "x"}, {"release": "x"}])
def test_extra_labels_cannot_replace_the_inventory_s(labels: dict[str, str]) -> None:
    hostvars = {"gpu1": {**FLEET["gpu1"], "vllm_observability_target_labels": labels}}
    with pytest.raises(obs.AnsibleFilterError, match="vllm_observability_target_labels"):
        targets(["gpu1"], hostvars)


def test_no_balancer_job_without_a_port_or_a_balancer() -> None:
    assert targets(["gpu1"], FLEET, balancer_metrics_port=0)["balancer.json"] == []
    alone = {"gpu1": {k: v for k, v in FLEET["gpu1"].items() if k != "vllm_balancer_host"}}
    assert targets(["gpu1"], alone, balancer_metrics_port=8405)["balancer.json"] == []


def test_node_targets_carry_the_same_host_labels() -> None:
    found = targets(["gpu1", "gpu3"], FLEET, node_exporter_port=9100)["node.json"]
    assert [group["targets"] for group in found] == [["10.0.0.11:9100"], ["[fd00::13]:9100"]]
    assert [group["labels"]["role"] for group in found] == ["node", "node"]
    assert found[1]["labels"]["site"] == "lab"
    # No release on node_exporter's targets: a deploy must not relabel every node series (and the
    # textfile's vllm_deploy_release_info keeps its own `release` label, not `exported_release`).
    assert all("release" not in group["labels"] for group in found)


def test_a_balancer_that_is_not_an_inventory_host_is_refused_with_the_fix() -> None:
    by_address = {"gpu1": {**FLEET["gpu1"], "vllm_balancer_host": "10.9.9.9"}}
    with pytest.raises(obs.AnsibleFilterError, match="vllm_balancer_host='10.9.9.9'.*inventory name"):
        targets(["gpu1"], by_address, balancer_metrics_port=8405)
    assert targets(["gpu1"], by_address, balancer_metrics_port=0)["balancer.json"] == []


def test_scrape_jobs_read_the_target_files_and_only_metrics_gets_the_key() -> None:
    jobs = obs.vllm_observability_scrape_configs("/etc/prometheus/file_sd/vllm/", "/etc/prometheus/vllm-api-key")
    assert [job["job_name"] for job in jobs] == ["vllm", "vllm-health", "vllm-balancer", "vllm-node"]
    assert jobs[0]["authorization"] == {"type": "Bearer", "credentials_file": "/etc/prometheus/vllm-api-key"}
    assert all("authorization" not in job for job in jobs[1:])
    assert jobs[1]["metrics_path"] == "/health"
    assert jobs[1]["file_sd_configs"] == jobs[0]["file_sd_configs"] == [{"files": ["/etc/prometheus/file_sd/vllm/vllm.json"]}]
    assert all("authorization" not in job for job in obs.vllm_observability_scrape_configs("/x"))


def test_the_health_job_names_a_fallback_protocol_only_when_asked() -> None:
    """Prometheus 3 refuses vLLM's /health answer (no Content-Type) without one; 2.42 refuses the field."""
    assert all("fallback_scrape_protocol" not in job for job in obs.vllm_observability_scrape_configs("/x"))
    jobs = obs.vllm_observability_scrape_configs("/x", health_fallback_protocol="PrometheusText0.0.4")
    assert [job["job_name"] for job in jobs if "fallback_scrape_protocol" in job] == ["vllm-health"]


@pytest.mark.parametrize("with_key", [False, True])
def test_promtool_accepts_the_written_prometheus_config(tmp_path: Path, with_key: bool) -> None:
    sd_dir, rules_dir = tmp_path / "file_sd", tmp_path / "rules"
    sd_dir.mkdir()
    rules_dir.mkdir()
    for name, groups in targets(["gpu1", "gpu2", "gpu3"], FLEET, node_exporter_port=9100,
                                balancer_metrics_port=8405).items():
        (sd_dir / name).write_text(json.dumps(groups, indent=2) + "\n")
    (rules_dir / "vllm.rules.yml").write_text((REPO / "roles/vllm_observability/files/prometheus/vllm.rules.yml").read_text())
    key = tmp_path / "vllm-api-key"
    key.write_text(obs.vllm_observability_api_key(["gpu1", "gpu2", "gpu3"], FLEET))
    jobs = obs.vllm_observability_scrape_configs(str(sd_dir), str(key) if with_key else "", "15s")
    config = obs.vllm_observability_prometheus_config(jobs, str(rules_dir), ["localhost:9093"])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "9 rules found" in result.stdout


def test_the_api_key_must_be_one_and_is_never_echoed() -> None:
    assert obs.vllm_observability_api_key(["gpu1", "gpu2"], FLEET) == "k"
    differ = {**FLEET, "gpu2": {**FLEET["gpu2"], "vllm_api_key": "secret-two"}}
    with pytest.raises(obs.AnsibleFilterError) as error:
        obs.vllm_observability_api_key(["gpu1", "gpu2"], differ)
    assert "differ" in str(error.value) and "secret-two" not in str(error.value)
    with pytest.raises(obs.AnsibleFilterError, match="empty on gpu9"):
        obs.vllm_observability_api_key(["gpu1", "gpu9"], {**FLEET, "gpu9": {}})


def test_the_verification_textfile() -> None:
    text = obs.vllm_observability_verify_textfile(["beta", "alpha", "alpha"], ["alpha"], "3f2a9c1b7d0e")
    assert text == (
        "# HELP vllm_deploy_adapter_declared LoRA adapter declared for this host (vllm_lora_adapters) at its last"
        " verification.\n"
        "# TYPE vllm_deploy_adapter_declared gauge\n"
        'vllm_deploy_adapter_declared{adapter="alpha"} 1\n'
        'vllm_deploy_adapter_declared{adapter="beta"} 1\n'
        "# HELP vllm_deploy_adapter_verified LoRA adapter its last verification proved by a real request (answer"
        " differs from the base).\n"
        "# TYPE vllm_deploy_adapter_verified gauge\n"
        'vllm_deploy_adapter_verified{adapter="alpha"} 1\n'
        "# HELP vllm_deploy_release_info The release that answered its last verification.\n"
        "# TYPE vllm_deploy_release_info gauge\n"
        'vllm_deploy_release_info{release="3f2a9c1b7d0e"} 1\n'
    )


@pytest.mark.parametrize("ready, value", [(True, 1), ("True", 1), (False, 0), (None, 0), ("false", 0)])
def test_the_gate_textfile(ready: Any, value: int) -> None:
    assert obs.vllm_observability_gate_textfile(ready).splitlines()[-1] == f"vllm_deploy_gpu_gate_ok {value}"


def test_promtool_lints_the_textfiles() -> None:
    for text in (obs.vllm_observability_verify_textfile(["a.b", 'q"x'], [], ""),
                 obs.vllm_observability_verify_textfile([], [], "r"),
                 obs.vllm_observability_gate_textfile(False)):
        result = run_promtool("check", "metrics", stdin=text)
        assert result.returncode == 0, text + result.stdout + result.stderr


def test_role_defaults_are_what_debian_s_prometheus_reads() -> None:
    """Debian's prometheus and prometheus-node-exporter packages read these paths."""
    assert ROLE_DEFAULTS["vllm_observability_prometheus_config_file"] == "/etc/prometheus/prometheus.yml"
    assert ROLE_DEFAULTS["vllm_observability_file_sd_dir"].startswith("/etc/prometheus/")
    assert ROLE_DEFAULTS["vllm_observability_rules_dir"].startswith("/etc/prometheus/")
    assert ROLE_DEFAULTS["vllm_observability_textfile_dir"] == ""  # off unless asked

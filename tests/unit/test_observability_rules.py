"""The alert rules: promtool accepts them, their promtool unit tests pass, each alert is
tested firing, says how bad it is and where its runbook is, and reads only series that
exist (vLLM 0.11.0's recorded /metrics, or a source the rules file names)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.unit.loader import REPO, load
from tests.unit.promql import counter_labels, label_names, metric_names, recorded_labels, run_promtool

RULES = REPO / "roles/vllm_observability/files/prometheus/vllm.rules.yml"
RULE_TESTS = REPO / "tests/unit/data/prometheus/vllm.rules.test.yml"
RUNBOOKS = REPO / "docs/runbooks.md"
observability = load("plugins/filter/vllm_observability.py", "vllm_observability_filters")

# Series that are not vLLM's, with who makes them (the rules file's header says the same).
OTHER_SOURCES = {
    "up": "Prometheus, for every target",
    "node_systemd_service_restart_total": "node_exporter --collector.systemd.enable-restarts-metrics",
}


def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def textfile_names() -> set[str]:
    text = observability.vllm_observability_verify_textfile(["a"], ["a"], "r1")
    text += observability.vllm_observability_gate_textfile(True)
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fail_when_a_rule_changes(tmp_path: Any) -> None:
    """The unit tests bind the rules: a shorter `for:` on VllmHostDown is caught."""
    (tmp_path / "rules").mkdir()
    changed = RULES.read_text().replace("        for: 5m\n        labels:\n          severity: critical\n"
                                        "        annotations:\n          summary: \"vLLM on {{ $labels.host }} is down",
                                        "        for: 1m\n        labels:\n          severity: critical\n"
                                        "        annotations:\n          summary: \"vLLM on {{ $labels.host }} is down", 1)
    assert changed != RULES.read_text()
    (tmp_path / "rules" / "vllm.rules.yml").write_text(changed)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = ["rules/vllm.rules.yml"]
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    result = run_promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "VllmHostDown" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    tested = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                tested.add(check["alertname"])
    assert {alert["alert"] for alert in alerts()} == tested


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_says_how_long_how_bad_what_and_where_its_runbook_is(alert: dict[str, Any]) -> None:
    assert re.fullmatch(r"[0-9]+[smh]", alert.get("for", "")), "every alert waits a stated time"
    assert alert["labels"]["severity"] in {"critical", "warning"}
    annotations = alert["annotations"]
    assert annotations["summary"] and annotations["description"]
    assert annotations["runbook_url"] == f"docs/runbooks.md#{alert['alert'].lower()}"
    assert alert["alert"].lower() in github_anchors(RUNBOOKS.read_text()), f"docs/runbooks.md has no ### {alert['alert']}"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_reads_only_series_that_exist(alert: dict[str, Any]) -> None:
    vllm = recorded_labels()
    for name in metric_names(alert["expr"]):
        if name.startswith("vllm_deploy_"):
            # This project's series: the hosts' textfile, or the shipped counter on vLLM's /metrics.
            assert name in textfile_names() | set(counter_labels()), \
                f"{name}: neither the hosts' textfile (filter) nor the shipped counter publishes it"
        elif name not in OTHER_SOURCES:
            assert name in vllm, f"{name} is not in vLLM 0.11.0's recorded /metrics"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_selects_the_role_s_scrape_jobs(alert: dict[str, Any]) -> None:
    jobs = set(re.findall(r'job=~?"([^"]+)"', alert["expr"]))
    for job in jobs:
        assert set(job.split("|")) <= set(observability.JOBS), f"job {job} is not a scrape job of the role"
    labels = label_names(alert["expr"])
    # host: the label the role's targets give each vLLM host and its node_exporter alike (the join).
    assert labels <= {"job", "engine", "model_name", "le", "name", "host"}, labels


def test_the_role_rewrites_only_the_runbook_links() -> None:
    """vars/main.yml swaps the repository path for vllm_observability_runbook_url: each link, nothing else."""
    text = RULES.read_text()
    assert text.count("docs/runbooks.md#") == len(alerts())

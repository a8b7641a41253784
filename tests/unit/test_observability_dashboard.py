"""The Grafana dashboard: generated from code (scripts/gen_dashboard.py), built only on metric
names vLLM 0.11.0 really exports (or the role's shipped request counter adds to its /metrics, as
recorded from a real vLLM running it), and every panel query returns data when fed those
recorded /metrics (evaluated by promtool, no Grafana needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from scripts import gen_dashboard
from tests.unit.loader import REPO
from tests.unit.promql import (TARGET_LABELS, counter_labels, counter_series, label_names, metric_names, recorded_labels,
                               recorded_series, run_promtool)
from tests.unit.test_observability_rules import textfile_names

DASHBOARD = REPO / "roles/vllm_observability/files/grafana/vllm-dashboard.json"
# Grafana's variables, as a query of the dashboard would see them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "20m", "${adapter:regex}": "alpha", "$host": ".*"}


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    return [(f"{p['id']}{t['refId']} {p['title']}", t["expr"]) for p in panels() for t in p["targets"]]


def grafana_free(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_the_committed_dashboard_is_the_generator_s_output() -> None:
    assert DASHBOARD.read_text() == gen_dashboard.render(), "run scripts/gen_dashboard.py"


def served_labels() -> dict[str, set[str]]:
    """What a host's /metrics serves: vLLM 0.11.0's own series and the shipped counter's."""
    return {**recorded_labels(), **counter_labels()}


def test_panels_use_only_metric_names_vllm_exports() -> None:
    recorded = served_labels()
    for title, expr in queries():
        for name in metric_names(expr):
            # `up` is Prometheus' own series for every target (the /metrics and /health scrapes).
            assert name in recorded or name == "up", f"{title}: {name} is not in vLLM 0.11.0's recorded /metrics"


def test_panels_use_only_label_names_the_series_carry() -> None:
    recorded = served_labels()
    known = set().union(*recorded.values()) | TARGET_LABELS | {"le"}
    for title, expr in queries():
        assert label_names(expr) <= known, f"{title}: {label_names(expr) - known}"


def test_variables_read_vllm_or_the_hosts_own_textfile() -> None:
    """`up` is Prometheus' own series for every target: the host list holds hosts that never answered."""
    recorded = set(served_labels())
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            names = metric_names(re.sub(r"label_values\((.*),\s*\w+\)", r"\1", variable["definition"]))
            assert names and names <= recorded | textfile_names() | {"up"}, variable["name"]
            # What the queries are tested with ($host as .*) is what Grafana sends for "All".
            assert variable["allValue"] == GRAFANA_VARS["$host"], variable["name"]
    hosts = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "host")
    assert hosts["definition"] == 'label_values(up{job="vllm"}, host)'


def test_the_panels_cover_what_the_issue_asks_for() -> None:
    """Per host and per adapter: requests running/waiting, tokens/s, TTFT and e2e latency
    percentiles, KV cache use, adapter requests, restarts, the current release."""
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
            "vllm:kv_cache_usage_perc", "vllm:lora_requests_info", "process_start_time_seconds",
            "vllm_deploy_model_requests_total"} <= used
    exprs = " ".join(expr for _, expr in queries())
    assert "by (host, release)" in exprs  # the current release, from the targets' label
    assert any(p.get("repeat") == "adapter" for p in json.loads(DASHBOARD.read_text())["panels"])
    # Adapter requests come from the counter, per adapter: vLLM's own counters name the base model.
    per_adapter = [expr for title, expr in queries() if "$adapter: requests per second" in title]
    assert per_adapter and all("vllm_deploy_model_requests_total" in expr and 'kind="adapter"' in expr
                               for expr in per_adapter)
    assert all('host=~"$host"' in expr for _, expr in queries()), "every panel follows the host selection"


def _series_text(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def test_every_panel_returns_data_on_recorded_vllm_metrics(tmp_path: Path) -> None:
    """Each panel query becomes an alert `count(<query>)`, which fires only when the query
    returns a series; promtool evaluates them over vLLM's recorded /metrics played as 20
    minutes of scrapes (counters growing, gauges steady, the adapter info refreshed)."""
    target = {"job": "vllm", "instance": "gpu1:8000", "host": "gpu1", "release": "r1", "role": "vllm"}
    series = []
    for name, labels, value, kind in recorded_series() + counter_series():
        growing = kind in ("counter", "histogram") and not name.endswith("_created")
        step = 60 if name == "vllm:lora_requests_info" else (1 if growing else 0)
        series.append({"series": _series_text(name, {**labels, **target}),
                       "values": f"{value!r}+{step}x20" if step else f"{value!r}x20"})
    for job in ("vllm", "vllm-health"):
        series.append({"series": _series_text("up", {**target, "job": job}), "values": "1x20"})
    rules = [{"alert": f"Panel{index}", "expr": f"count({grafana_free(expr)})"}
             for index, (_, expr) in enumerate(queries())]
    (tmp_path / "panels.rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    checks = [{"eval_time": "20m", "alertname": rule["alert"], "exp_alerts": [{"exp_labels": {}}]} for rule in rules]
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["panels.rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]}))
    result = run_promtool("test", "rules", "test.yml", cwd=tmp_path)
    names = {f"Panel{index}": title for index, (title, _) in enumerate(queries())}
    failed = sorted({names[name] for name in re.findall(r"alertname: (Panel\d+)", result.stdout + result.stderr)})
    assert result.returncode == 0, f"no data: {failed}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"

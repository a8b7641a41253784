#!/usr/bin/env python3
"""Generate the Grafana dashboard of the vLLM hosts from code.

Writes roles/vllm_observability/files/grafana/vllm-dashboard.json; `--check`
fails when the committed file differs from what this script makes (run by the
unit tests). Every query uses the target labels the role's file_sd files give
(host, release, role; jobs vllm and vllm-health) and only metric names vLLM
0.11.0 exports (tests/unit/data/vllm_0.11.0/metrics_busy.txt), or the requests
per model the role's shipped middleware adds to vLLM's /metrics
(vllm_deploy_model_requests_total, recorded in metrics_requests_per_model.txt);
a unit test checks each name. Plain dictionaries: the JSON model is small and
stable, and the controller needs no Grafana library for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

try:  # imported by the tests as scripts.<name>
    from scripts import generated
except ImportError:  # run as scripts/<name>.py
    import generated  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "roles" / "vllm_observability" / "files" / "grafana" / "vllm-dashboard.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every vLLM series of the selected hosts, from the /metrics scrape.
SEL = 'job="vllm", host=~"$host"'
# An adapter's name inside vllm:lora_requests_info's comma-separated lists.
ADAPTER = '(.*,)?${adapter:regex}(,.*)?'
# Requests per selected model, counted by the role's shipped middleware (RequestsPerModel in
# roles/vllm/files/vllm_lora_name_compat.py) on vLLM's own /metrics: model, kind, code.
REQUESTS = "vllm_deploy_model_requests_total"
WIDTH = 24


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    query: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "refId": ref}
    if legend:
        query["legendFormat"] = legend
    if instant:
        query.update({"instant": True, "range": False, "format": "table"})
    return query


def panel(kind: str, title: str, description: str, targets: list[dict[str, Any]], width: int = 8,
          unit: str = "short", **extra: Any) -> dict[str, Any]:
    refs = "ABCDEFGH"
    for index, query in enumerate(targets):
        query["refId"] = refs[index]
    result: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "targets": targets, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": width, "h": 8},
    }
    result.update(extra)
    return result


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[dict[str, Any]]:
    return [target(f"histogram_quantile({q}, sum by (host, le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
                   f"{{{{host}}}} p{int(q * 100)}") for q in qs]


def row(title: str, **extra: Any) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": WIDTH, "h": 1}, **extra}


def sections() -> list[dict[str, Any]]:
    return [
        row("Hosts"),
        panel("stat", "Up (/metrics and /health)",
              "1 when the host answers both /metrics and /health with 200 (the VllmHostDown alert's expression).",
              [target('min without (job) (up{job=~"vllm|vllm-health", host=~"$host"})', "{{host}}")],
              options={"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}},
              fieldConfig={"defaults": {"unit": "short", "mappings": [
                  {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                "1": {"text": "UP", "color": "green"}}}]},
                  "overrides": []}),
        panel("table", "Current release and vLLM start time",
              "The release label comes from the targets (playbooks/monitoring.yml, run at the end of every deploy,"
              " roll and rollback); the time is when the serving vLLM process started.",
              [target(f"max by (host, release) (process_start_time_seconds{{{SEL}}}) * 1000", instant=True)],
              unit="dateTimeAsIso"),
        panel("timeseries", "Restarts in the last hour",
              "Starts of vLLM's API server seen in its process_start_time_seconds, planned ones (deploys, rolls,"
              " rollbacks, maintenance) included. VllmCrashLooping pages at 3 restarts systemd made by itself"
              " (node_exporter's NRestarts), or at 3 of these starts on a host without node_exporter.",
              [target(f"sum by (host) (changes(process_start_time_seconds{{{SEL}}}[1h]))", "{{host}}")]),
        row("Load"),
        panel("timeseries", "Requests running", "Requests in the engine's running batch.",
              [target(f"sum by (host) (vllm:num_requests_running{{{SEL}}})", "{{host}}")]),
        panel("timeseries", "Requests waiting", "Requests queued for the engine (VllmRequestsWaitingLong).",
              [target(f"sum by (host) (vllm:num_requests_waiting{{{SEL}}})", "{{host}}")]),
        panel("timeseries", "Tokens per second", "Prompt (prefill) and generated tokens processed per second.",
              [target(f"sum by (host) (rate(vllm:generation_tokens_total{{{SEL}}}[$__rate_interval]))",
                      "{{host}} generated"),
               target(f"sum by (host) (rate(vllm:prompt_tokens_total{{{SEL}}}[$__rate_interval]))",
                      "{{host}} prompt")], unit="tps"),
        panel("timeseries", "KV cache use", "Share of the KV cache in use (VllmKvCacheNearlyFull above 95 %).",
              [target(f"max by (host) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{host}}")], unit="percentunit",
              fieldConfig={"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []}),
        panel("timeseries", "Finished requests per second", "By finish reason: stop, length, abort.",
              [target(f"sum by (host, finished_reason) (rate(vllm:request_success_total{{{SEL}}}[$__rate_interval]))",
                      "{{host}} {{finished_reason}}")], unit="reqps"),
        panel("timeseries", "Preemptions per second", "Requests evicted from the KV cache and recomputed later.",
              [target(f"sum by (host) (rate(vllm:num_preemptions_total{{{SEL}}}[$__rate_interval]))", "{{host}}")]),
        row("Latency"),
        panel("timeseries", "Time to first token", "From the request's arrival to its first token.",
              quantiles("vllm:time_to_first_token_seconds"), unit="s"),
        panel("timeseries", "End-to-end request latency", "From the request's arrival to its last token.",
              quantiles("vllm:e2e_request_latency_seconds"), unit="s"),
        panel("timeseries", "Inter-token latency", "Time between two generated tokens of a request.",
              quantiles("vllm:inter_token_latency_seconds"), unit="s"),
        panel("timeseries", "Queue time", "Time requests spent waiting for the engine (VllmRequestsWaitingLong).",
              quantiles("vllm:request_queue_time_seconds", (0.5, 0.9)), unit="s"),
        row("LoRA adapters"),
        panel("timeseries", "Requests per second by model",
              "Completion requests per selected model: the base, each adapter (selected by `model` or by"
              " `lora_name`), and other (names the host does not serve, unreadable bodies). Counted by the"
              f" role's middleware on vLLM's /metrics ({REQUESTS}); vLLM's own counters name the base model"
              " for adapter requests too.",
              [target(f"sum by (host, model) (rate({REQUESTS}{{{SEL}}}[$__rate_interval]))", "{{host}} {{model}}")],
              width=16, unit="reqps"),
        panel("timeseries", "Failed requests per second by model",
              "Requests vLLM answered with 4xx or 5xx (or not at all), per selected model; 0 for a model"
              " without failures (the `or ... * 0`: no failure is a value, not missing data).",
              [target(f"sum by (host, model) (rate({REQUESTS}{{{SEL}, code!=\"2xx\"}}[$__rate_interval]))"
                      f" or sum by (host, model) (rate({REQUESTS}{{{SEL}}}[$__rate_interval])) * 0",
                      "{{host}} {{model}}")], unit="reqps"),
        panel("table", "Adapter sets seen running or waiting",
              "vLLM 0.11 reports adapters only through vllm:lora_requests_info: one series per combination of"
              " adapters with requests running and waiting, its value the last time that combination was seen."
              " It counts no requests per adapter.",
              [target(f"max by (host, max_lora, running_lora_adapters, waiting_lora_adapters)"
                      f" (max_over_time(vllm:lora_requests_info{{{SEL}}}[$__range])) * 1000", instant=True)],
              width=WIDTH, unit="dateTimeAsIso"),
        row("Adapter $adapter", repeat="adapter"),
        panel("timeseries", "$adapter: requests per second",
              f"Requests that selected the adapter, by vLLM's answer (code), per host ({REQUESTS}). The adapters"
              " are the ones the hosts serve (the counter's kind=\"adapter\" series).",
              [target(f"sum by (host, code) (rate({REQUESTS}{{{SEL}, kind=\"adapter\", model=~\"${{adapter:regex}}\"}}"
                      f"[$__rate_interval]))", "{{host}} {{code}}")], unit="reqps"),
        panel("timeseries", "$adapter: requests running or waiting",
              "1 when the adapter had requests running (or waiting) in the interval, from the adapter lists of"
              " vllm:lora_requests_info.",
              [target(f"max by (host) (changes(vllm:lora_requests_info{{{SEL}, running_lora_adapters=~\"{ADAPTER}\"}}"
                      f"[$__rate_interval]) > bool 0)", "{{host}} running"),
               target(f"max by (host) (changes(vllm:lora_requests_info{{{SEL}, waiting_lora_adapters=~\"{ADAPTER}\"}}"
                      f"[$__rate_interval]) > bool 0)", "{{host}} waiting")]),
        panel("stat", "$adapter: last request running",
              "Seconds since the adapter last had a request in the running batch, per host.",
              [target(f"time() - max by (host) (vllm:lora_requests_info{{{SEL}, running_lora_adapters=~\"{ADAPTER}\"}})",
                      "{{host}}")], unit="s"),
    ]


def layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids in order, and positions: rows take a line, panels fill lines left to right."""
    x = y = 0
    line_height = 0
    for number, item in enumerate(items, start=1):
        item["id"] = number
        grid = item["gridPos"]
        if item["type"] == "row" or x + grid["w"] > WIDTH:
            y += line_height
            x = line_height = 0
        grid.update({"x": x, "y": y})
        if item["type"] == "row":
            y += 1
            continue
        x += grid["w"]
        line_height = max(line_height, grid["h"])
    return items


def variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        # "All" is sent as .* (allValue), not as the list of values Grafana has seen: a host with
        # no series in the time range still shows (as DOWN) rather than dropping out of every panel.
        return {"type": "query", "name": name, "label": label, "datasource": DATASOURCE,
                "query": {"query": expr, "refId": f"{name}-variable"}, "definition": expr,
                "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
         "current": {}, "hide": 0},
        # From `up`: every target of the file_sd files, also a host whose vLLM never answered.
        query("host", "Host", 'label_values(up{job="vllm"}, host)'),
        # The adapters the hosts serve, from the counter (present from start-up, at 0, with the
        # shipped defaults); the declared ones (vllm_deploy_adapter_declared) need the textfile.
        query("adapter", "Adapter", f'label_values({REQUESTS}{{job="vllm", kind="adapter"}}, model)'),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "vllm-lora-ansible",
        "title": "vLLM hosts (vllm-lora-ansible)",
        "description": "Generated by scripts/gen_dashboard.py; do not edit.",
        "tags": ["vllm", "lora"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "graphTooltip": 1,
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "panels": layout(sections()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    return generated.main(argv, OUT, render, "gen_dashboard.py", __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Filters of playbooks/benchmark.yml: which cases run on a host, and the report built from
what vLLM's own benchmark saved.

vllm_benchmark_plan: the cases (base model alone, one adapter, a mix of all adapters) at each
request rate, from the adapters of the release the host serves.
vllm_benchmark_report: per host and case, the figures copied verbatim from the JSON `vllm bench
serve` saved (never recomputed), each one's ratio to the base case at the same rate, and what
the host's request counter counted.
vllm_benchmark_markdown: the same as a table for people.

Plain typed Python, unit-tested without a host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # unit tests without Ansible on the path
    AnsibleFilterError = ValueError  # type: ignore[assignment,misc]

CASES = ("base", "adapter", "mix")
# Figures taken from vLLM's saved result, as saved: throughput, and the latency statistics
# (mean/median/std/pNN of TTFT, TPOT, ITL, end-to-end) in milliseconds.
FIGURE_KEYS = ("num_prompts", "completed", "duration", "request_throughput", "output_throughput",
               "total_token_throughput", "total_input_tokens", "total_output_tokens")
LATENCY = re.compile(r"^(mean|median|std|p\d+(\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
# Figures divided by the base case's at the same rate ("x base" in the table).
RATIO_KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms")


def vllm_benchmark_plan(adapters: Sequence[str], cases: Sequence[str], adapter: str,
                        rates: Sequence[float]) -> dict[str, list[dict[str, Any]]]:
    """{"runs": [{case, adapters, rate}], "skipped": [{case, reason}]}: each case at each rate,
    in the order base, adapter, mix (ratios need the base first)."""
    served = [str(name) for name in adapters]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise AnsibleFilterError(f"vllm_benchmark_cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if adapter and adapter not in served:
        raise AnsibleFilterError(f"vllm_benchmark_adapter={adapter!r} is not an adapter the host serves"
                                 f" ({', '.join(served) or 'none'})")
    plan: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for case in CASES:
        if case not in cases:
            continue
        if case == "base":
            plan[case] = []
        elif not served:
            skipped.append({"case": case, "reason": "the host serves no adapter"})
        elif case == "adapter":
            plan[case] = [adapter or served[0]]
        elif len(served) < 2:
            skipped.append({"case": case, "reason": "the host serves one adapter: the mix would be the adapter case"})
        else:
            plan[case] = served
    runs = [{"case": case, "adapters": names, "rate": float(rate)} for case, names in plan.items() for rate in rates]
    return {"runs": runs, "skipped": skipped}


def _figures(saved: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in saved.items()
            if (key in FIGURE_KEYS or LATENCY.match(key)) and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def _ratios(figures: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, float | None]:
    if base is None:
        return {}
    ratios: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        value, reference = figures.get(key), base.get(key)
        ratios[key] = (round(float(value) / float(reference), 3)
                       if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference
                       else None)
    return ratios


def _host_report(name: str, host: Mapping[str, Any]) -> dict[str, Any]:
    """One host: `host` is its vllm_benchmark_host fact (runs: the vllm_benchmark module's looped results)."""
    if host.get("failed"):
        return {"failed": str(host["failed"]), "failed_task": str(host.get("failed_task", "")), "cases": [],
                "ok": False}
    runs = []
    base_at: dict[float, dict[str, Any]] = {}
    for run in host.get("runs") or []:
        item = run.get("item") or {}
        figures = _figures(run.get("saved") or {})
        rate = float(item.get("rate", 0))
        if item.get("case") == "base" and run.get("saved"):
            base_at[rate] = figures
        result_file = str(run.get("result_file") or "")
        runs.append({
            "case": str(item.get("case", "?")), "adapters": list(item.get("adapters") or []), "rate": rate,
            "ok": bool(run.get("ok")) and not run.get("failed"),
            "problems": list(run.get("problems") or ([str(run.get("msg"))] if run.get("failed") else [])),
            "figures": figures, "counted": run.get("counted") or {}, "elapsed": run.get("elapsed"),
            "result_file": result_file,
            "raw": f"benchmark-latest/{name}/{result_file.rsplit('/', 1)[-1]}" if run.get("saved") else "",
        })
    for entry in runs:
        entry["ratio_to_base"] = _ratios(entry["figures"], base_at.get(entry["rate"]))
    keep = ("release", "base_model", "adapters", "venv", "model_path", "settings", "skipped")
    return {**{key: host.get(key) for key in keep if key in host}, "cases": runs,
            "ok": bool(runs) and all(entry["ok"] for entry in runs)}


def vllm_benchmark_report(hosts: Mapping[str, Mapping[str, Any]], finished: str = "",
                          plot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report: {finished, ok, plot, not_run, hosts: {host: {release, base_model, adapters, settings,
    skipped, ok, cases: [{case, adapters, rate, ok, problems, figures, ratio_to_base, counted, raw,
    result_file, elapsed}]}}}. `hosts` maps each host to its vllm_benchmark_host fact; an empty one
    (a host this run did not reach) is listed in not_run."""
    report_hosts = {str(name): _host_report(str(name), host) for name, host in sorted(hosts.items()) if host}
    return {"finished": finished, "ok": bool(report_hosts) and all(h["ok"] for h in report_hosts.values()),
            "plot": dict(plot or {}), "not_run": sorted(str(name) for name, host in hosts.items() if not host),
            "hosts": report_hosts}


def _number(value: Any, digits: int = 1) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _ratio(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.2f}"


def vllm_benchmark_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: one table per host."""
    lines = [f"# vLLM benchmark (`vllm bench serve`), {report.get('finished', '')}", "",
             "Figures are vLLM's own, copied from the JSON its benchmark saved (the raw files are beside this"
             " report). `x base`: the figure divided by the base model's at the same request rate (above 1: more"
             " throughput, or a longer latency). `counted`:"
             " requests the host's `vllm_deploy_model_requests_total` counted on the case's models, of those sent.",
             ""]
    plot = report.get("plot") or {}
    lines += [f"Plot: {plot['file']}" if plot.get("written") else f"Plot: none ({plot.get('reason', 'not drawn')})", ""]
    for name, host in (report.get("hosts") or {}).items():
        if host.get("failed"):
            lines += [f"## {name}: not benchmarked", "", f"{host.get('failed_task', '')}: {host['failed']}", ""]
            continue
        settings = host.get("settings") or {}
        lines += [f"## {name}", "",
                  f"Release {host.get('release', '?')}, base model `{host.get('base_model', '?')}`, adapters"
                  f" {', '.join(host.get('adapters') or []) or 'none'}; {settings.get('num_prompts', '?')} requests"
                  f" per case, {settings.get('input_len', '?')} prompt and {settings.get('output_len', '?')}"
                  " generated tokens each.", ""]
        for skipped in host.get("skipped") or []:
            lines += [f"Case {skipped['case']} not run: {skipped['reason']}.", ""]
        lines += ["| case | adapters | rate (req/s) | completed | req/s | output tok/s | x base | TTFT median (ms)"
                  " | x base | TTFT p99 (ms) | ITL median (ms) | x base | ITL p99 (ms) | counted | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case in host.get("cases") or []:
            fig, ratio, counted = case["figures"], case["ratio_to_base"], case.get("counted") or {}
            on_case = counted.get("on_case_models")
            lines.append(
                f"| {case['case']} | {', '.join(case['adapters']) or '-'} | {case['rate']:g}"
                f" | {fig.get('completed', '-')}/{fig.get('num_prompts', '-')}"
                f" | {_number(fig.get('request_throughput'), 2)} | {_number(fig.get('output_throughput'))}"
                f" | {_ratio(ratio.get('output_throughput'))} | {_number(fig.get('median_ttft_ms'))}"
                f" | {_ratio(ratio.get('median_ttft_ms'))} | {_number(fig.get('p99_ttft_ms'))}"
                f" | {_number(fig.get('median_itl_ms'), 2)} | {_ratio(ratio.get('median_itl_ms'))}"
                f" | {_number(fig.get('p99_itl_ms'), 2)}"
                f" | {'-' if on_case is None else f'{on_case:g}'}/{counted.get('expected', '-')}"
                f" | {'yes' if case['ok'] else 'NO'} |")
        problems = [f"- {case['case']} at {case['rate']:g} req/s: {problem}"
                    for case in host.get("cases") or [] for problem in case["problems"]]
        lines += [""] + (["Problems:", ""] + problems + [""] if problems else [])
    return "\n".join(lines).rstrip() + "\n"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_benchmark_plan": vllm_benchmark_plan,
            "vllm_benchmark_report": vllm_benchmark_report,
            "vllm_benchmark_markdown": vllm_benchmark_markdown,
        }

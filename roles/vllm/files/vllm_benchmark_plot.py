#!/usr/bin/env python3
"""Draw the benchmark report's plot, on the controller (not shipped to hosts).

usage: vllm_benchmark_plot.py OUT.png < benchmark-report.json

Per host, three small panels against the request rate, one line per case (base,
adapter, mix): output tokens per second, median time to first token, median
inter-token latency; the figures vLLM's benchmark saved, as in the report.

Draws only with matplotlib already installed in the controller's Python (the
project does not depend on it). Prints one JSON line either way:
{"written": true, "file": ...} or {"written": false, "reason": ...}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

PANELS = (("output_throughput", "output tokens/s"), ("median_ttft_ms", "median TTFT (ms)"),
          ("median_itl_ms", "median ITL (ms)"))


def series(host: dict[str, Any], key: str) -> dict[str, list[tuple[float, float]]]:
    """{case label: [(rate, figure)]} for one figure of one host, sorted by rate."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for case in host.get("cases") or []:
        value = (case.get("figures") or {}).get(key)
        if isinstance(value, (int, float)):
            label = case["case"] + (f" ({', '.join(case['adapters'])})" if case.get("adapters") else "")
            lines.setdefault(label, []).append((float(case["rate"]), float(value)))
    return {label: sorted(points) for label, points in lines.items()}


def main(argv: list[str]) -> int:
    out = argv[1]
    report = json.load(sys.stdin)
    hosts = {name: host for name, host in (report.get("hosts") or {}).items() if host.get("cases")}
    if not hosts:
        print(json.dumps({"written": False, "reason": "no case has figures to plot"}))
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print(json.dumps({"written": False, "reason": (
            f"matplotlib is not installed in the controller's Python ({sys.executable}); the project does not"
            " add it as a dependency for one picture: the table and the JSON carry every figure")}))
        return 0
    figure, axes = pyplot.subplots(len(hosts), len(PANELS), figsize=(4 * len(PANELS), 3 * len(hosts)),
                                   squeeze=False)
    for row, (name, host) in enumerate(sorted(hosts.items())):
        for column, (key, title) in enumerate(PANELS):
            axis = axes[row][column]
            for label, points in series(host, key).items():
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            axis.set_title(f"{name}: {title}", fontsize=9)
            axis.set_xlabel("requests/s", fontsize=8)
            axis.tick_params(labelsize=7)
            if row == 0 and column == 0:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    print(json.dumps({"written": True, "file": os.path.basename(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

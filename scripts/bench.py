#!/usr/bin/env python3
"""Benchmarks that print figures (not timed tests: these machines are shared
and noisy, so each benchmark compares ratios measured within one run).

  scripts/bench.py noop      no-op re-run of site.yml: tiny model vs. a model
                             with multi-GB placeholder weights (target ratio <= 1.2:
                             nothing is re-hashed or re-copied)
  scripts/bench.py rolling   per host, the time out of service during a rolling
                             restart vs. vLLM's own start-up time from its journal
                             (target ratio <= 1.15)

Needs what the e2e tests need (root, dockerd, scripts/setup.sh --vllm); run it
with the controller venv's python from the repository root.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import declaration_vars, write_vars  # noqa: E402
from tests.fixtures import tinyqwen  # noqa: E402
from tests.harness.ansible import run_playbook  # noqa: E402
from tests.harness.hosts import HostPool, write_inventory  # noqa: E402
from tests.harness.software import LOCAL_GROUP_VARS, ensure_software_image  # noqa: E402


def software_image(workdir: Path, fx: tinyqwen.Fixtures) -> str:
    return ensure_software_image(workdir, write_vars(workdir / "sw.json", declaration_vars(fx)))


def timed(playbook: str, inventory: Path, vars_file: Path, *args: str) -> float:
    start = time.monotonic()
    result = run_playbook(playbook, inventory, extra_args=args, extra_vars_files=[vars_file])
    if result.rc != 0:
        raise SystemExit(result.tail(60))
    return time.monotonic() - start


def bench_noop(workdir: Path, fx: tinyqwen.Fixtures, gib: float, repeats: int) -> None:
    big = workdir / "big-model"
    shutil.copytree(fx.model, big)
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
    with (big / "placeholder-weights.dat").open("wb") as handle:  # vLLM loads *.safetensors only
        for _ in range(int(gib * 1024)):
            handle.write(block)
    with HostPool(image=software_image(workdir, fx), count=2, prefix="bench-noop") as pool:
        inventory = write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS)
        figures = {}
        for label, model, host in (("tiny", fx.model, pool.names[0]), (f"{gib:g} GiB", big, pool.names[1])):
            data = declaration_vars(fx)
            data["vllm_model"] = {**data["vllm_model"], "path": str(model)}  # type: ignore[dict-item]
            vars_file = write_vars(workdir / f"vars-{host}.json", data)
            first = timed("site.yml", inventory, vars_file, "--limit", host)
            noop = min(timed("site.yml", inventory, vars_file, "--limit", host) for _ in range(repeats))
            figures[label] = noop
            print(f"{label:>10}: first run {first:6.1f} s, no-op re-run {noop:6.1f} s (best of {repeats})")
        tiny, large = figures.values()
        print(f"ratio no-op(large)/no-op(tiny) = {large / tiny:.2f}  (target <= 1.2)")


def journal_startup_seconds(host, since: str) -> float:  # type: ignore[no-untyped-def]
    """vLLM's own start-up: systemd starting the unit -> 'Application startup complete.'"""
    out = host.sh(f"journalctl -u vllm --since '{since}' -o short-iso-precise --no-pager").stdout
    started = [line for line in out.splitlines() if "Started vllm.service" in line]
    ready = [line for line in out.splitlines() if "Application startup complete" in line]
    if not started or not ready:
        raise SystemExit(f"{host.name}: start/ready lines not found in the journal")
    parse = lambda line: datetime.fromisoformat(line.split()[0])  # noqa: E731
    return (parse(ready[-1]) - parse(started[-1])).total_seconds()


def bench_rolling(workdir: Path, fx: tinyqwen.Fixtures, hosts: int) -> None:
    with HostPool(image=software_image(workdir, fx), count=hosts, prefix="bench-roll") as pool:
        inventory = write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS)
        vars_file = write_vars(workdir / "vars.json", {**declaration_vars(fx), "vllm_report_dir": str(workdir)})
        timed("site.yml", inventory, vars_file)
        since = pool.hosts[0].sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
        timed("rolling_restart.yml", inventory, vars_file)
        report = json.loads((workdir / "rolling_restart-latest.json").read_text())
        print(f"{'host':<28} {'out of service s':>17} {'vLLM start-up s':>16} {'ratio':>6}")
        for host in pool.hosts:
            # The rolling play records the roll per host; the report carries the deployment.
            out_of_service = float(report[host.name]["roll"]["out_of_service_seconds"])
            startup = journal_startup_seconds(host, since)
            print(f"{host.name:<28} {out_of_service:>17.1f} {startup:>16.1f} {out_of_service / startup:>6.2f}")
        print("target: ratio <= 1.15")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["noop", "rolling"])
    parser.add_argument("--gib", type=float, default=3.0, help="placeholder weights for noop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=1)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    try:
        fx = tinyqwen.make_all(workdir / "fixtures")
        if args.which == "noop":
            bench_noop(workdir, fx, args.gib, args.repeats)
        else:
            bench_rolling(workdir, fx, args.hosts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Benchmarks that print figures (not timed tests: these machines are shared
and noisy, so each benchmark compares ratios measured within one run).

  scripts/bench.py noop      no-op re-run of site.yml: tiny model vs. a model
                             with multi-GB placeholder weights (target ratio <= 1.2:
                             nothing is re-hashed or re-copied)
  scripts/bench.py rolling   per host, the time out of service during a rolling
  [--hosts N] [--balancer]   restart vs. vLLM's own start-up time from its journal
                             (targets: overhead <= 0.5 s, <= 1.0 s behind HAProxy);
                             --balancer puts the hosts behind an HAProxy test host
  scripts/bench.py preflight the adapter check (vllm_adapter_check's check_all) on a
  [--repeats N]              rank-16 all-modules adapter the size of a Qwen2.5-7B one,
                             BF16 and F32: header only vs. with the tensor values
                             (target: under 2 s with the values)

noop and rolling need what the e2e tests need (root, dockerd, scripts/setup.sh
--vllm); preflight only numpy and safetensors. Run it with the controller venv's
python from the repository root.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Ansible's collection loader first: the harness imports this collection's modules by FQCN.
import tests.conftest  # noqa: E402,F401
from tests.e2e.conftest import declaration_vars, write_vars  # noqa: E402
from tests.fixtures import tinyqwen  # noqa: E402
from tests.harness.ansible import run_playbook  # noqa: E402
from tests.harness.balancer import haproxy  # noqa: E402
from tests.harness.hosts import HostPool, write_inventory  # noqa: E402
from tests.harness.software import LOCAL_GROUP_VARS, ensure_software_image  # noqa: E402
from tests.unit.loader import load  # noqa: E402

QWEN25_7B = tinyqwen.ModelShape(hidden=3584, intermediate=18944, heads=28, kv_heads=4, layers=28)
"""Qwen2.5-7B's linear layers: q/o 3584 x 3584, k/v 3584 -> 512 (4 KV heads x 128), MLP 18944."""


def software_image(workdir: Path, fx: tinyqwen.Fixtures) -> str:
    return ensure_software_image(workdir, write_vars(workdir / "sw.json", declaration_vars(fx)))


def timed(playbook: str, inventory: Path, vars_file: Path, *args: str, log: Path | None = None) -> float:
    start = time.monotonic()
    result = run_playbook(playbook, inventory, extra_args=args, extra_vars_files=[vars_file], log=log)
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


def journal_seconds(host, since: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """From vLLM's journal: (stop of the old process, start-up of the new one).

    Start-up is vLLM's own: systemd starting the unit -> 'Application startup complete.'
    """
    out = host.sh(f"journalctl -u vllm --since '{since}' -o short-iso-precise --no-pager").stdout
    lines = out.splitlines()

    def last(text: str) -> datetime:
        found = [line for line in lines if text in line]
        if not found:
            raise SystemExit(f"{host.name}: no journal line with {text!r} since {since}")
        return datetime.fromisoformat(found[-1].split()[0])

    stop = (last("Stopped vllm.service") - last("Stopping vllm.service")).total_seconds()
    startup = (last("Application startup complete") - last("Started vllm.service")).total_seconds()
    return stop, startup


def bench_rolling(workdir: Path, fx: tinyqwen.Fixtures, hosts: int, with_balancer: bool, log: Path | None) -> None:
    with HostPool(image=software_image(workdir, fx), count=hosts, prefix="bench-roll") as pool, \
            (haproxy(pool.hosts, prefix="bench-lb") if with_balancer else nullcontext()) as lb:
        extra_groups = {"balancers": [lb.name]} if lb else None
        host_vars = {h.name: {"vllm_listen_host": "0.0.0.0", "vllm_balancer_host": lb.name,
                                 "vllm_api_key": "bench-rolling-key"} for h in pool.hosts} \
            if lb else None
        inventory = write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS,
                                    host_vars=host_vars, extra_groups=extra_groups)
        vars_file = write_vars(workdir / "vars.json", {**declaration_vars(fx), "vllm_report_dir": str(workdir)})
        timed("site.yml", inventory, vars_file)
        since = pool.hosts[0].sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
        timed("rolling_restart.yml", inventory, vars_file, log=log)
        report = json.loads((workdir / "rolling_restart-latest.json").read_text())
        print(f"rolling restart, {hosts} host(s), {'behind HAProxy' if lb else 'no balancer'}:")
        print(f"{'host':<26} {'out of service s':>16} {'vLLM start-up s':>15} {'ratio':>6} "
              f"{'overhead s':>10} {'old vLLM stop s':>15} {'overhead - stop s':>17}")
        for host in pool.hosts:
            # The rolling play records the roll per host; the report carries the deployment.
            out_of_service = float(report[host.name]["roll"]["out_of_service_seconds"])
            stop, startup = journal_seconds(host, since)
            print(f"{host.name:<26} {out_of_service:>16.1f} {startup:>15.1f} {out_of_service / startup:>6.2f} "
                  f"{out_of_service - startup:>10.1f} {stop:>15.1f} {out_of_service - startup - stop:>17.1f}")
        print("targets: overhead <= 0.5 s without a balancer, <= 1.0 s behind HAProxy. Out of service: behind a")
        print("balancer, HAProxy's drain -> its put back (after the adapter proof), on the balancer's clock; without")
        print("one, the restart -> /health 200, on the host's. Overhead = out of service - vLLM's start-up (journal:")
        print("Started -> 'Application startup complete'); the old process's stop (journal: Stopping -> Stopped) is")
        print("part of it.")


def best_of(repeats: int, run) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_preflight(workdir: Path, repeats: int) -> None:
    load("plugins/module_utils/vllm_files.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files")
    adapters = load("plugins/module_utils/vllm_adapters.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_adapters")
    safetensors = importlib.import_module("ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_safetensors")
    model = workdir / "qwen2.5-7b"
    model.mkdir()
    ids = {token: index for index, token in enumerate(tinyqwen.SPECIAL_TOKENS)}
    (model / "config.json").write_text(json.dumps(tinyqwen.model_config(QWEN25_7B, token_ids=ids)))
    modules = tinyqwen.ATTN_MODULES + tinyqwen.MLP_MODULES
    print(f"adapter check, rank 16, {', '.join(modules)}, {QWEN25_7B.layers} layers; best of {repeats}")
    print(f"{'dtype':<6} {'tensors':>7} {'params':>11} {'MB':>6} {'header s':>9} {'full s':>7} "
          f"{'full/header':>11} {'MB/s':>6}")
    for dtype in ("bfloat16", "float32"):
        path = tinyqwen.make_adapter(workdir / f"adapter-{dtype}", seed=1, rank=16, target_modules=modules,
                                     shape=QWEN25_7B, dtype=dtype, base_model_name_or_path="Qwen/Qwen2.5-7B")
        declared = [{"name": "big", "path": str(path)}]

        def check(values: bool) -> None:
            result = adapters.check_all(declared, str(model), max_lora_rank=16, check_values=values)
            if result["errors"]:
                raise SystemExit("\n".join(result["errors"]))

        header = best_of(repeats, lambda: check(False))
        full = best_of(repeats, lambda: check(True))
        entries = safetensors.read_safetensors_index(str(path / "adapter_model.safetensors"))
        params = sum(e.end - e.start for e in entries.values()) // (2 if dtype == "bfloat16" else 4)
        mbytes = (path / "adapter_model.safetensors").stat().st_size / 1e6
        print(f"{'BF16' if dtype == 'bfloat16' else 'F32':<6} {len(entries):>7} {params:>11,} {mbytes:>6.0f} {header:>9.4f} {full:>7.3f} "
              f"{full / header:>11.0f} {mbytes / full:>6.0f}")
    print("target: full < 2 s. header: adapter_config.json + the safetensors header; full: also every lora_A/")
    print(f"lora_B value (NaN/Inf, all-zero lora_B), read {safetensors.DATA_CHUNK_BYTES >> 20} MiB at a time.")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["noop", "rolling", "preflight"])
    parser.add_argument("--gib", type=float, default=3.0, help="placeholder weights for noop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--balancer", action="store_true", help="rolling: the hosts behind an HAProxy test host")
    parser.add_argument("--log", type=Path, help="append the rolling play's output (task timings) here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    try:
        if args.which == "preflight":
            bench_preflight(workdir, args.repeats)
            return 0
        fx = tinyqwen.make_all(workdir / "fixtures")
        if args.which == "noop":
            bench_noop(workdir, fx, args.gib, args.repeats)
        else:
            bench_rolling(workdir, fx, args.hosts, args.balancer, args.log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The benchmark: the vllm_benchmark module (one `vllm bench serve` case, checked by the host's request
counter) and the filters of playbooks/benchmark.yml (the plan, the report, its table).

The module runs a stand-in for `vllm bench serve` (a small script that does what vLLM's client does:
POST /v1/completions with `model` = the served name or one of --lora-modules, the key from
OPENAI_API_KEY as a Bearer token, then saves its result JSON) against a local server whose /metrics
is the role's real counter (prometheus_client's exposition). The counter parser is checked on the
/metrics a real vLLM 0.11.0 served with the counter (tests/unit/data/vllm_0.11.0).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tests.unit.loader import REPO, load
from tests.unit.local_http import LocalServer, Request
from tests.unit.modules import run_main

bench = load("plugins/modules/vllm_benchmark.py", "vllm_benchmark_module")
filters = load("plugins/filter/vllm_benchmark.py", "vllm_benchmark_filters")
compat = load("roles/vllm/files/vllm_lora_name_compat.py")
DATA = REPO / "tests/unit/data/vllm_0.11.0"
KEY = "sk-bench-0123456789-secret"
BASE = "tiny-qwen2"

# --- the counter as vLLM serves it -------------------------------------------------


def test_the_counter_is_read_from_what_a_real_vllm_served() -> None:
    busy = bench.parse_counter((DATA / "metrics_requests_per_model.txt").read_text())
    assert busy == {(BASE, "base", "2xx"): 2.0, ("alpha", "adapter", "2xx"): 2.0, ("beta", "adapter", "2xx"): 2.0,
                    ("other", "other", "4xx"): 1.0}
    idle = bench.parse_counter((DATA / "metrics_requests_per_model_idle.txt").read_text())
    assert idle == {(BASE, "base", "2xx"): 0.0, ("alpha", "adapter", "2xx"): 0.0, ("beta", "adapter", "2xx"): 0.0}
    assert bench.deltas(idle, busy) == {(BASE, "base", "2xx"): 2.0, ("alpha", "adapter", "2xx"): 2.0,
                                        ("beta", "adapter", "2xx"): 2.0, ("other", "other", "4xx"): 1.0}


def test_a_vllm_without_the_counter_has_none() -> None:
    assert bench.parse_counter((DATA / "metrics_busy.txt").read_text()) is None


# --- judging one case --------------------------------------------------------------


def test_an_adapter_case_answered_by_the_base_fails_naming_where_the_requests_went() -> None:
    """The trap this project closes: requests for an adapter served by the base model."""
    problems, counted = bench.judge(["alpha"], "adapter", 8, {(BASE, "base", "2xx"): 8.0}, completed=8)
    assert len(problems) == 1 and "8 requests were sent to adapter alpha, the host counted 0 there" in problems[0]
    assert f"{BASE} 8" in problems[0]
    assert counted == {"expected": 8, "counter_present": True, "on_case_models": 0.0, "elsewhere": 8.0,
                       "per_model": {BASE: {"2xx": 8.0}}, "exact": False}


def test_a_mix_counted_on_its_adapters_is_exact() -> None:
    changed = {("alpha", "adapter", "2xx"): 3.0, ("beta", "adapter", "2xx"): 5.0}
    problems, counted = bench.judge(["alpha", "beta"], "adapter", 8, changed, completed=8)
    assert problems == [] and counted["exact"] is True and counted["on_case_models"] == 8
    assert counted["per_model"] == {"alpha": {"2xx": 3.0}, "beta": {"2xx": 5.0}}


def test_other_clients_traffic_is_recorded_but_does_not_fail_the_case() -> None:
    changed = {("alpha", "adapter", "2xx"): 9.0, (BASE, "base", "2xx"): 2.0}
    problems, counted = bench.judge(["alpha"], "adapter", 8, changed, completed=8)
    assert problems == [] and counted["exact"] is False and counted["elsewhere"] == 2


def test_an_adapter_name_counted_as_other_is_not_the_adapter() -> None:
    problems, _ = bench.judge(["alpha"], "adapter", 4, {("other", "other", "4xx"): 4.0}, completed=0)
    assert any("4 of 4 requests failed" in problem for problem in problems)
    assert any("counted 0 there" in problem for problem in problems)


def test_no_counter_on_the_host_fails_the_case_with_the_fix() -> None:
    problems, counted = bench.judge([BASE], "base", 4, None, completed=4)
    assert counted["counter_present"] is False and "playbooks/site.yml" in problems[0]


def test_a_restart_during_the_case_shows() -> None:
    problems, _ = bench.judge([BASE], "base", 2, {(BASE, "base", "2xx"): -5.0}, completed=2)
    assert any("restarted" in problem for problem in problems)


def test_the_command_line_carries_no_key_and_the_environment_does() -> None:
    params = {"vllm_bin": "/opt/vllm/venvs/v/bin/vllm", "url": "http://127.0.0.1:8000/", "model_path": "/srv/m",
              "served_name": BASE, "case": "mix", "adapters": ["alpha", "beta"], "request_rate": 4, "num_prompts": 8,
              "input_len": 32, "output_len": 16, "seed": 0, "percentiles": [50, 99], "api_key": KEY}
    argv = bench.bench_argv(params, "/var/lib/vllm-deploy/benchmark/mix-r4.json")
    assert KEY not in " ".join(argv)
    assert argv[:3] == ["/opt/vllm/venvs/v/bin/vllm", "bench", "serve"]
    pairs = dict(zip(argv[3::], argv[4::]))
    assert pairs["--base-url"] == "http://127.0.0.1:8000" and pairs["--dataset-name"] == "random"
    assert pairs["--model"] == "/srv/m" and pairs["--served-model-name"] == BASE
    assert pairs["--metric-percentiles"] == "50,99" and pairs["--ready-check-timeout-sec"] == "0"
    assert argv[-3:] == ["--lora-modules", "alpha", "beta"] and "--save-result" in argv and "--ignore-eos" in argv
    assert pairs["--result-dir"] == "/var/lib/vllm-deploy/benchmark" and pairs["--result-filename"] == "mix-r4.json"
    assert "--lora-modules" not in bench.bench_argv({**params, "adapters": []}, "/r/base-r4.json")
    assert bench.bench_env("/w", KEY)["OPENAI_API_KEY"] == KEY and "OPENAI_API_KEY" not in bench.bench_env("/w", "")


# --- the module, end to end against a stand-in --------------------------------------

FAKE_BENCH = r'''#!{python}
"""Stand-in for `vllm bench serve`: what it needs from vLLM's client, nothing more."""
import json, os, random, sys, time, urllib.request
args = sys.argv[1:]
assert args[:2] == ["bench", "serve"], args
def value(flag):
    return args[args.index(flag) + 1]
# The module gives the client a clean environment: the test's settings come from a file.
config = json.load(open({config!r}))
with open(config["seen"], "w") as seen:
    json.dump({{"argv": args, "key": os.environ.get("OPENAI_API_KEY"), "env": sorted(os.environ)}}, seen)
time.sleep(config.get("sleep", 0))
random.seed(int(value("--seed")))
loras = args[args.index("--lora-modules") + 1:] if "--lora-modules" in args else []
completed = 0
for _ in range(int(value("--num-prompts"))):
    # FAKE_BENCH_SEND_AS: what reaches the server instead (an adapter request answered by the base).
    model = config.get("send_as") or (random.choice(loras) if loras else value("--served-model-name"))
    body = json.dumps({{"model": model, "prompt": "x"}}).encode()
    request = urllib.request.Request(value("--base-url") + value("--endpoint"), body,
                                     {{"Authorization": "Bearer " + str(os.environ.get("OPENAI_API_KEY"))}})
    try:
        urllib.request.urlopen(request, timeout=10).read()
        completed += 1
    except Exception:
        pass
print("Namespace(...)")
with open(os.path.join(value("--result-dir"), value("--result-filename")), "w") as out:
    json.dump({{"date": "20261205-120000", "backend": "openai", "label": value("--label"), "num_prompts":
               int(value("--num-prompts")), "request_rate": float(value("--request-rate")), "completed": completed,
               "duration": 1.5, "request_throughput": completed / 1.5, "output_throughput": 40.0,
               "total_token_throughput": 60.0, "mean_ttft_ms": 12.5, "median_ttft_ms": 11.0, "p99_ttft_ms": 30.0,
               "mean_itl_ms": 2.5, "median_itl_ms": 2.0, "p99_itl_ms": 9.0}}, out)
'''


class FakeVllm(LocalServer):
    """Completions and a /metrics that is the role's real counter; the key is required."""

    def __init__(self, adapters: tuple[str, ...] = ("alpha", "beta")) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        self.counter = compat.ModelRequestCounter(
            Counter(compat.METRIC, compat.METRIC_HELP, compat.LABELS, registry=self.registry))
        self.adapters = adapters
        for name, kind in [(BASE, "base"), *[(name, "adapter") for name in adapters]]:
            self.counter.counter.labels(model=name, kind=kind, code="2xx")

    def answer(self, request: Request) -> tuple[int, Any]:
        if request.path == "/metrics":
            return 200, generate_latest(self.registry)
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            self.counter.count("other", "other", "4xx")
            return 401, {"error": "Unauthorized"}
        model = (request.body or {}).get("model")
        kind = "adapter" if model in self.adapters else ("base" if model == BASE else "other")
        self.counter.count(model if kind != "other" else "other", kind, "2xx" if kind != "other" else "4xx")
        return (200, {"model": model}) if kind != "other" else (404, {"error": {"code": 404}})


@pytest.fixture
def server() -> Iterator[FakeVllm]:
    with FakeVllm() as fake:
        yield fake


class FakeBench:
    """The stand-in program and its settings (sleep, send_as)."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "fake-bench.json"
        self.program = tmp_path / "fake-bench"
        self.program.write_text(FAKE_BENCH.format(python=sys.executable, config=str(self.config)))
        self.program.chmod(self.program.stat().st_mode | stat.S_IXUSR)
        self.set()

    def set(self, **settings: Any) -> None:
        self.config.write_text(json.dumps({"seen": str(self.config.parent / "seen.json"), **settings}))


@pytest.fixture
def fake_bench(tmp_path: Path) -> FakeBench:
    return FakeBench(tmp_path)


def run_case(capsys: pytest.CaptureFixture[str], server: FakeVllm, fake: FakeBench, tmp_path: Path,
             **overrides: Any) -> tuple[int, dict[str, Any], dict[str, Any]]:
    program = fake.program
    args = {"vllm_bin": str(program), "url": server.url, "model_path": "/srv/vllm/models/tiny", "served_name": BASE,
            "case": "adapter", "adapters": ["alpha"], "request_rate": 4.0, "num_prompts": 5,
            "result_dir": str(tmp_path / "results"), "api_key": KEY, "timeout": 30, **overrides}
    (tmp_path / "results").mkdir(exist_ok=True)
    code, result = run_main(bench.main, args, capsys)
    seen = json.loads((tmp_path / "seen.json").read_text()) if (tmp_path / "seen.json").exists() else {}
    return code, result, seen


def test_an_adapter_case_counted_on_its_adapter_passes_with_vllm_s_figures(
        capsys: pytest.CaptureFixture[str], server: FakeVllm, fake_bench: FakeBench, tmp_path: Path) -> None:
    code, result, seen = run_case(capsys, server, fake_bench, tmp_path)
    assert code == 0 and result["ok"] is True and result["problems"] == []
    assert result["counted"] == {"expected": 5, "counter_present": True, "on_case_models": 5.0, "elsewhere": 0.0,
                                 "per_model": {"alpha": {"2xx": 5.0}}, "exact": True}
    saved_file = Path(result["result_file"])
    assert saved_file == tmp_path / "results" / "adapter-r4.json"
    assert result["saved"] == json.loads(saved_file.read_text())  # as saved, not recomputed
    # The key: in the client's environment, on no command line, nowhere in the result.
    assert seen["key"] == KEY and KEY not in " ".join(seen["argv"]) and KEY not in json.dumps(result)
    assert "HF_HUB_OFFLINE" in seen["env"]  # the client's own, clean environment


def test_a_mix_spreads_over_the_adapters_and_is_counted_on_them(
        capsys: pytest.CaptureFixture[str], server: FakeVllm, fake_bench: FakeBench, tmp_path: Path) -> None:
    code, result, _ = run_case(capsys, server, fake_bench, tmp_path, case="mix",
                               adapters=["alpha", "beta"], num_prompts=12)
    assert result["ok"] is True and set(result["counted"]["per_model"]) == {"alpha", "beta"}
    assert sum(codes["2xx"] for codes in result["counted"]["per_model"].values()) == 12


def test_adapter_requests_served_by_the_base_fail_the_case(
        capsys: pytest.CaptureFixture[str], server: FakeVllm, fake_bench: FakeBench, tmp_path: Path) -> None:
    """Every request answered 200 (vLLM's benchmark sees no failure), but by the base model: the
    lora_name trap, seen only by the counter."""
    fake_bench.set(send_as=BASE)
    code, result, _ = run_case(capsys, server, fake_bench, tmp_path, adapters=["alpha"])
    assert code == 0 and result["ok"] is False and result["saved"]["completed"] == 5
    assert result["problems"] == [f"5 requests were sent to adapter alpha, the host counted 0 there (counted:"
                                  f" {BASE} 5): requests were not served by the model they asked for"]


def test_a_wrong_key_fails_the_case_by_vllm_s_and_the_counter_s_account(
        capsys: pytest.CaptureFixture[str], server: FakeVllm, fake_bench: FakeBench, tmp_path: Path) -> None:
    code, result, _ = run_case(capsys, server, fake_bench, tmp_path, api_key="wrong-key")
    assert code == 0 and result["ok"] is False
    assert any("5 of 5 requests failed" in problem for problem in result["problems"])
    assert result["counted"]["per_model"] == {"other": {"4xx": 5.0}}


def test_a_case_that_runs_too_long_is_stopped_and_fails(
        capsys: pytest.CaptureFixture[str], server: FakeVllm, fake_bench: FakeBench, tmp_path: Path) -> None:
    fake_bench.set(sleep=60)
    code, result, _ = run_case(capsys, server, fake_bench, tmp_path, timeout=1)
    assert result["ok"] is False and result["elapsed"] < 20
    assert "did not finish within 1 s" in result["problems"][0]


def test_a_host_without_the_counter_fails_the_case(
        capsys: pytest.CaptureFixture[str], fake_bench: FakeBench, tmp_path: Path) -> None:
    recorded = (DATA / "metrics_busy.txt").read_text()
    with LocalServer(lambda request: (200, recorded) if request.path == "/metrics" else (200, {})) as old:
        code, result, _ = run_case(capsys, old, fake_bench, tmp_path)  # type: ignore[arg-type]
    assert result["ok"] is False and result["counted"]["counter_present"] is False


class DiesDuringTheCase(FakeVllm):
    """Its /metrics answers before the case, then no longer (the service went down meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics_reads = 0

    def answer(self, request: Request) -> tuple[int, Any]:
        if request.path == "/metrics":
            self.metrics_reads += 1
            if self.metrics_reads > 1:
                return 503, {"error": "down"}
        return super().answer(request)


def test_a_service_that_stops_answering_during_the_case_is_not_blamed_on_an_old_release(
        capsys: pytest.CaptureFixture[str], fake_bench: FakeBench, tmp_path: Path) -> None:
    with DiesDuringTheCase() as dying:
        code, result, _ = run_case(capsys, dying, fake_bench, tmp_path)
    assert result["ok"] is False and result["counted"]["counter_present"] is False
    assert "did not answer after the case" in result["problems"][0] and "is the service still up" in result["problems"][0]
    assert not any("predates" in problem for problem in result["problems"]), result["problems"]


# --- the plan and the report ---------------------------------------------------------


def test_the_plan_runs_base_then_one_adapter_then_the_mix_at_each_rate() -> None:
    plan = filters.vllm_benchmark_plan(["alpha", "beta"], ["mix", "base", "adapter"], "", [1, 4.0])
    assert [(run["case"], run["adapters"], run["rate"]) for run in plan["runs"]] == [
        ("base", [], 1.0), ("base", [], 4.0), ("adapter", ["alpha"], 1.0), ("adapter", ["alpha"], 4.0),
        ("mix", ["alpha", "beta"], 1.0), ("mix", ["alpha", "beta"], 4.0)]
    assert plan["skipped"] == []
    assert filters.vllm_benchmark_plan(["alpha", "beta"], ["adapter"], "beta", [2])["runs"][0]["adapters"] == ["beta"]


def test_the_plan_says_why_a_case_cannot_run() -> None:
    assert filters.vllm_benchmark_plan([], ["base", "adapter", "mix"], "", [1])["skipped"] == [
        {"case": "adapter", "reason": "the host serves no adapter"},
        {"case": "mix", "reason": "the host serves no adapter"}]
    one = filters.vllm_benchmark_plan(["alpha"], ["base", "adapter", "mix"], "", [1])
    assert [run["case"] for run in one["runs"]] == ["base", "adapter"] and one["skipped"][0]["case"] == "mix"
    with pytest.raises(filters.AnsibleFilterError, match="gamma"):
        filters.vllm_benchmark_plan(["alpha"], ["adapter"], "gamma", [1])
    with pytest.raises(filters.AnsibleFilterError, match="everything"):
        filters.vllm_benchmark_plan(["alpha"], ["everything"], "", [1])


def module_result(case: str, adapters: list[str], rate: float, saved: dict[str, Any], ok: bool = True,
                  problems: list[str] | None = None) -> dict[str, Any]:
    return {"item": {"case": case, "adapters": adapters, "rate": rate}, "ok": ok, "problems": problems or [],
            "saved": saved, "result_file": f"/var/lib/vllm-deploy/benchmark/{case}-r{rate:g}.json",
            "counted": {"expected": 8, "on_case_models": 8.0}, "elapsed": 3.2,
            "invocation": {"module_args": {"api_key": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"}}}


SAVED_BASE = {"date": "x", "num_prompts": 8, "completed": 8, "request_throughput": 2.0, "output_throughput": 100.0,
              "median_ttft_ms": 20.0, "p99_ttft_ms": 40.0, "median_itl_ms": 4.0, "p99_itl_ms": 8.0,
              "std_itl_ms": 1.5, "p90_e2el_ms": 77.0, "input_lens": [1, 2], "model_id": "/srv/m"}
SAVED_ADAPTER = {**SAVED_BASE, "output_throughput": 80.0, "median_ttft_ms": 25.0, "median_itl_ms": 5.0}


def test_the_report_copies_vllm_s_figures_and_divides_by_the_base_at_the_same_rate() -> None:
    host = {"release": "r1", "base_model": BASE, "adapters": ["alpha"], "settings": {"num_prompts": 8},
            "skipped": [], "runs": [module_result("base", [], 2.0, SAVED_BASE),
                                    module_result("adapter", ["alpha"], 2.0, SAVED_ADAPTER),
                                    module_result("adapter", ["alpha"], 8.0, SAVED_ADAPTER)]}
    report = filters.vllm_benchmark_report({"gpu1": host, "gpu2": {}}, "2026-12-05T12:00:00")
    assert report["ok"] is True and report["not_run"] == ["gpu2"] and list(report["hosts"]) == ["gpu1"]
    cases = report["hosts"]["gpu1"]["cases"]
    adapter = cases[1]
    assert adapter["figures"] == {key: value for key, value in SAVED_ADAPTER.items()
                                  if key not in ("date", "input_lens", "model_id")}
    assert adapter["ratio_to_base"]["output_throughput"] == 0.8
    assert adapter["ratio_to_base"]["median_ttft_ms"] == 1.25 and adapter["ratio_to_base"]["median_itl_ms"] == 1.25
    assert cases[0]["ratio_to_base"]["output_throughput"] == 1.0
    assert cases[2]["ratio_to_base"] == {}  # no base case at 8 req/s
    assert adapter["raw"] == "benchmark-latest/gpu1/adapter-r2.json"
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" not in json.dumps(report)
    table = filters.vllm_benchmark_markdown(report)
    assert "| adapter | alpha | 2 | 8/8 | 2.00 | 80.0 | 0.80 | 25.0 | 1.25 | 40.0 | 5.00 | 1.25 | 8.00 | 8/8 | yes |" in table


def test_a_failed_case_or_host_makes_the_report_fail_and_says_why() -> None:
    host = {"runs": [module_result("adapter", ["alpha"], 2.0, SAVED_ADAPTER, ok=False,
                                   problems=["8 requests were sent to adapter alpha, the host counted 0 there"])]}
    report = filters.vllm_benchmark_report({"gpu1": host, "gpu2": {"failed": "/health answered 503",
                                                                   "failed_task": "Refuse a service"}})
    assert report["ok"] is False and report["hosts"]["gpu2"]["ok"] is False
    table = filters.vllm_benchmark_markdown(report)
    assert "adapter at 2 req/s: 8 requests were sent to adapter alpha" in table
    assert "## gpu2: not benchmarked" in table and "/health answered 503" in table


def test_the_plot_script_says_why_it_drew_nothing(tmp_path: Path) -> None:
    """matplotlib is not a dependency of the controller: the report carries the reason instead."""
    import subprocess

    report = filters.vllm_benchmark_report({"gpu1": {"runs": [module_result("base", [], 2.0, SAVED_BASE)]}})
    out = subprocess.run([sys.executable, str(REPO / "roles/vllm/files/vllm_benchmark_plot.py"),
                          str(tmp_path / "plot.png")], input=json.dumps(report), capture_output=True, text=True,
                         timeout=120, check=True)
    status = json.loads(out.stdout)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert status["written"] is False and "matplotlib is not installed" in status["reason"]
        assert not (tmp_path / "plot.png").exists()
    else:
        assert status == {"written": True, "file": "plot.png"} and (tmp_path / "plot.png").stat().st_size > 0


def test_the_playbook_is_not_part_of_site_yml() -> None:
    for playbook in (REPO / "playbooks").glob("*.yml"):
        if playbook.name != "benchmark.yml":
            assert "benchmark" not in playbook.read_text(), playbook.name
    assert os.path.exists(REPO / "playbooks/benchmark.yml")

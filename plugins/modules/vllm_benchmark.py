#!/usr/bin/python
"""Ansible module: one case of vLLM's own serving benchmark, checked by the host's request counter."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vllm_benchmark
short_description: Run one `vllm bench serve` case against the local vLLM and check who served it
description:
  - Runs vLLM's own benchmark client (C(vllm bench serve), from the venv of the release the host serves)
    against the service with the random dataset and the model's own tokenizer, C(--ignore-eos) so every
    request generates O(output_len) tokens, and C(--save-result) into O(result_dir). The figures are read
    from the JSON vLLM saved, never recomputed.
  - The API key reaches the client as C(OPENAI_API_KEY) in its environment (what vLLM's benchmark reads),
    never on a command line; the module's own result never contains it.
  - Reads the host's C(vllm_deploy_model_requests_total) (the role's request counter on vLLM's /metrics)
    before and after, and returns the change per model. A case whose requests were not counted on the
    models it asked for (an adapter case answered by the base, say) is returned with C(ok=false) and the
    reason; so is a case where vLLM's benchmark failed, timed out or counted failed requests.
  - vLLM's ready check is off (C(--ready-check-timeout-sec 0)); it would send one more request to the base
    model, and the counter must see exactly the case's requests. Check /health before.
options:
  vllm_bin:
    description: The C(vllm) program of the venv the service runs from.
    type: path
    required: true
  url:
    description: The service's base URL, e.g. http://127.0.0.1:8000.
    type: str
    required: true
  model_path:
    description: The model folder on the host (the tokenizer, and C(--model)).
    type: path
    required: true
  served_name:
    description: The base model's served name (C(--served-model-name)).
    type: str
    required: true
  case:
    description: The case's name, for the result file and the report (base, adapter, mix).
    type: str
    required: true
  adapters:
    description: Adapters to spread the requests over (C(--lora-modules)); empty for the base model.
    type: list
    elements: str
    default: []
  request_rate:
    description: Requests per second (a Poisson process, vLLM's default).
    type: float
    required: true
  num_prompts:
    description: Requests in this case.
    type: int
    required: true
  input_len:
    description: Prompt tokens per request.
    type: int
    default: 256
  output_len:
    description: Generated tokens per request.
    type: int
    default: 128
  seed:
    description: vLLM's benchmark seed (the prompts and the adapter of each request follow from it).
    type: int
    default: 0
  percentiles:
    description: Percentiles vLLM reports for TTFT, TPOT, ITL and end-to-end latency.
    type: list
    elements: int
    default: [50, 90, 99]
  timeout:
    description: Seconds the benchmark may take; then its process group is killed and the case fails.
    type: int
    default: 600
  result_dir:
    description: Folder for vLLM's saved result (C(<case>-r<rate>.json)) and the client's caches.
    type: path
    required: true
  api_key:
    description: The service's API key, for the client's environment.
    type: str
    default: ""
author: vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Benchmark one adapter at 4 requests per second
  vllm_benchmark:
    vllm_bin: /opt/vllm/venvs/vllm-0123456789ab/bin/vllm
    url: http://127.0.0.1:8000
    model_path: /srv/vllm/models/Qwen2.5-7B-Instruct-AWQ
    served_name: Qwen2.5-7B-Instruct-AWQ
    case: adapter
    adapters: [sql]
    request_rate: 4
    num_prompts: 32
    result_dir: /var/lib/vllm-deploy/benchmark
    api_key: "{{ vllm_api_key }}"
"""

RETURN = r"""
ok:
  description: The benchmark ran, every request succeeded, and the counter counted them on the case's models.
  type: bool
  returned: always
problems:
  description: Why the case is not ok, one sentence each.
  type: list
  elements: str
  returned: always
saved:
  description: The JSON vLLM saved (C(--save-result)), as it saved it; empty when it saved none.
  type: dict
  returned: always
result_file:
  description: Where vLLM saved it on the host.
  type: str
  returned: always
counted:
  description: >-
    C(expected) requests, C(on_case_models) counted on the case's models, C(elsewhere) on other
    models (other clients, or the wrong model), C(per_model) {model: {code: change}}, C(exact) when
    the counts match the case alone, C(counter_present).
  type: dict
  returned: always
argv:
  description: The benchmark's command line (it carries no secret).
  type: list
  elements: str
  returned: always
elapsed:
  description: Seconds the benchmark took.
  type: float
  returned: always
log_tail:
  description: The last lines of the benchmark's output when the case is not ok, else empty.
  type: str
  returned: always
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
from typing import Any, Dict, List, Optional, Tuple

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

COUNTER = "vllm_deploy_model_requests_total"
_SAMPLE = re.compile(r"^" + COUNTER + r"\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.M)
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
Key = Tuple[str, str, str]  # (model, kind, code)


def parse_counter(text: str) -> Optional[Dict[Key, float]]:
    """{(model, kind, code): value} from a /metrics text; None when the counter is not there."""
    if "# TYPE " + COUNTER not in text and not _SAMPLE.search(text):
        return None
    found: Dict[Key, float] = {}
    for match in _SAMPLE.finditer(text):
        labels = dict(_LABEL.findall(match.group("labels")))
        key = (labels.get("model", ""), labels.get("kind", ""), labels.get("code", ""))
        found[key] = found.get(key, 0.0) + float(match.group("value"))
    return found


def read_counter(url: str, api_key: str, timeout: float = 10) -> Optional[Dict[Key, float]]:
    headers = {}
    if api_key:  # the role leaves /metrics open; a /metrics put behind the key still answers
        headers["Authorization"] = "Bearer " + api_key
    # use_netrc=False: a ~/.netrc entry must not replace the Authorization header.
    with open_url(url.rstrip("/") + "/metrics", headers=headers, method="GET", timeout=timeout,
                  use_netrc=False) as response:
        return parse_counter(response.read().decode("utf-8", "replace"))


def deltas(before: Dict[Key, float], after: Dict[Key, float]) -> Dict[Key, float]:
    """What changed, per series (a series new since before started at 0)."""
    keys = set(before) | set(after)
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in keys
            if after.get(key, 0.0) != before.get(key, 0.0)}


def judge(case_models: List[str], kind: str, expected: int, changed: Optional[Dict[Key, float]],
          completed: Optional[int], bench_problem: str = "",
          unread: str = "") -> Tuple[List[str], Dict[str, Any]]:
    """(problems, counted) for one case. `changed` None: the host has no counter, or (`unread`
    says why) its /metrics did not answer after the case."""
    problems: List[str] = []
    if bench_problem:
        problems.append(bench_problem)
    if completed is not None and completed < expected:
        problems.append(f"{expected - completed} of {expected} requests failed (vLLM's benchmark counted"
                        f" {completed} completed)")
    counted: Dict[str, Any] = {"expected": expected, "counter_present": changed is not None}
    if changed is None:
        problems.append(unread or f"the host's /metrics has no {COUNTER}: the release it serves predates the"
                        " role's request counter; deploy it with playbooks/site.yml, then benchmark again")
        counted.update({"on_case_models": None, "elsewhere": None, "per_model": {}, "exact": False})
        return problems, counted
    per_model: Dict[str, Dict[str, float]] = {}
    on_case = elsewhere = 0.0
    for (model, series_kind, code), value in sorted(changed.items()):
        per_model.setdefault(model, {})[code] = per_model.get(model, {}).get(code, 0.0) + value
        if model in case_models and series_kind == kind:
            on_case += value
        else:
            elsewhere += value
    if min(changed.values(), default=0.0) < 0:
        problems.append("the request counter went down during the case: the service restarted")
    counted.update({"on_case_models": on_case, "elsewhere": elsewhere, "per_model": per_model,
                    "exact": on_case == expected and elsewhere == 0})
    if on_case < expected:
        where = ", ".join(f"{model} {sum(codes.values()):g}" for model, codes in per_model.items()) or "nothing"
        if kind == "base":
            target = f"the base model {case_models[0]}"
        else:
            target = ("adapter " if len(case_models) == 1 else "adapters ") + ", ".join(case_models)
        problems.append(f"{expected} requests were sent to {target}, the host counted {on_case:g} there"
                        f" (counted: {where}): requests were not served by the model they asked for")
    return problems, counted


def bench_argv(params: Dict[str, Any], result_file: str) -> List[str]:
    argv = [params["vllm_bin"], "bench", "serve",
            "--backend", "openai", "--base-url", params["url"].rstrip("/"), "--endpoint", "/v1/completions",
            "--model", params["model_path"], "--served-model-name", params["served_name"],
            "--dataset-name", "random", "--random-input-len", str(params["input_len"]),
            "--random-output-len", str(params["output_len"]), "--ignore-eos",
            "--num-prompts", str(params["num_prompts"]), "--request-rate", repr(float(params["request_rate"])),
            "--seed", str(params["seed"]),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", ",".join(str(p) for p in params["percentiles"]),
            "--ready-check-timeout-sec", "0", "--disable-tqdm", "--label", params["case"],
            "--save-result", "--result-dir", os.path.dirname(result_file),
            "--result-filename", os.path.basename(result_file)]
    if params["adapters"]:
        argv += ["--lora-modules", *params["adapters"]]
    return argv


def bench_env(work: str, api_key: str) -> Dict[str, str]:
    """A clean environment: offline, caches in the work folder, the key where vLLM's client reads it."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8", "HOME": work,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": os.path.join(work, "hf"),
           "XDG_CACHE_HOME": os.path.join(work, "cache"), "XDG_CONFIG_HOME": os.path.join(work, "config"),
           "VLLM_CACHE_ROOT": os.path.join(work, "vllm"), "VLLM_CONFIG_ROOT": os.path.join(work, "vllm-config"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    return env


def run_bench(argv: List[str], env: Dict[str, str], cwd: str, log_path: str, timeout: int) -> Tuple[Optional[int], float]:
    """(exit code or None on timeout, seconds); output to log_path. The whole process group ends."""
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=cwd, start_new_session=True)
        try:
            code: Optional[int] = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue
    return code, round(time.monotonic() - started, 2)


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as handle:
            text = handle.read()[-20000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "vllm_bin": {"type": "path", "required": True},
            "url": {"type": "str", "required": True},
            "model_path": {"type": "path", "required": True},
            "served_name": {"type": "str", "required": True},
            "case": {"type": "str", "required": True},
            "adapters": {"type": "list", "elements": "str", "default": []},
            "request_rate": {"type": "float", "required": True},
            "num_prompts": {"type": "int", "required": True},
            "input_len": {"type": "int", "default": 256},
            "output_len": {"type": "int", "default": 128},
            "seed": {"type": "int", "default": 0},
            "percentiles": {"type": "list", "elements": "int", "default": [50, 90, 99]},
            "timeout": {"type": "int", "default": 600},
            "result_dir": {"type": "path", "required": True},
            "api_key": {"type": "str", "default": "", "no_log": True},
        },
        supports_check_mode=False,
    )
    params = module.params
    if not os.access(params["vllm_bin"], os.X_OK):
        module.fail_json(msg=f"{params['vllm_bin']} is not an executable: the release's venv is incomplete")
    if not params["case"].replace("-", "").replace("_", "").isalnum():
        module.fail_json(msg=f"case {params['case']!r}: letters, digits, - and _ only")
    rate = float(params["request_rate"])
    result_file = os.path.join(params["result_dir"], f"{params['case']}-r{rate:g}.json")
    work = os.path.join(params["result_dir"], f".work-{params['case']}-r{rate:g}")
    os.makedirs(work, mode=0o700, exist_ok=True)
    for stale in (result_file, os.path.join(work, "bench.log")):
        if os.path.exists(stale):
            os.remove(stale)
    kind = "adapter" if params["adapters"] else "base"
    case_models = list(params["adapters"]) or [params["served_name"]]

    try:
        before = read_counter(params["url"], params["api_key"])
    except (urllib.error.URLError, OSError) as error:
        module.fail_json(msg=f"{params['url']}/metrics did not answer before the case: {error}")
    argv = bench_argv(params, result_file)
    code, elapsed = run_bench(argv, bench_env(work, params["api_key"]), work, os.path.join(work, "bench.log"),
                              params["timeout"])
    unread = ""
    try:
        after = read_counter(params["url"], params["api_key"])
    except (urllib.error.URLError, OSError) as error:
        after = None
        unread = (f"{params['url']}/metrics did not answer after the case ({error}): the requests cannot be"
                  " counted; is the service still up? (systemctl status, journalctl -u of the unit)")

    saved: Dict[str, Any] = {}
    bench_problem = ""
    if code is None:
        bench_problem = f"vllm bench serve did not finish within {params['timeout']} s and was stopped"
    elif code != 0:
        bench_problem = f"vllm bench serve exited with {code}"
    try:
        with open(result_file, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as error:
        bench_problem = bench_problem or f"vLLM saved no readable result ({error})"
    changed = deltas(before, after) if before is not None and after is not None else None
    completed = saved.get("completed") if isinstance(saved.get("completed"), int) else None
    problems, counted = judge(case_models, kind, params["num_prompts"], changed,
                              completed if saved else None, bench_problem, unread)
    module.exit_json(changed=False, ok=not problems, problems=problems, saved=saved, result_file=result_file,
                     counted=counted, argv=argv, elapsed=elapsed,
                     log_tail=tail(os.path.join(work, "bench.log")) if problems else "")


if __name__ == "__main__":
    main()

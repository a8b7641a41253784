"""site.yml on a fresh systemd host: converge, prove the adapters, stay idempotent."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

from tests.e2e.conftest import Deployment
from tests.harness.hosts import TestHost
from tests.unit.loader import REPO, load

benchmark_module = load("plugins/modules/vllm_benchmark.py", "vllm_benchmark_for_e2e")


# The benchmark test puts this key on the service (vLLM's client must then really send it); the
# tests after it ask with it too. A service without a key ignores the header.
BENCH_KEY = "sk-bench-e2e-7d41c09a5be2"


def chat(host: TestHost, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    """POST /v1/chat/completions from inside the host (the service listens on 127.0.0.1)."""
    payload = shlex.quote(json.dumps(body))
    out = host.sh(
        f"curl -s -o /tmp/body -w '%{{http_code}}' -H 'Content-Type: application/json' "
        f"-H 'Authorization: Bearer {BENCH_KEY}' -d {payload} http://127.0.0.1:8000/v1/chat/completions; "
        "echo; cat /tmp/body"
    ).stdout
    status, _, text = out.partition("\n")
    return int(status), json.loads(text)


def answer(host: TestHost, **fields: object) -> str:
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
            "temperature": 0, "max_tokens": 12, **fields}
    status, data = chat(host, body)
    assert status == 200, data
    return str(data["choices"][0]["message"]["content"])  # type: ignore[index]


def service_start_marker(host: TestHost) -> tuple[str, str]:
    """(MainPID, ActiveEnterTimestampMonotonic): both change on every restart."""
    out = host.sh("systemctl show vllm -p MainPID -p ActiveEnterTimestampMonotonic --value").stdout.split()
    return out[0], out[1]


@pytest.fixture(scope="module")
def first_run(deployment: Deployment):  # type: ignore[no-untyped-def]
    return deployment.play()


def test_harness_hosts_boot_systemd_and_ansible_reaches_them(deployment: Deployment) -> None:
    for host in deployment.pool.hosts:
        assert host.system_state() == "running"
    result = deployment.play("--tags", "never", playbook="site.yml")
    assert result.rc == 0, result.tail()
    assert set(deployment.pool.names) <= set(result.recap)
    assert all(result.recap[name]["unreachable"] == 0 for name in deployment.pool.names)


def test_first_run_converges_and_proves_adapters(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    assert first_run.rc == 0, first_run.tail(120)
    assert first_run.changed() > 0
    report = deployment.report()[deployment.pool.names[0]]
    assert report["verified"] is True
    texts = {entry["adapter"]: entry["text"] for entry in report["adapters"]}  # type: ignore[union-attr]
    assert sorted(texts) == ["alpha", "beta"]
    assert len({report["base_text"], texts["alpha"], texts["beta"]}) == 3
    assert all(entry["lora_name_ok"] for entry in report["adapters"])  # type: ignore[union-attr]
    assert set(report["artifacts"]) == {"model/tiny-qwen2", "adapter/alpha", "adapter/beta"}  # type: ignore[arg-type]


def test_adapters_change_the_answer_seen_from_outside(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    """Independent of our verify module: plain HTTP from inside the host."""
    host = deployment.pool.hosts[0]
    base = answer(host, model="tiny-qwen2")
    alpha = answer(host, model="alpha")
    beta = answer(host, model="beta")
    assert alpha != base and beta != base and alpha != beta
    # The lora_name trap, closed by the shipped middleware: same text as model=<adapter>.
    assert answer(host, model="tiny-qwen2", lora_name="alpha") == alpha
    status, data = chat(host, {"model": "tiny-qwen2", "lora_name": "nope",
                               "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 404 and data["error"]["code"] == 404, data  # type: ignore[index]


def test_host_state_user_modes_unit_flags(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    host = testinfra.get_host(f"docker://{deployment.pool.names[0]}")
    user = host.user("vllm")
    assert user.exists and user.shell == "/usr/sbin/nologin" and user.uid < 1000
    for path, owner, group, mode in [
        ("/opt/vllm", "root", "root", 0o755),
        ("/srv/vllm", "root", "vllm", 0o750),
        ("/srv/vllm/models/tiny-qwen2", "root", "vllm", 0o750),
        ("/srv/vllm/adapters", "root", "vllm", 0o750),
        # Stored by content: the folder of alpha's files is named after them (name@digest).
        (host.check_output("ls -d /srv/vllm/adapters/alpha@*"), "root", "vllm", 0o750),
        ("/etc/vllm", "root", "vllm", 0o750),
    ]:
        entry = host.file(path)
        assert entry.is_directory and (entry.user, entry.group, entry.mode) == (owner, group, mode), path
    weights = host.file("/srv/vllm/models/tiny-qwen2/model.safetensors")
    assert (weights.user, weights.group, weights.mode) == ("root", "vllm", 0o640)
    env = host.file("/etc/vllm/vllm.env")
    assert (env.user, env.mode) == ("root", 0o600)
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    for flag in ["--enable-lora", "--max-loras 2", "--max-lora-rank 16", "--lora-dtype auto",
                 "--served-model-name tiny-qwen2", "--host 127.0.0.1", "--port 8000", "--max-model-len 512",
                 "--middleware vllm_lora_name_compat.LoraNameMiddleware"]:
        assert flag in exec_start, flag
    assert '\\"name\\":\\"alpha\\"' in exec_start and '\\"base_model_name\\":\\"tiny-qwen2\\"' in exec_start
    assert "--trust-remote-code" not in exec_start and "--api-key" not in exec_start
    assert "HF_HUB_OFFLINE=1" in unit
    service = host.service("vllm")
    assert service.is_enabled and service.is_running
    # The service's main process (vLLM's API server) runs as vllm; a missing process fails here.
    main_pid = int(host.check_output("systemctl show vllm -p MainPID --value") or 0)
    assert main_pid > 0 and host.process.get(pid=main_pid).user == "vllm"


OPERATOR_PROJECT = """\
---
- name: The collection's site playbook, by its FQCN
  ansible.builtin.import_playbook: inference.vllm_lora.site

- name: The collection's role, by its FQCN, in this project's own play
  hosts: vllm_servers
  gather_facts: false
  tasks:
    - name: Read the release the host serves
      ansible.builtin.include_role:
        name: inference.vllm_lora.vllm
        tasks_from: current
    - name: Say it
      ansible.builtin.debug:
        msg: "serves release {{ vllm_current_release_id }}"
"""


def install_collection(into: Path) -> Path:
    """The collection as Galaxy users get it: built into a tarball, installed under `into`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([str(REPO / "scripts" / "collection.sh"), "--keep", str(into)], env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    return into / "collections"


def test_second_run_changes_nothing_and_does_not_restart(deployment: Deployment, first_run,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    """The second run comes from an operator's own project in another directory: the collection
    built and installed there, its site playbook and its role called by FQCN. Nothing of this
    repository is on the path: its ansible.cfg is not read and collections/ is not searched."""
    host = deployment.pool.hosts[0]
    before = service_start_marker(host)
    collections = install_collection(tmp_path / "galaxy")
    project = tmp_path / "project"
    project.mkdir()
    (project / "site.yml").write_text(OPERATOR_PROJECT)
    env = {"ANSIBLE_COLLECTIONS_PATH": str(collections)}
    listed = subprocess.run([str(Path(sys.executable).parent / "ansible-galaxy"), "collection", "list",
                             "inference.vllm_lora", "--format", "json"], cwd=project, capture_output=True,
                            text=True, env={**{k: v for k, v in os.environ.items() if k != "ANSIBLE_CONFIG"}, **env},
                            check=True)
    assert list(json.loads(listed.stdout)) == [str(collections / "ansible_collections")], listed.stdout
    # The demo inventory names its lock file beside the playbooks (the repository's tests/): an
    # operator's project names its own, here the same file (the venv's id hashes its content).
    lock = REPO / "tests" / "vllm_cpu" / "requirements-lock.txt"
    result = deployment.play(playbook=str(project / "site.yml"), project=project, env=env,
                             vllm_pip_requirements_file=str(lock))
    assert result.rc == 0, result.tail()
    assert result.changed() == 0, result.tail(120)
    assert service_start_marker(host) == before
    release = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    assert f"serves release {release}" in result.output, result.tail(40)
    assert deployment.report()[host.name]["verified"] is True
    # The verify alone (as an operator or a monitor runs it) proves the adapters and changes nothing.
    verify = deployment.play("--tags", "verify")
    assert verify.rc == 0 and verify.changed() == 0, verify.tail(120)
    assert "Prove every adapter by real requests" in verify.output, verify.tail(60)
    assert deployment.report()[host.name]["verified"] is True
    assert service_start_marker(host) == before


def test_check_diff_on_converged_host_is_clean(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    result = deployment.play("--check", "--diff")
    assert result.rc == 0, result.tail()
    assert result.changed() == 0, result.tail(120)
    # A unit edited on the host (its mtime kept, so only its content tells) differs from its release's:
    # the plan restarts to put it back, and the dry run shows the edit going.
    host = deployment.pool.hosts[0]
    unit = "/etc/systemd/system/vllm-proxy.socket"
    host.sh(f"cp -p {unit} /root/unit.orig && echo '# edited by hand' >> {unit} && touch -r /root/unit.orig {unit}")
    try:
        edited = deployment.play("--check", "--diff")
    finally:
        host.sh(f"cp -p /root/unit.orig {unit} && rm /root/unit.orig")
    assert edited.rc == 0, edited.tail()
    release = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    assert f"restart: {unit} differs from release {release}'s (changed on the host)" in edited.output, edited.tail(80)
    assert "-# edited by hand" in edited.output, edited.tail(80)


def test_adding_then_removing_an_adapter(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    host = deployment.pool.hosts[0]
    before = service_start_marker(host)
    release_before = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    journal_mark = host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    added = deployment.play(adapters=("alpha", "beta", "gamma"))
    assert added.rc == 0, added.tail(120)
    assert "gamma" in [entry["adapter"] for entry in deployment.report()[host.name]["adapters"]]  # type: ignore[index]
    starts = host.sh(f"journalctl -u vllm --since '{journal_mark}' -o cat | grep -c '^Started vllm.service' || true").stdout
    assert int(starts.strip() or 0) == 1, "adding an adapter must restart the service exactly once"
    assert service_start_marker(host) != before
    assert '\\"name\\":\\"gamma\\"' in host.sh("cat /etc/systemd/system/vllm.service").stdout
    release_with_gamma = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    assert release_with_gamma != release_before

    removed = deployment.play(adapters=("alpha", "beta"))
    assert removed.rc == 0, removed.tail(120)
    assert "gamma" not in host.sh("grep ExecStart= /etc/systemd/system/vllm.service").stdout
    # gamma's files stay while a kept release (the one before) serves it: rollbacks need them.
    # Releases are named by their content: the declaration from before gamma is the release from before gamma.
    history = json.loads(host.sh("cat /opt/vllm/releases/history.json").stdout)["history"]
    assert history == [release_with_gamma, release_before], history
    assert host.sh("readlink /opt/vllm/current").stdout.strip() == f"releases/{release_before}"
    assert host.sh("test -d /srv/vllm/adapters/gamma@*", check=False).returncode == 0
    models = json.loads(host.sh("curl -s http://127.0.0.1:8000/v1/models").stdout)
    assert sorted(card["id"] for card in models["data"]) == ["alpha", "beta", "tiny-qwen2"]


IGNORED_WARNING = "The following fields were present in the request but ignored: {'lora_name'}"


def test_without_the_compat_middleware_lora_name_gets_the_base_as_vllm_alone(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    """vllm_lora_name_compat: false: the unit has no middleware, so `lora_name` is what vLLM 0.11 makes
    of it: ignored with a log warning, the BASE answers. Then back, keeping only 2 releases: the
    release before is pruned, and with it the files of an adapter no kept release serves."""
    host = deployment.pool.hosts[0]
    base, beta = answer(host, model="tiny-qwen2"), answer(host, model="beta")
    assert base != beta and answer(host, model="tiny-qwen2", lora_name="beta") == beta  # the middleware
    history = json.loads(host.sh("cat /opt/vllm/releases/history.json").stdout)["history"]
    off = deployment.play(vllm_lora_name_compat=False)
    assert off.rc == 0, off.tail(120)
    assert "LoraNameMiddleware" not in host.sh("grep ^ExecStart= /etc/systemd/system/vllm.service").stdout
    mark = host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    status, data = chat(host, {"model": "tiny-qwen2", "lora_name": "beta", "temperature": 0, "max_tokens": 12,
                               "messages": [{"role": "user", "content": "Tell me about the sea."}]})
    assert status == 200 and data["model"] == "tiny-qwen2", data
    assert data["choices"][0]["message"]["content"] == base  # type: ignore[index]
    deadline = time.monotonic() + 15
    while IGNORED_WARNING not in host.sh(f"journalctl -u vllm --since '{mark}' -o cat").stdout:
        assert time.monotonic() < deadline, "vLLM did not log that it ignored lora_name"
        time.sleep(0.5)

    # Before: gamma's files are on the host, kept for the release that served gamma (3 releases kept).
    assert host.sh("test -d /srv/vllm/adapters/gamma@*", check=False).returncode == 0
    before_back = json.loads(host.sh("cat /opt/vllm/releases/history.json").stdout)["history"]
    assert len(before_back) == 3 and before_back[-1] not in history, (history, before_back)
    back = deployment.play(vllm_keep_releases=2)
    assert back.rc == 0, back.tail(120)
    assert answer(host, model="tiny-qwen2", lora_name="beta") == beta
    kept = json.loads(host.sh("cat /opt/vllm/releases/history.json").stdout)["history"]
    assert len(kept) == 2 and kept[-1] == history[-1], (history, kept)
    on_disk = sorted(host.sh("ls /opt/vllm/releases").stdout.split())
    assert on_disk == sorted([*kept, "history.json"]), on_disk
    dropped = [rid for rid in history if rid not in kept]
    assert dropped and not any(rid in on_disk for rid in dropped)
    # gamma (added and removed above) was served only by a dropped release: its files go with it.
    assert host.sh("ls -d /srv/vllm/adapters/gamma*", check=False).stdout.strip() == ""


# Late in this module: it leaves the host on other releases.
def test_rolling_restart_and_maintenance_of_a_host_without_a_balancer(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    """The Beelink case: one host, no HAProxy. The roll prepares the release while the old
    process serves, restarts once, verifies; maintenance restarts what runs."""
    host = deployment.pool.hosts[0]
    release_before = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    journal_mark = host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    # The roll also puts an API key on the service (the Beelink has one): the benchmark test after
    # this one needs it, and a second restart for it alone would cost a minute.
    rolled = deployment.play(playbook="rolling_restart.yml", vllm_max_loras=3, vllm_api_key=BENCH_KEY)
    assert rolled.rc == 0, rolled.tail(150)
    release_after = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    assert release_after != release_before
    assert "--max-loras 3" in host.sh("grep ExecStart= /etc/systemd/system/vllm.service").stdout
    starts = host.sh(f"journalctl -u vllm --since '{journal_mark}' -o cat | grep -c '^Started vllm.service' || true")
    assert int(starts.stdout.strip() or 0) == 1, "the roll must restart the service exactly once"
    deployed = deployment.report("rolling_restart")[host.name]
    roll = deployed["roll"]
    assert roll["old_release"] == release_before and roll["new_release"] == release_after  # type: ignore[index]
    assert roll["restarted"] is True and roll["verified"] is True  # type: ignore[index]
    # Without a balancer the host is out of service from the restart to /health 200, both ends
    # timed on the host by the call that restarts and waits: that span includes the new process's
    # whole start (ready_seconds, from systemd's start of it), and is shorter than the whole play.
    assert float(roll["out_of_service_seconds"]) == round(float(deployed["restart_seconds"]), 1), deployed  # type: ignore[arg-type]
    assert float(roll["ready_seconds"]) - 0.1 <= float(deployed["restart_seconds"]) < float(roll["ready_seconds"]) + 30, deployed  # type: ignore[arg-type,index]

    # Nothing changed and no forced restart: the roll verifies, restarts nothing, changes nothing.
    marker = service_start_marker(host)
    quiet = deployment.play(playbook="rolling_restart.yml", vllm_rolling_force_restart=False, vllm_max_loras=3,
                            vllm_api_key=BENCH_KEY)
    assert quiet.rc == 0, quiet.tail(120)
    assert quiet.changed() == 0, quiet.tail(120)
    assert service_start_marker(host) == marker
    assert deployment.report("rolling_restart")[host.name]["roll"]["restarted"] is False  # type: ignore[index]

    lock = deployment.workdir / "maintenance.lock"
    maintained = deployment.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock),
                                 vllm_maintenance_force=True, vllm_api_key=BENCH_KEY)
    assert maintained.rc == 0, maintained.tail(120)
    assert service_start_marker(host) != marker
    report = json.loads((deployment.workdir / "reports" / "maintenance-latest.json").read_text())
    restart = report["hosts"][host.name]
    assert restart["old_release"] == restart["new_release"] == release_after and restart["verified"] is True
    assert not lock.exists()


def test_check_mode_roll_and_maintenance_restart_nothing_and_keep_the_reports(  # type: ignore[no-untyped-def]
        deployment: Deployment, first_run) -> None:
    """An operator's dry run of the roll or the maintenance: it shows the restart it would do, restarts
    nothing, takes no lock, and leaves the last real reports as they were (they once were replaced by
    reports of unverified hosts; before that, the dry run failed at recording a roll it never verified)."""
    host = deployment.pool.hosts[0]
    marker, current = service_start_marker(host), host.sh("readlink /opt/vllm/current").stdout
    reports = {path.name: path.read_bytes() for path in (deployment.workdir / "reports").glob("*-latest.json")}
    assert {"rolling_restart-latest.json", "maintenance-latest.json"} <= set(reports), sorted(reports)
    lock = deployment.workdir / "maintenance.lock"
    same = {"vllm_max_loras": 3, "vllm_api_key": BENCH_KEY}  # what the host runs: the plan is a forced restart

    rolled = deployment.play("--check", "--diff", playbook="rolling_restart.yml", **same)  # type: ignore[arg-type]
    assert rolled.rc == 0, rolled.tail(150)
    assert rolled.batches("Restart the service") == [{host.name}], rolled.tail(150)
    assert "Check mode: nothing was restarted or verified" in rolled.output, rolled.tail(40)
    maintained = deployment.play("--check", playbook="maintenance.yml", vllm_maintenance_lock=str(lock),
                                 vllm_maintenance_force=True, **same)  # type: ignore[arg-type]
    assert maintained.rc == 0, maintained.tail(150)
    assert maintained.batches("Restart the service") == [{host.name}], maintained.tail(150)
    assert "Check mode: nothing was restarted or verified, no report written." in maintained.output
    assert not lock.exists()
    assert (service_start_marker(host), host.sh("readlink /opt/vllm/current").stdout) == (marker, current)
    assert {path.name: path.read_bytes() for path in (deployment.workdir / "reports").glob("*-latest.json")} == reports

    # A lock a failed run left: the dry run says the real one would refuse.
    lock.mkdir()
    refused = deployment.play("--check", playbook="maintenance.yml", vllm_maintenance_lock=str(lock),
                              vllm_maintenance_force=True, **same)  # type: ignore[arg-type]
    assert refused.rc != 0 and "exists: another maintenance run is in progress" in refused.output, refused.tail(40)
    assert lock.is_dir() and service_start_marker(host) == marker
    lock.rmdir()


# Every process's command line on the host, every 50 ms, while the benchmark runs (ends itself).
CMDLINE_SAMPLER = """
import os, time
seen = set()
end = time.monotonic() + 900
while time.monotonic() < end:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    seen.add(handle.read().replace(b"\\0", b" ").strip())
            except OSError:
                pass
    with open("/run/bench-cmdlines.tmp", "wb") as out:
        out.write(b"\\n".join(sorted(seen)))
    os.replace("/run/bench-cmdlines.tmp", "/run/bench-cmdlines")
    time.sleep(0.05)
"""
BENCH_RATES = [8.0, 32.0]
BENCH_PROMPTS = 6


def served_counts(host: TestHost) -> dict[tuple[str, str, str], float]:
    """The request counter on the host's /metrics, read here, apart from the module."""
    counts = benchmark_module.parse_counter(host.sh("curl -s http://127.0.0.1:8000/metrics").stdout)
    assert counts is not None, "the service's /metrics has no vllm_deploy_model_requests_total"
    return counts


def test_benchmark_runs_vllm_s_own_benchmark_and_the_counter_proves_the_adapters(  # type: ignore[no-untyped-def]
        deployment: Deployment, first_run) -> None:
    """playbooks/benchmark.yml against this module's host, its service now behind an API key: base,
    one adapter, a mix, at two rates. The figures are vLLM's (its saved JSON), the per-model counter
    moved by exactly each case's requests, and the key is on no command line, in no output or report."""
    host = deployment.pool.hosts[0]
    # What the roll above left (nothing to do then); run alone, this puts the key on the service.
    keyed = deployment.play(vllm_api_key=BENCH_KEY, vllm_max_loras=3)
    assert keyed.rc == 0, keyed.tail(120)
    unauthorised = host.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/v1/models").stdout
    assert unauthorised == "401", "the service must require the key, or the test proves nothing about it"

    subprocess.run(["docker", "exec", "-i", host.name, "sh", "-c", "cat > /run/bench-sampler.py"],
                   input=CMDLINE_SAMPLER.encode(), check=True, timeout=30)
    host.sh("systemd-run --unit bench-cmdline-sampler /usr/bin/python3 /run/bench-sampler.py")
    before = served_counts(host)
    started = time.monotonic()
    result = deployment.play(playbook="benchmark.yml", vllm_api_key=BENCH_KEY,
                             vllm_benchmark_request_rates=BENCH_RATES, vllm_benchmark_num_prompts=BENCH_PROMPTS,
                             vllm_benchmark_input_len=32, vllm_benchmark_output_len=16, vllm_benchmark_timeout=180)
    took = time.monotonic() - started
    after = served_counts(host)
    time.sleep(0.3)
    host.sh("systemctl stop bench-cmdline-sampler", check=False)
    assert result.rc == 0, result.tail(150)

    reports = deployment.workdir / "reports"
    report = json.loads((reports / "benchmark-latest.json").read_text())
    assert report["ok"] is True and report["not_run"] == []
    mine = report["hosts"][host.name]
    assert mine["base_model"] == "tiny-qwen2" and mine["adapters"] == ["alpha", "beta"]
    cases = {(case["case"], case["rate"]): case for case in mine["cases"]}
    wanted = {"base": [], "adapter": ["alpha"], "mix": ["alpha", "beta"]}
    assert set(cases) == {(name, rate) for name in wanted for rate in BENCH_RATES}, sorted(cases)
    for (name, rate), case in cases.items():
        assert case["ok"] is True and case["adapters"] == wanted[name], case
        # The figures come from vLLM's own benchmark: the file it saved on the host, fetched as it is.
        raw_text = (reports / case["raw"]).read_text()
        assert raw_text == host.sh(f"cat /var/lib/vllm-deploy/benchmark/{name}-r{rate:g}.json").stdout
        raw = json.loads(raw_text)
        assert (raw["label"], raw["request_rate"], raw["num_prompts"]) == (name, rate, BENCH_PROMPTS)
        assert raw["completed"] == BENCH_PROMPTS and raw["total_output_tokens"] == BENCH_PROMPTS * 16
        assert case["figures"] and all(raw[key] == value for key, value in case["figures"].items())
        for key in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                    "median_itl_ms", "p99_itl_ms"):
            assert raw[key] > 0 and key in case["figures"], key
        base = json.loads((reports / cases[("base", rate)]["raw"]).read_text())
        assert case["ratio_to_base"]["output_throughput"] == round(raw["output_throughput"] / base["output_throughput"], 3)
        # Each case moved the counter by exactly its requests, on the models it asked for.
        counted = case["counted"]
        assert counted["exact"] is True and counted["on_case_models"] == BENCH_PROMPTS, counted
        models = set(counted["per_model"])
        assert models == {"tiny-qwen2"} if name == "base" else models <= set(wanted[name]), counted
        assert all(set(codes) == {"2xx"} for codes in counted["per_model"].values()), counted
    # Read apart from the module: the whole run's requests, per model, on the host's /metrics.
    moved = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
    mix_alpha = sum(cases[("mix", rate)]["counted"]["per_model"].get("alpha", {}).get("2xx", 0) for rate in BENCH_RATES)
    assert moved == {("tiny-qwen2", "base", "2xx"): 2 * BENCH_PROMPTS,
                     ("alpha", "adapter", "2xx"): 2 * BENCH_PROMPTS + mix_alpha,
                     ("beta", "adapter", "2xx"): 2 * BENCH_PROMPTS - mix_alpha}, moved
    assert 0 < mix_alpha < 2 * BENCH_PROMPTS, "the mix used both adapters"

    table = (reports / "benchmark-latest.md").read_text()
    assert table.count(f"| mix | alpha, beta |") == len(BENCH_RATES) and "| adapter | alpha |" in table
    assert report["plot"]["written"] or "matplotlib" in report["plot"]["reason"]

    # The key: on no command line seen on the host, in no output, report or result file.
    cmdlines = host.sh("cat /run/bench-cmdlines").stdout
    assert "bench serve" in cmdlines and "--lora-modules alpha beta" in cmdlines, "the sampler saw the benchmark"
    assert BENCH_KEY not in cmdlines
    assert BENCH_KEY not in result.output
    for path in reports.rglob("*"):
        if path.is_file():
            assert BENCH_KEY.encode() not in path.read_bytes(), path
    assert host.sh(f"grep -rl '{BENCH_KEY}' /var/lib/vllm-deploy/benchmark", check=False).stdout == ""
    print(f"benchmark.yml took {took:.0f} s; measured: " + "; ".join(
        f"{name}@{rate:g}: {case['figures']['output_throughput']:.1f} tok/s, TTFT p50"
        f" {case['figures']['median_ttft_ms']:.1f} ms, ITL p50 {case['figures']['median_itl_ms']:.2f} ms"
        for (name, rate), case in sorted(cases.items())))


def test_a_reboot_brings_the_api_port_back_and_crashes_spend_one_start(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    """Power loss, a kernel update, the driver role's reboot: the service and its API port socket must both
    come back, in order (a socket ordered after the service but before sockets.target made an ordering
    cycle that systemd broke at boot by dropping one of them)."""
    host = deployment.pool.hosts[0]
    verify = host.sh("systemd-analyze verify default.target 2>&1", check=False).stdout
    assert "cycle" not in verify, verify
    host.container.restart(timeout=60)
    assert host.system_state() in ("running", "degraded")
    for _ in range(90):
        if host.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:8000/health", check=False).stdout == "200":
            break
        time.sleep(2)
    boot = host.sh("journalctl -b -o cat --no-pager _PID=1").stdout
    assert "ordering cycle" not in boot, [line for line in boot.splitlines() if "cycle" in line]
    assert host.sh("systemctl is-active vllm vllm-proxy.socket").stdout.split() == ["active", "active"]
    assert answer(host, model="alpha") != answer(host, model="tiny-qwen2")

    # A fresh boot, a fresh start-limit budget (5 starts in 10 min): the boot's start, one crash of the API
    # server (its engine child still alive) and three restarts by hand fit in it. With the socket bound to the
    # service (BindsTo=), the crash spent two starts and the third restart was refused.
    host.sh("kill -KILL $(systemctl show vllm -p MainPID --value)")
    for _ in range(60):
        if host.sh("systemctl show vllm -p NRestarts --value").stdout.strip() == "1":
            break
        time.sleep(1)
    for attempt in range(3):
        restarted = host.sh("systemctl restart vllm", check=False)
        assert restarted.returncode == 0, f"restart {attempt + 1} after one crash: {restarted.stderr}"
    for _ in range(90):
        if host.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:8000/health", check=False).stdout == "200":
            break
        time.sleep(2)
    assert answer(host, model="alpha") != answer(host, model="tiny-qwen2")
    # Stopped: the port refuses connections (the socket stops with the service), and nothing starts it again.
    host.sh("systemctl stop vllm")
    assert host.sh("curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:8000/health", check=False).stdout == "000"
    assert host.sh("systemctl is-active vllm vllm-proxy.socket", check=False).stdout.split() == ["inactive", "inactive"]
    # The budget is spent (boot, crash, three restarts): a sixth start in 10 minutes is refused, as it must be.
    refused = host.sh("systemctl start vllm", check=False)
    assert refused.returncode != 0 and "too often" in refused.stderr, refused.stderr

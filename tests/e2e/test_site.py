"""site.yml on a fresh systemd host: converge, prove the adapters, stay idempotent."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import testinfra

from tests.e2e.conftest import Deployment
from tests.harness.hosts import TestHost


def chat(host: TestHost, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    """POST /v1/chat/completions from inside the host (the service listens on 127.0.0.1)."""
    payload = shlex.quote(json.dumps(body))
    out = host.sh(
        f"curl -s -o /tmp/body -w '%{{http_code}}' -H 'Content-Type: application/json' "
        f"-d {payload} http://127.0.0.1:8000/v1/chat/completions; echo; cat /tmp/body"
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
        ("/srv/vllm/adapters/alpha", "root", "vllm", 0o750),
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


def test_second_run_changes_nothing_and_does_not_restart(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    host = deployment.pool.hosts[0]
    before = service_start_marker(host)
    result = deployment.play()
    assert result.rc == 0, result.tail()
    assert result.changed() == 0, result.tail(120)
    assert service_start_marker(host) == before
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
    assert host.sh("test -d /srv/vllm/adapters/gamma", check=False).returncode == 0
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
    assert host.sh("test -d /srv/vllm/adapters/gamma", check=False).returncode == 0
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
    assert host.sh("test -e /srv/vllm/adapters/gamma", check=False).returncode != 0


# Last in this module: it leaves the host on other releases.
def test_rolling_restart_and_maintenance_of_a_host_without_a_balancer(deployment: Deployment, first_run) -> None:  # type: ignore[no-untyped-def]
    """The Beelink case: one host, no HAProxy. The roll prepares the release while the old
    process serves, restarts once, verifies; maintenance restarts what runs."""
    host = deployment.pool.hosts[0]
    release_before = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    journal_mark = host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    rolled = deployment.play(playbook="rolling_restart.yml", vllm_max_loras=3)
    assert rolled.rc == 0, rolled.tail(150)
    release_after = Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name
    assert release_after != release_before
    assert "--max-loras 3" in host.sh("grep ExecStart= /etc/systemd/system/vllm.service").stdout
    starts = host.sh(f"journalctl -u vllm --since '{journal_mark}' -o cat | grep -c '^Started vllm.service' || true")
    assert int(starts.stdout.strip() or 0) == 1, "the roll must restart the service exactly once"
    roll = deployment.report("rolling_restart")[host.name]["roll"]
    assert roll["old_release"] == release_before and roll["new_release"] == release_after  # type: ignore[index]
    assert roll["restarted"] is True and roll["verified"] is True  # type: ignore[index]
    # Without a balancer the host is out of service from the restart to /health 200:
    # a positive time, shorter than the whole play.
    assert 0 < float(roll["out_of_service_seconds"]) < float(roll["ready_seconds"]) + 30  # type: ignore[index]

    # Nothing changed and no forced restart: the roll verifies, restarts nothing, changes nothing.
    marker = service_start_marker(host)
    quiet = deployment.play(playbook="rolling_restart.yml", vllm_rolling_force_restart=False, vllm_max_loras=3)
    assert quiet.rc == 0, quiet.tail(120)
    assert quiet.changed() == 0, quiet.tail(120)
    assert service_start_marker(host) == marker
    assert deployment.report("rolling_restart")[host.name]["roll"]["restarted"] is False  # type: ignore[index]

    lock = deployment.workdir / "maintenance.lock"
    maintained = deployment.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock),
                                 vllm_maintenance_force=True)
    assert maintained.rc == 0, maintained.tail(120)
    assert service_start_marker(host) != marker
    report = json.loads((deployment.workdir / "reports" / "maintenance-latest.json").read_text())
    restart = report["hosts"][host.name]
    assert restart["old_release"] == restart["new_release"] == release_after and restart["verified"] is True
    assert not lock.exists()


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

"""Rolling restart, automatic rollback and rollback.yml on three real vLLM
hosts behind a real HAProxy, under a steady stream of adapter requests."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import LOCAL_GROUP_VARS, Deployment
from tests.fixtures import tinyqwen
from tests.harness.balancer import haproxy, url
from tests.harness.hosts import HostPool, TestHost, write_inventory

API_KEY = "rolling-test-key-5b8e"
class Load:
    """Chat requests through HAProxy, one after another, until stopped (bounded)."""

    def __init__(self, url: str, limit_seconds: float = 1500) -> None:
        self.url, self.limit = url, limit_seconds
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        body = {"model": "alpha", "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    response = client.post(f"{self.url}/v1/chat/completions", json=body)
                    self.outcomes[str(response.status_code)] += 1
                    if response.status_code != 200:
                        self.errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as error:
                    self.outcomes["error"] += 1
                    self.errors.append(repr(error))
                time.sleep(0.05)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


@pytest.fixture(scope="module")
def fleet(software_image: str, fixtures: tinyqwen.Fixtures,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, TestHost]]:
    with HostPool(image=software_image, count=3, prefix="vllm-roll") as pool, \
            haproxy(pool.hosts, prefix="vllm-lb") as lb:
        workdir = tmp_path_factory.mktemp("rolling")
        common = {"vllm_listen_host": "0.0.0.0", "vllm_api_key": API_KEY, "vllm_balancer_host": lb.name}
        host_vars = {h.name: dict(common) for h in pool.hosts}
        # Host 2 gets a flag vLLM refuses, but only when a test asks for it.
        host_vars[pool.hosts[1].name]["vllm_extra_args"] = "{{ rolling_test_bad_args | default([]) }}"
        inventory = write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS,
                                    host_vars=host_vars, extra_groups={"balancers": [lb.name]})
        deployment = Deployment(pool, workdir, fixtures, inventory=inventory)
        converged = deployment.play()
        assert converged.rc == 0, converged.tail(120)
        yield deployment, lb


def current_release(host: TestHost) -> str:
    return Path(host.sh("readlink /opt/vllm/current").stdout.strip()).name


def test_rolling_restart_serves_every_request(fleet: tuple[Deployment, TestHost]) -> None:
    deployment, lb = fleet
    before = {h.name: current_release(h) for h in deployment.pool.hosts}
    assert len(set(before.values())) == 1
    with Load(url(lb)) as load:
        time.sleep(3)
        # A changed engine setting makes a new release on every host.
        result = deployment.play(playbook="rolling_restart.yml", vllm_max_loras=3)
        time.sleep(3)
    assert result.rc == 0, result.tail(150)
    assert load.outcomes["200"] >= 20, load.outcomes
    assert set(load.outcomes) == {"200"}, (load.outcomes, load.errors[:5])
    after = {h.name: current_release(h) for h in deployment.pool.hosts}
    assert len(set(after.values())) == 1 and set(after.values()) != set(before.values())
    report = deployment.report("rolling_restart")
    for host in deployment.pool.names:
        assert report[host]["verified"] is True
        assert report[host]["release"] == after[host]
    print(f"\nrolling restart: {dict(load.outcomes)} requests through HAProxy, releases {before} -> {after}")


def test_a_release_that_cannot_start_is_rolled_back_and_stops_the_roll(fleet: tuple[Deployment, TestHost]) -> None:
    deployment, lb = fleet
    h1, h2, h3 = deployment.pool.hosts
    before = {h.name: current_release(h) for h in deployment.pool.hosts}
    unit3 = h3.sh("cat /etc/systemd/system/vllm.service").stdout
    with Load(url(lb)) as load:
        result = deployment.play("-e", '{"rolling_test_bad_args": ["--kv-cache-dtype", "no-such-dtype"]}',
                                 playbook="rolling_restart.yml", vllm_max_loras=4)
    assert result.rc != 0
    assert f"{h2.name}: the new release failed" in result.output, result.tail(80)
    assert f"rolled back to release {before[h2.name]}" in result.output
    # host 1 runs the new release, host 2 is back on its previous one, host 3 untouched.
    assert current_release(h1) != before[h1.name]
    assert current_release(h2) == before[h2.name]
    assert current_release(h3) == before[h3.name]
    assert h3.sh("cat /etc/systemd/system/vllm.service").stdout == unit3
    assert h3.sh("systemctl show vllm -p NRestarts --value").stdout.strip() == "0"
    assert "--kv-cache-dtype" not in h2.sh("grep ExecStart= /etc/systemd/system/vllm.service").stdout
    for host in (h1, h2, h3):
        assert host.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/health").stdout == "200"
    assert set(load.outcomes) == {"200"}, (load.outcomes, load.errors[:5])
    # A failed roll still leaves its report: host 2's failure, host 3 not reached.
    report = deployment.report("rolling_restart")
    failed = report[h2.name]["roll"]
    assert failed["rolled_back"] is True and failed["old_release"] == before[h2.name], failed
    assert failed["failed_task"] and failed["failed"] and failed["new_release"] != before[h2.name], failed
    assert report[h2.name]["release"] == before[h2.name] and report[h2.name]["verified"] is True
    assert report[h1.name]["release"] == current_release(h1) and report[h1.name]["verified"] is True
    assert report[h3.name] == {"verified": False, "reached": False}


def test_rollback_playbook_returns_every_host_to_its_previous_release(fleet: tuple[Deployment, TestHost]) -> None:
    deployment, _lb = fleet
    before = {h.name: current_release(h) for h in deployment.pool.hosts}
    result = deployment.play(playbook="rollback.yml")
    assert result.rc == 0, result.tail(120)
    report = deployment.report("rollback")
    for host in deployment.pool.hosts:
        now = current_release(host)
        assert now != before[host.name]
        assert report[host.name]["release"] == now and report[host.name]["verified"] is True


def test_maintenance_refuses_outside_its_window_and_while_locked(fleet: tuple[Deployment, TestHost]) -> None:
    deployment, _lb = fleet
    marker = {h.name: h.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout
              for h in deployment.pool.hosts}
    now = time.localtime()
    closed = {"start": f"{(now.tm_hour + 2) % 24:02d}:00", "end": f"{(now.tm_hour + 3) % 24:02d}:00"}
    outside = deployment.play(playbook="maintenance.yml", vllm_maintenance_window=closed)
    assert outside.rc != 0 and "outside vllm_maintenance_window" in outside.output
    lock = deployment.workdir / "maintenance.lock"
    lock.mkdir()
    locked = deployment.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock))
    assert locked.rc != 0 and "another maintenance run is in progress" in locked.output
    lock.rmdir()
    assert marker == {h.name: h.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout
                      for h in deployment.pool.hosts}, "a refused maintenance run must not touch a host"


def test_maintenance_restarts_every_host_and_reports(fleet: tuple[Deployment, TestHost]) -> None:
    deployment, lb = fleet
    starts = {h.name: h.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout
              for h in deployment.pool.hosts}
    releases = {h.name: current_release(h) for h in deployment.pool.hosts}
    lock = deployment.workdir / "maint.lock"
    with Load(url(lb)) as load:
        result = deployment.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock),
                                 vllm_maintenance_window={"start": "00:00", "end": "00:00"},
                                 vllm_maintenance_force=True)
    assert result.rc == 0, result.tail(120)
    assert not lock.exists()
    assert set(load.outcomes) == {"200"}, (load.outcomes, load.errors[:5])
    report = json.loads((deployment.workdir / "reports" / "maintenance-latest.json").read_text())
    for host in deployment.pool.hosts:
        roll = report["hosts"][host.name]
        # Maintenance restarts what runs (here: what rollback.yml left), it deploys nothing.
        assert roll["verified"] is True and roll["old_release"] == roll["new_release"] == releases[host.name]
        assert float(roll["out_of_service_seconds"]) > 0
        assert host.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout != starts[host.name]
        assert current_release(host) == releases[host.name]

"""The Beelink as declared: the shipped inventory/beelink declaration, deployed
to a real systemd host with the model folder already under /home/beelink and
adopted in place (source: host), plus what happens when a release cannot
start, through site.yml, adapters.yml and maintenance.yml.

The declaration is DERIVED from inventory/beelink/group_vars/vllm_servers.yml
in code: only the device, the model's size and identity (the tiny model's
base name joins the aliases, max-model-len 512) and the install source (the
offline wheelhouse of inventory/local) are swapped, and one adapter from the
controller is added (the shipped file declares none). A change to the shipped
file is tested here.

One host for the whole module, in order; each test leaves it serving.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import LOG_DIR
from tests.fixtures import tinyqwen
from tests.unit.test_unit_hardening import directive_problems, documented_bound
from tests.harness import image
from tests.harness.ansible import REPO, PlayResult, run_playbook
from tests.harness.hosts import HostPool, TestHost, write_inventory
from tests.harness.software import LOCAL_GROUP_VARS

SHIPPED = REPO / "inventory" / "beelink" / "group_vars" / "vllm_servers.yml"
# What makes a host install and run the CPU build from the offline wheelhouse.
CPU_INSTALL = ("vllm_pip_requirements_file", "vllm_pip_no_index", "vllm_pip_find_links",
               "vllm_system_packages_extra", "vllm_environment", "vllm_health_timeout")
PROMPT = "Tell me about the sea."


def derived_declaration(fx: tinyqwen.Fixtures) -> dict[str, Any]:
    shipped: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    local: dict[str, Any] = yaml.safe_load((LOCAL_GROUP_VARS / "vllm_servers.yml").read_text())
    derived = dict(shipped)
    derived["vllm_device"] = "cpu"
    derived["vllm_max_model_len"] = local["vllm_max_model_len"]
    derived["vllm_model"] = {**shipped["vllm_model"],
                             "aliases": [*shipped["vllm_model"].get("aliases", []), fx.base_model_name]}
    derived.pop("vllm_pip_packages", None)
    derived.update({key: local[key] for key in CPU_INSTALL})
    assert not shipped["vllm_lora_adapters"], "the shipped file now declares adapters: derive them here"
    derived["vllm_lora_adapters"] = [adapter(fx, "alpha")]
    return derived


def adapter(fx: tinyqwen.Fixtures, name: str) -> dict[str, str]:
    return {"name": name, "source": "controller", "path": str(fx.adapters[name])}


class Beelink:
    def __init__(self, host: TestHost, workdir: Path, fx: tinyqwen.Fixtures) -> None:
        self.host, self.workdir, self.fixtures = host, workdir, fx
        self.declaration = derived_declaration(fx)
        self.model_path: str = self.declaration["vllm_model"]["path"]
        self.inventory = write_inventory(workdir / "inventory", [host.name])
        (workdir / "inventory" / "group_vars").mkdir(exist_ok=True)
        (workdir / "inventory" / "group_vars" / "vllm_servers.yml").write_text(yaml.safe_dump(self.declaration))
        self.runs = 0
        # The API key the service was last deployed with ("" = none).
        self.key = ""

    def play(self, *args: str, playbook: str = "site.yml", **overrides: Any) -> PlayResult:
        self.runs += 1
        overrides.setdefault("vllm_report_dir", str(self.workdir / "reports"))
        vars_file = self.workdir / f"vars-{self.runs}.json"
        vars_file.write_text(json.dumps(overrides))
        return run_playbook(playbook, self.inventory, extra_args=args, extra_vars_files=[vars_file],
                            log=LOG_DIR / "beelink.log")

    def report(self, name: str) -> dict[str, Any]:
        return json.loads((self.workdir / "reports" / f"{name}-latest.json").read_text())[self.host.name]

    def curl(self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             key: str | None = None, user: str = "root") -> tuple[int, str]:
        """(status, body) of a request from inside the host, as `user`; headers (the key) travel on
        stdin, never on a command line."""
        key = self.key if key is None else key
        lines = f"Authorization: Bearer {key}\n" if key else "X-No-Key: 1\n"
        lines += "".join(f"{name}: {value}\n" for name, value in (headers or {}).items())
        command = "curl -s -m 120 -w '\\n%{http_code}' -H @- -H 'Content-Type: application/json'"
        if body is not None:
            command += f" --data-binary {shlex.quote(json.dumps(body))}"
        command += " http://127.0.0.1:8000" + path
        out = subprocess.run(["docker", "exec", "-i", "-u", user, self.host.name, "sh", "-c", command], input=lines,
                             capture_output=True, text=True, timeout=180, check=True).stdout
        text, _, status = out.rpartition("\n")
        return int(status or 0), text

    def answer(self, model: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
        status, out = self.curl("/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": max_tokens,
                                                          "messages": [{"role": "user", "content": prompt}]})
        assert status == 200, out
        return str(json.loads(out)["choices"][0]["message"]["content"])

    def models(self) -> list[str]:
        status, out = self.curl("/v1/models")
        assert status == 200, out
        return sorted(card["id"] for card in json.loads(out)["data"])

    def state(self) -> tuple[str, str, str]:
        """(service start, unit, current release): unchanged by a refused or rolled-back run."""
        start = self.host.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout.strip()
        unit = self.host.sh("grep -v '^#' /etc/systemd/system/vllm.service").stdout
        return start, unit, self.current()

    def current(self) -> str:
        return Path(self.host.sh("readlink /opt/vllm/current").stdout.strip()).name


@pytest.fixture(scope="module")
def beelink(software_image: str, fixtures: tinyqwen.Fixtures,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beelink]:
    with HostPool(image=software_image, count=1, prefix="vllm-beelink") as pool:
        bee = Beelink(pool.hosts[0], tmp_path_factory.mktemp("beelink"), fixtures)
        host = bee.host
        # The operator's own account and the model folder they downloaded,
        # private to them as a umask of 027 leaves it.
        host.sh("useradd -m -s /bin/bash beelink && chmod 0750 /home/beelink && mkdir -p /home/beelink/models")
        subprocess.run(["docker", "cp", f"{fixtures.model}/.", f"{host.name}:{bee.model_path}"], check=True,
                       capture_output=True, timeout=120)
        host.sh(f"chown -R beelink:beelink /home/beelink && chmod -R u=rwX,g=rX,o= {shlex.quote(bee.model_path)}")
        yield bee


def test_check_diff_on_a_new_host_runs_clean(software_image: str, fixtures: tinyqwen.Fixtures,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """The runbook's first step, `site.yml --check --diff` on a host nothing was deployed to yet
    (the base image: no vllm user, no venv), must run to the end and change nothing."""
    with HostPool(image=image.build_base(), count=1, prefix="vllm-newhost") as pool:
        bee = Beelink(pool.hosts[0], tmp_path_factory.mktemp("newhost"), fixtures)
        host = bee.host
        host.sh("useradd -m beelink && chmod 0750 /home/beelink && mkdir -p /home/beelink/models")
        subprocess.run(["docker", "cp", f"{fixtures.model}/.", f"{host.name}:{bee.model_path}"], check=True,
                       capture_output=True, timeout=120)
        result = bee.play("--check", "--diff")
        assert result.rc == 0, result.tail(80)
        assert result.recap[host.name]["failed"] == 0, result.tail(80)
        # It reports what it would change: the user, the unit (its diff shows the command line), a start.
        assert result.recap[host.name]["changed"] > 5, result.tail(80)
        assert "TASK [inference.vllm_lora.vllm : Write the systemd unit (checked with systemd-analyze verify)]" in result.output
        assert "+ExecStart=/opt/vllm/venvs/" in result.output, result.tail(80)
        assert host.sh("id vllm", check=False).returncode != 0, "check mode created the user"
        assert host.sh("test -e /etc/systemd/system/vllm.service || test -e /opt/vllm", check=False).returncode != 0


@pytest.fixture(scope="module")
def converged(beelink: Beelink) -> Beelink:
    """The first deploys as a new user meets them: refused until the service may read the
    model, a first install that cannot start is left stopped, then it serves."""
    host = beelink.host
    refused = beelink.play()
    assert refused.rc != 0
    failure = refused.output[refused.output.find("fatal:"):]
    assert f"{beelink.model_path}/config.json" in failure or beelink.model_path in failure, failure[:3000]
    assert "file permissions deny it" in failure and "setfacl -R -m u:vllm:rX" in failure, failure[:3000]
    assert host.sh("test -e /etc/systemd/system/vllm.service", check=False).returncode != 0, \
        "the unit was written although the service cannot read its model"

    # The fix the message names, the way a sysadmin grants it: vllm joins the owner's group.
    host.sh("usermod -aG beelink vllm")

    first = beelink.play(vllm_extra_args=["--no-such-flag"])
    assert first.rc != 0
    assert "Nothing served before: the service is stopped and disabled" in first.output, first.tail(60)
    assert "unrecognized arguments" in first.output, first.tail(60)
    state = dict(line.split("=", 1) for line in host.sh(
        "systemctl show vllm -p ActiveState -p UnitFileState").stdout.split())
    assert state == {"ActiveState": "inactive", "UnitFileState": "disabled"}, state
    assert host.sh("journalctl -u vllm -o cat | grep -c 'unrecognized arguments'").stdout.strip() != "0"
    # A release that never served is no rollback target for later runs.
    assert host.sh("test -e /opt/vllm/current", check=False).returncode != 0

    deployed = beelink.play()
    assert deployed.rc == 0, deployed.tail(150)
    return beelink


def test_the_adopted_model_under_home_serves_by_its_path_and_through_an_adapter(converged: Beelink) -> None:
    bee = converged
    assert bee.models() == sorted([bee.model_path, "qwen2.5-7b-instruct-awq", "alpha"])
    by_path = bee.answer(bee.model_path)
    assert by_path == bee.answer("qwen2.5-7b-instruct-awq")
    assert bee.answer("alpha") != by_path
    report = bee.report("site")
    assert report["verified"] is True and report["model_path"] == bee.model_path
    unit = bee.host.sh("cat /etc/systemd/system/vllm.service").stdout
    assert "ProtectHome=tmpfs" in unit and f"BindReadOnlyPaths={bee.model_path}\n" in unit, unit
    assert "TemporaryFileSystem=/home/beelink:mode=0755 /home/beelink/models:mode=0755\n" in unit, unit
    shown = bee.host.sh("systemctl show vllm -p ProtectHome -p BindReadOnlyPaths -p ProtectSystem").stdout.split("\n")
    assert "ProtectHome=tmpfs" in shown and "ProtectSystem=strict" in shown, shown
    assert f"BindReadOnlyPaths={bee.model_path}:{bee.model_path}:rbind" in shown, shown
    table = bee.host.sh("systemd-analyze security vllm.service --no-pager", check=False).stdout
    exposure = float(re.search(r"Overall exposure level for vllm\.service:\s*([0-9.]+)", table).group(1))  # type: ignore[union-attr]
    assert exposure <= documented_bound("beelink-cpu-running"), table
    # Every directive docs/security.md lists, in the unit systemd runs (no drop-in).
    assert bee.host.sh("systemctl show vllm -p DropInPaths --value").stdout.strip() == ""
    assert directive_problems(unit, "cpu") == [], unit


def test_a_second_run_changes_nothing(converged: Beelink) -> None:
    before = converged.state()
    again = converged.play()
    assert again.rc == 0, again.tail(80)
    assert again.changed() == 0, again.tail(120)
    assert converged.state() == before


def test_a_file_the_sandbox_would_hide_is_refused_before_the_unit_changes(converged: Beelink) -> None:
    bee, host = converged, converged.host
    before, text = bee.state(), bee.answer("alpha")
    # A symlink out of the adopted folder (a hub cache's snapshot links into its blobs).
    host.sh("mkdir -p /home/beelink/blobs && echo '{}' > /home/beelink/blobs/extra.json "
            f"&& chown -R beelink:beelink /home/beelink/blobs && chmod 0640 /home/beelink/blobs/extra.json "
            f"&& ln -s /home/beelink/blobs/extra.json {bee.model_path}/extra.json")
    try:
        refused = bee.play()
        assert refused.rc != 0
        failure = refused.output[refused.output.find("fatal:"):]
        assert f"{bee.model_path}/extra.json" in failure and "the unit's sandbox hides it" in failure, failure[:3000]
        assert "Fix:" in failure
        assert bee.state() == before and bee.answer("alpha") == text
    finally:
        host.sh(f"rm -f {bee.model_path}/extra.json")


@pytest.mark.parametrize("case", ["broken-flag", "pickle-adapter"])
def test_a_release_that_cannot_start_returns_to_the_release_that_served(converged: Beelink, case: str) -> None:
    bee = converged
    before, text = bee.state(), bee.answer("alpha")
    mark = bee.host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    if case == "broken-flag":
        result = bee.play(vllm_extra_args=["--no-such-flag"])
        cause = "unrecognized arguments: --no-such-flag"
    else:
        pickled = {"name": "pickled", "source": "controller", "allow_pickle": True,
                   "path": str(bee.fixtures.broken["pickle_only"].path)}
        result = bee.play(vllm_lora_adapters=[adapter(bee.fixtures, "alpha"), pickled])
        cause = "Weights only load failed"
    assert result.rc != 0
    assert f"{bee.host.name}: the new release failed at " in result.output and "stopped while loading" in result.output, result.tail(80)
    assert bee.host.sh(f"journalctl -u vllm --since '{mark}' -o cat | grep -c {shlex.quote(cause)} || true"
                       ).stdout.strip() != "0", f"{cause!r} not in the journal"
    assert f"rolled back to release {before[2]} and verified" in result.output, result.tail(80)
    _start, unit, current = bee.state()
    assert (unit, current) == before[1:], "the host is not back on the release that served"
    assert bee.answer("alpha") == text and bee.answer(bee.model_path) != text
    failed = bee.report("site")["failed_release"]
    assert failed["rolled_back"] is True and failed["old_release"] == before[2] and failed["new_release"] != before[2]


def test_adapters_playbook_swaps_adapters_with_a_verified_restart(converged: Beelink) -> None:
    bee = converged
    start = bee.state()[0]
    swapped = bee.play(playbook="adapters.yml", vllm_lora_adapters=[adapter(bee.fixtures, "beta")])
    assert swapped.rc == 0, swapped.tail(120)
    assert bee.state()[0] != start, "without runtime updating the new adapter set needs a restart"
    assert bee.models() == sorted([bee.model_path, "qwen2.5-7b-instruct-awq", "beta"])
    report = bee.report("adapters")
    assert report["verified"] is True and [entry["adapter"] for entry in report["adapters"]] == ["beta"]
    assert report["roll"]["restarted"] is True


def test_adapters_playbook_refuses_anything_but_the_adapter_set(converged: Beelink) -> None:
    bee = converged
    before = bee.state()
    beta = [adapter(bee.fixtures, "beta")]
    wider = bee.play(playbook="adapters.yml", vllm_lora_adapters=beta, vllm_max_loras=3)
    assert wider.rc != 0 and "applies only the adapter set" in wider.output, wider.tail(40)
    assert "--max-loras 4 -> 3" in wider.output, wider.tail(40)
    broken = {"name": "toohigh", "source": "controller", "path": str(bee.fixtures.broken["rank_too_high"].path)}
    bad = bee.play(playbook="adapters.yml", vllm_lora_adapters=[*beta, broken])
    assert bad.rc != 0 and "adapter 'toohigh'" in bad.output and "Fix:" in bad.output, bad.tail(40)
    assert bee.state() == before


def test_a_roll_that_cannot_drain_returns_to_the_old_release_without_a_restart(converged: Beelink) -> None:
    """The release is prepared while the old process serves; when the drain then fails (requests keep
    running past the bound), the old process must keep serving: its unit and release come back, no restart."""
    bee, host = converged, converged.host
    before, served = bee.state(), bee.models()
    # The base model by its alias: served whatever adapter set an earlier test left.
    body = json.dumps({"model": "qwen2.5-7b-instruct-awq", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200,
                       "temperature": 0, "ignore_eos": True})
    # Unbounded: a bounded loop ran out before the play reached its drain on a faster machine (CI went green
    # with no request in flight). The marker names the loop for pkill.
    loop = (f"while :; do curl -s -o /dev/null -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)} http://127.0.0.1:8000/v1/chat/completions; done # drain-load")
    for _ in range(2):  # two clients: there is always a request in flight
        subprocess.run(["docker", "exec", "-d", host.name, "sh", "-c", loop], check=True, timeout=30)
    try:
        assert running_requests_seen(bee), "the load never reached vLLM: the test would prove nothing"
        result = bee.play(playbook="adapters.yml", vllm_balancer_drain_timeout=1,
                          vllm_lora_adapters=[adapter(bee.fixtures, "beta"), adapter(bee.fixtures, "alpha")])
    finally:
        # '[d]rain': the pattern must not match this very shell's command line.
        host.sh("pkill -f '[d]rain-load'; pkill -x curl; true")
        assert "drain-load" not in host.sh("ps -eo args").stdout, "the load loop outlived the test"
    assert result.rc != 0
    assert "Wait until vLLM reports no request running or waiting" in result.output, result.tail(60)
    assert "without a restart (its process kept serving) and verified" in result.output, result.tail(60)
    assert bee.state() == before, "the old process was restarted, or its unit/release did not come back"
    assert bee.models() == served
    failed = bee.report("adapters")["roll"]
    assert failed["rolled_back"] is True and failed["restart"] is False, failed
    # The process runs exactly what unit and current describe again: the next run must not restart it.
    declared = [name for name in served if name not in (bee.model_path, "qwen2.5-7b-instruct-awq")]
    again = bee.play(vllm_lora_adapters=[adapter(bee.fixtures, name) for name in declared])
    assert again.rc == 0, again.tail(80)
    assert bee.state()[0] == before[0], "the next run restarted a process that was current"


def running_requests_seen(bee: Beelink, within: float = 60) -> bool:
    """vLLM's own gauge shows a request running (the load is real, not refused or answered at once)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, text = bee.curl("/metrics")
        running = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.M)
        if status == 200 and running and float(running.group(1)) >= 1:
            return True
        time.sleep(0.5)
    return False


# Runtime updating needs the API key on every listener (every client is loopback behind the proxy).
LIVE_KEY = "sk-beelink-live-0123456789abcdef"


def test_adapters_playbook_applies_live_without_a_restart(converged: Beelink) -> None:
    bee = converged
    keyless = bee.play(vllm_allow_runtime_lora_updating=True)
    assert keyless.rc != 0 and "vllm_allow_runtime_lora_updating" in keyless.output, keyless.tail(40)
    assert "vllm_api_key" in keyless.output[keyless.output.find("Check the access rules"):], keyless.tail(40)
    live = {"vllm_allow_runtime_lora_updating": True, "vllm_api_key": LIVE_KEY}
    bee.key = LIVE_KEY
    beta = [adapter(bee.fixtures, "beta")]
    switched = bee.play(vllm_lora_adapters=beta, **live)  # a changed environment: site.yml restarts
    assert switched.rc == 0, switched.tail(80)
    start = bee.state()[0]
    applied = bee.play(playbook="adapters.yml", vllm_lora_adapters=[adapter(bee.fixtures, "gamma")], **live)
    assert applied.rc == 0, applied.tail(120)
    assert bee.state()[0] == start, "with runtime updating adapters.yml must not restart the service"
    assert bee.models() == sorted([bee.model_path, "qwen2.5-7b-instruct-awq", "gamma"])
    # The tiny gamma adapter happens to agree with the base on the sea prompt: ask what the verify asks.
    hello = {"prompt": "Say hello in five words.", "max_tokens": 16}
    assert bee.answer("gamma", **hello) != bee.answer(bee.model_path, **hello)  # type: ignore[arg-type]
    assert bee.report("adapters")["roll"]["restarted"] is False

    # A live load that vLLM refuses (a pickle it cannot read, let through with allow_pickle) leaves the
    # process changed: going back needs a restart, and then serves exactly the old adapter set.
    pickled = {"name": "pickled", "source": "controller", "allow_pickle": True,
               "path": str(bee.fixtures.broken["pickle_only"].path)}
    release = bee.current()
    refused = bee.play(playbook="adapters.yml", vllm_lora_adapters=[adapter(bee.fixtures, "gamma"), pickled], **live)
    assert refused.rc != 0
    assert f"rolled back to release {release} and verified." in refused.output, refused.tail(80)
    assert bee.current() == release and bee.state()[0] != start
    assert bee.models() == sorted([bee.model_path, "qwen2.5-7b-instruct-awq", "gamma"])


def test_a_local_process_or_a_web_page_cannot_swap_an_adapter(converged: Beelink) -> None:
    """Runtime updating is on (the test above). vLLM alone lets any caller unload 'gamma' and load other
    weights under its name from any folder it can read; behind the local proxy every caller is loopback.
    Only the deployer (its key, in a root-only file) may, and only from the role's adapter folders."""
    bee, host = converged, converged.host
    assert bee.key == LIVE_KEY and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in host.sh("cat /etc/systemd/system/vllm.service").stdout
    hello = {"prompt": "Say hello in five words.", "max_tokens": 16}
    before = (bee.answer("gamma", **hello), bee.models(), bee.state())  # type: ignore[arg-type]
    # Substitute weights any local user can plant where the service can read them.
    host.sh("install -d -m 0755 -o nobody /run/lock/evil")
    subprocess.run(["docker", "cp", f"{bee.fixtures.adapters['beta']}/.", f"{host.name}:/run/lock/evil"], check=True,
                   capture_output=True, timeout=60)
    host.sh("chmod -R a+rX /run/lock/evil")
    unload = ("/v1/unload_lora_adapter", {"lora_name": "gamma"})
    load = ("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "/run/lock/evil"})
    admin = host.sh("sed -n 's/^VLLM_ADMIN_KEY=//p' /etc/vllm/vllm-admin.env").stdout.strip()
    assert len(admin) >= 32 and host.sh("stat -c '%U %a' /etc/vllm/vllm-admin.env").stdout.split() == ["root", "600"]
    attempts = {
        "a local user, no key": [bee.curl(*call, key="", user="nobody") for call in (unload, load)],
        "a client's API key": [bee.curl(*call, user="nobody") for call in (unload, load)],
        "a guessed deployer key": [bee.curl(*call, user="nobody", headers={"X-Vllm-Admin-Key": "x" * 43})
                                   for call in (unload, load)],
        "the deployer's key, a folder outside the role's": [bee.curl(*load, headers={"X-Vllm-Admin-Key": admin})],
        "a web page (with the key)": [bee.curl(*call, headers={"Origin": "https://evil.example"})
                                      for call in (unload, load)],
    }
    statuses = {who: [status for status, _ in answers] for who, answers in attempts.items()}
    assert statuses == {"a local user, no key": [401, 401], "a client's API key": [403, 403],
                        "a guessed deployer key": [403, 403],
                        "the deployer's key, a folder outside the role's": [403],
                        "a web page (with the key)": [403, 403]}, attempts
    assert (bee.answer("gamma", **hello), bee.models(), bee.state()) == before  # type: ignore[arg-type]
    page = bee.curl("/v1/models", headers={"Origin": "https://evil.example"})
    assert page[0] == 403, page
    host.sh("rm -rf /run/lock/evil")


# Last: it leaves the host down, as a failed maintenance restart does by design.
def test_a_failed_maintenance_restart_keeps_the_lock_and_says_why(converged: Beelink) -> None:
    bee, host = converged, converged.host
    release = bee.current()
    # The service may no longer read the model: the same release cannot come back.
    host.sh("gpasswd -d vllm beelink")
    lock = bee.workdir / "maintenance.lock"
    failed = bee.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock), vllm_maintenance_force=True)
    assert failed.rc != 0
    assert lock.exists(), "a failed maintenance must keep its lock for an operator"
    report = json.loads((bee.workdir / "reports" / "maintenance-latest.json").read_text())
    entry = report["hosts"][host.name]
    assert entry["verified"] is False and entry["old_release"] == release, entry
    assert "stopped while loading" in entry["failed"] and entry["failed_task"], entry
    again = bee.play(playbook="maintenance.yml", vllm_maintenance_lock=str(lock), vllm_maintenance_force=True)
    assert again.rc != 0 and "exists: another maintenance run is in progress" in again.output, again.tail(20)

"""Security and fault tolerance on real systemd test hosts with a real vLLM 0.11.0 (CPU build).

Every play in this module deploys with a distinctive API key and HF token, so
the last test can look for them everywhere a secret must never be: the play
output (also at -vvv with --diff), the journal, `systemctl show`, `ps`,
/proc/*/cmdline and every file written on the host while the module ran.

Ansible reaches the host as an operator's does: over SSH, as an unprivileged
user, with become through sudo. While every play runs, a sampler on the host
records each process's command line (what `ps` shows), so a secret that is on
a command line only for a second is still caught.

The tests run in file order and share one host (two for the unreachable-host
test, a third, bare one as "another machine on the LAN" for the port scan). A test that breaks the service puts it back in a `finally`, so the
next one starts from a healthy, verified service.

"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LOG_DIR, Deployment, declaration_vars, write_vars
from tests.fixtures import tinyqwen
from tests.harness.ansible import BIN, REPO, PlayResult, parse_recap
from tests.harness import hosts
from tests.harness.hosts import HostPool
from tests.harness.software import LOCAL_GROUP_VARS
from tests.unit.test_unit_hardening import directive_problems, documented_bound

HOST_COUNT = 1

# Distinctive, random per run: a hit in any output can only be a leak.
API_KEY = "sk-vllmtest-" + secrets.token_hex(12)
HF_TOKEN = "hf_vllmtest" + secrets.token_hex(12)
ROTATED_API_KEY = "sk-vllmrotated-" + secrets.token_hex(12)
SECRETS: dict[str, str] = {"vllm_api_key": API_KEY, "vllm_hf_token": HF_TOKEN}

# Output of every play this module ran, for the leak test.
OUTPUTS: list[str] = []

URL = "http://127.0.0.1:8000"
UNIT = "/etc/systemd/system/vllm.service"
ENV_FILE = "/etc/vllm/vllm.env"
SERVED_MODEL = "/srv/vllm/models/tiny-qwen2"
PADDING_MIB = 1024


# --- helpers ---------------------------------------------------------------------------------

def play(dep: Deployment, *args: str, **overrides: Any) -> PlayResult:
    """deployment.play with this module's secrets; the output is kept for the leak test."""
    started = time.monotonic()
    result = dep.play(*args, **{**SECRETS, **overrides})
    OUTPUTS.append(result.output)
    print(f"[play {' '.join(args) or 'site.yml'}: rc={result.rc}, {time.monotonic() - started:.0f}s]")
    return result


@dataclass
class Background:
    """An ansible-playbook run in its own process group, so it can be SIGKILLed whole."""

    proc: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    started: float = field(default_factory=time.monotonic)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 900) -> PlayResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        output = self.log.read_text(errors="replace")
        OUTPUTS.append(output)
        with (LOG_DIR / f"{self.log.parent.name}.log").open("a") as handle:
            handle.write(f"\n$ {' '.join(self.command)}  # in the background\n{output}\n[rc={self.proc.returncode}]\n")
        return PlayResult(rc=self.proc.returncode, output=output, recap=parse_recap(output))


def start_play(dep: Deployment, adapters: tuple[str, ...] = ("alpha", "beta"), **overrides: Any) -> Background:
    """site.yml like Deployment.play, but in the background."""
    dep.runs += 1
    overrides = {**SECRETS, **overrides}
    overrides.setdefault("vllm_report_dir", str(dep.workdir / "reports"))
    vars_file = write_vars(dep.workdir / f"vars-{dep.runs}.json", declaration_vars(dep.fixtures, adapters, **overrides))
    command = [str(BIN / "ansible-playbook"), str(REPO / "playbooks" / "site.yml"), "-i", str(dep.inventory),
               "-e", f"@{vars_file}"]
    environment = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
                   "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    log = dep.workdir / f"background-{dep.runs}.log"
    handle = log.open("wb")
    proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    handle.close()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return Background(proc=proc, log=log, command=command)


def unit_state(host: hosts.TestHost) -> dict[str, str]:
    out = host.sh("systemctl show vllm -p ActiveState -p SubState -p Result -p NRestarts -p MainPID "
                  "-p ExecMainStartTimestamp --timestamp=unix").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def started_at(host: hosts.TestHost) -> int:
    """When the running vLLM process was started (unix seconds)."""
    return int(unit_state(host)["ExecMainStartTimestamp"].lstrip("@") or 0)


def served_adapter_path(host: hosts.TestHost, name: str) -> str:
    """The folder the current release serves adapter `name` from (its --lora-modules)."""
    argv = json.loads(host.sh("cat /opt/vllm/current/release.json").stdout)["argv"]
    modules = [json.loads(word) for word in argv if str(word).startswith("{")]
    (path,) = [module["path"] for module in modules if module["name"] == name]
    return str(path)


def health(host: hosts.TestHost) -> int:
    out = host.sh(f"curl -s -o /dev/null -m 5 -w '%{{http_code}}' {URL}/health", check=False).stdout
    return int(out or 0)


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_healthy(host: hosts.TestHost, timeout: float = 240) -> None:
    wait_until(lambda: health(host) == 200, timeout, f"{host.name}: vllm /health 200", interval=2)


def ensure_healthy(host: hosts.TestHost) -> None:
    """Put the service back (for `finally` blocks): start it if it is down, wait for /health."""
    if health(host) == 200:
        return
    host.sh("systemctl reset-failed vllm; systemctl start vllm", check=False, timeout=120)
    wait_healthy(host)


def request(host: hosts.TestHost, method: str, path: str, body: dict[str, Any] | None = None,
            key: str | None = None, timeout: int = 60, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """HTTP from inside the host. The key travels on stdin (curl -H @-), never on a command line."""
    command = f"curl -s -m {timeout} -o /tmp/.body -w '%{{http_code}}' -X {method} -H @- -H 'Content-Type: application/json'"
    if body is not None:
        command += f" --data-binary {shlex.quote(json.dumps(body))}"
    command += f" {URL}{path}; echo; cat /tmp/.body; rm -f /tmp/.body"
    lines = f"Authorization: Bearer {key}\n" if key else "X-No-Key: 1\n"
    lines += "".join(f"{name}: {value}\n" for name, value in (headers or {}).items())
    result = subprocess.run(["docker", "exec", "-i", host.name, "sh", "-c", command], input=lines,
                            capture_output=True, text=True, timeout=timeout + 30, check=False)
    status, _, text = result.stdout.partition("\n")
    return int(status or 0), text


def chat_body(model: str, prompt: str = "Tell me about the sea.") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}


def answer(host: hosts.TestHost, model: str, key: str = API_KEY) -> str:
    status, text = request(host, "POST", "/v1/chat/completions", chat_body(model), key=key)
    assert status == 200, text
    return str(json.loads(text)["choices"][0]["message"]["content"])


def snapshot(host: hosts.TestHost) -> dict[str, str]:
    """What a refused run must not touch: unit, secrets file, served files, releases, state, process."""
    tree = host.sh(
        "find /srv/vllm /etc/vllm /opt/vllm /var/lib/vllm-deploy /etc/systemd/system -path /opt/vllm/venvs -prune "
        "-o -printf '%p %s %m %T@\\n' 2>/dev/null | sort | sha256sum"
    ).stdout.split()[0]
    files = host.sh(f"sha256sum {UNIT} {ENV_FILE}").stdout
    state = unit_state(host)
    return {"tree": tree, "files": files, "MainPID": state["MainPID"], "NRestarts": state["NRestarts"]}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_names(output: str) -> list[str]:
    return re.findall(r"^TASK \[inference\.vllm_lora\.vllm : (.*?)\](?: \**)?\s*$", output, re.MULTILINE)


class ServedDirWatch:
    """Polls the served directories from inside the host while a run copies files,
    recording anything the service could see that is not a complete, expected file."""

    def __init__(self, host: hosts.TestHost, expected_sizes: dict[str, int]) -> None:
        self.host = host
        self.expected = expected_sizes  # path -> size; other paths are anomalies
        self.anomalies: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = self.host.sh("find /srv/vllm/models /srv/vllm/adapters -type f -printf '%p %s\\n'",
                               check=False, timeout=30).stdout
            self.polls += 1
            for line in out.splitlines():
                path, _, size = line.rpartition(" ")
                if path not in self.expected:
                    self.anomalies.append(f"unexpected file {path} ({size} bytes)")
                elif int(size) != self.expected[path]:
                    self.anomalies.append(f"{path} has {size} bytes, a complete copy has {self.expected[path]}")
            self._stop.wait(0.3)

    def __enter__(self) -> ServedDirWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# --- fixtures --------------------------------------------------------------------------------

# Every process's command line, as `ps` would show it, sampled every 50 ms.
SAMPLER = """
import os, time
seen = set()
while True:
    new = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    line = handle.read().replace(b"\\0", b" ").strip()
            except OSError:
                continue
            if line and line not in seen:
                seen.add(line)
                new.append(line)
    if new:
        with open("/var/lib/leak-sampler/cmdlines", "ab") as handle:
            handle.write(b"\\n".join(new) + b"\\n")
    time.sleep(0.05)
"""
SAMPLES = "/var/lib/leak-sampler/cmdlines"
# Where a file Ansible transfers lands first: the SSH user's remote tmp (root's for docker exec).
REMOTE_TMPS = "/home/deploy/.ansible/tmp /root/.ansible/tmp"


@pytest.fixture(scope="module")
def over_ssh(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> str:
    """sshd, a `deploy` user with a key and sudo, and the module's inventory pointed at it; the sampler runs."""
    host = deployment.pool.hosts[0]
    workdir = tmp_path_factory.mktemp("ssh")
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    host.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server >/dev/null",
            timeout=600)
    host.sh("useradd -m -s /bin/bash deploy && install -d -m 0700 -o deploy -g deploy /home/deploy/.ssh "
            "&& echo 'deploy ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/deploy && chmod 0440 /etc/sudoers.d/deploy")
    subprocess.run(["docker", "cp", f"{key}.pub", f"{host.name}:/home/deploy/.ssh/authorized_keys"], check=True,
                   capture_output=True, timeout=60)
    host.sh("chown deploy:deploy /home/deploy/.ssh/authorized_keys && chmod 0600 /home/deploy/.ssh/authorized_keys "
            "&& systemctl restart ssh")
    host.container.reload()
    address = str(host.container.attrs["NetworkSettings"]["IPAddress"])
    deployment.inventory = hosts.write_inventory(
        workdir / "inventory", [host.name], group_vars_from=LOCAL_GROUP_VARS,
        host_vars={host.name: {"ansible_connection": "ssh", "ansible_host": address, "ansible_user": "deploy",
                               "ansible_become_method": "sudo", "ansible_ssh_private_key_file": str(key),
                               "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}})
    subprocess.run(["docker", "exec", "-i", host.name, "sh", "-c",
                    "install -d -m 0700 /var/lib/leak-sampler && cat > /var/lib/leak-sampler/sample.py"],
                   input=SAMPLER, text=True, check=True, timeout=30)
    host.sh("systemd-run --unit leak-sampler /usr/bin/python3 /var/lib/leak-sampler/sample.py")
    return address


@pytest.fixture(scope="module")
def converged(deployment: Deployment, over_ssh: str) -> PlayResult:
    """First deployment, over SSH + sudo, with the API key and HF token set, at -v."""
    host = deployment.pool.hosts[0]
    host.sh("touch /var/tmp/.security-faults-start")
    result = play(deployment, "-v")
    assert result.rc == 0, result.tail(120)
    return result


@pytest.fixture(scope="module")
def big_model(fixtures: tinyqwen.Fixtures, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture model plus a 1 GiB file: a copy that takes long enough to be interrupted."""
    root = tmp_path_factory.mktemp("big-model") / "tiny-qwen2"
    shutil.copytree(fixtures.model, root)
    with (root / "padding.dat").open("wb") as handle:
        for _ in range(PADDING_MIB):
            handle.write(os.urandom(1 << 20))
    (root / "padding.dat").chmod(0o644)
    sizes = {f"{SERVED_MODEL}/{p.name}": p.stat().st_size for p in root.iterdir() if p.is_file()}
    return {"path": root, "sizes": sizes, "padding_sha256": sha256(root / "padding.dat"),
            "vllm_model": {"name": "tiny-qwen2", "source": "controller", "path": str(root),
                           "aliases": [fixtures.base_model_name]}}


@pytest.fixture(scope="module")
def pair(software_image: str, fixtures: tinyqwen.Fixtures,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two hosts, only for the unreachable-host test."""
    with HostPool(image=software_image, count=2, prefix="vllm-e2e") as pool:
        yield Deployment(pool, tmp_path_factory.mktemp("security_faults_pair"), fixtures)


# --- access rules: the task file alone, on the controller (seconds) --------------------------

ACCESS_CASES: list[tuple[str, dict[str, Any], list[str] | None]] = [
    ("defaults", {}, None),
    ("loopback 127.0.1.1", {"vllm_listen_host": "127.0.1.1"}, None),
    ("loopback localhost", {"vllm_listen_host": "localhost"}, None),
    ("loopback ::1", {"vllm_listen_host": "::1"}, None),
    ("network without key", {"vllm_listen_host": "0.0.0.0"},
     ['vllm_listen_host="0.0.0.0"', "vllm_api_key is empty", "vllm_allow_unauthenticated_network: true"]),
    ("network, IPv6, without key", {"vllm_listen_host": "::"}, ['vllm_listen_host="::"', "vllm_api_key"]),
    ("network with key", {"vllm_listen_host": "0.0.0.0", "vllm_api_key": API_KEY}, None),
    ("network, named opt-out", {"vllm_listen_host": "0.0.0.0", "vllm_allow_unauthenticated_network": True}, None),
    ("opt-out plus runtime LoRA loading",
     {"vllm_listen_host": "10.1.2.3", "vllm_allow_unauthenticated_network": True, "vllm_allow_runtime_lora_updating": True},
     ["vllm_allow_runtime_lora_updating"]),
    ("--api-key in extra args", {"vllm_extra_args": ["--api-key", API_KEY]}, ["--api-key", "vllm_api_key"]),
    ("--api-k= prefix in extra args", {"vllm_extra_args": [f"--api-k={API_KEY}"]}, ["--api-key"]),
    ("--trust-remote-code", {"vllm_extra_args": ["--trust-remote-code"]}, ["vllm_trust_remote_code: true"]),
    ("--trust_remote prefix", {"vllm_extra_args": ["--trust_remote"]}, ["--trust-remote-code"]),
    ("--trust-remote-code, asked for", {"vllm_extra_args": ["--trust-remote-code"], "vllm_trust_remote_code": True}, None),
    ("--host in extra args", {"vllm_extra_args": ["--host", "0.0.0.0"]}, ["--host", "vllm_listen_host"]),
    ("secret in vllm_environment", {"vllm_environment": {"HF_TOKEN": HF_TOKEN}}, ["vllm_environment.HF_TOKEN", "vllm_hf_token"]),
    ("harmless vllm_environment", {"vllm_environment": {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}}, None),
    ("key an env file cannot carry", {"vllm_api_key": "two words"}, ["vllm_api_key contains whitespace"]),
    ("runtime LoRA loading on loopback without key", {"vllm_allow_runtime_lora_updating": True},
     ["vllm_allow_runtime_lora_updating", "set vllm_api_key", "vllm_allow_runtime_lora_updating: false"]),
    ("runtime LoRA loading on loopback with key", {"vllm_allow_runtime_lora_updating": True, "vllm_api_key": API_KEY}, None),
    ("VLLM_API_KEY in vllm_environment", {"vllm_environment": {"VLLM_API_KEY": API_KEY}},
     ["vllm_environment.VLLM_API_KEY", "set vllm_api_key"]),
    ("FORWARDED_ALLOW_IPS", {"vllm_environment": {"FORWARDED_ALLOW_IPS": "*"}},
     ['vllm_environment.FORWARDED_ALLOW_IPS="*"', "X-Forwarded-For", "remove it"]),
    ("VLLM_LORA_RESOLVER_CACHE_DIR", {"vllm_environment": {"VLLM_LORA_RESOLVER_CACHE_DIR": "/srv/vllm"}},
     ['vllm_environment.VLLM_LORA_RESOLVER_CACHE_DIR="/srv/vllm"', "vllm_lora_adapters"]),
    ("VLLM_SERVER_DEV_MODE on loopback", {"vllm_environment": {"VLLM_SERVER_DEV_MODE": "1"}},
     ["vllm_environment.VLLM_SERVER_DEV_MODE", "/collective_rpc", "remove it"]),
    ("VLLM_HOST_IP", {"vllm_environment": {"VLLM_HOST_IP": "0.0.0.0"}},
     ['vllm_environment.VLLM_HOST_IP="0.0.0.0"', "internal listeners", "remove it"]),
    ("--allowed-origins in extra args", {"vllm_extra_args": ["--allowed-origins", '["*"]']},
     ["--allowed-origins", "vllm_allowed_origins"]),
    ("--uds in extra args", {"vllm_extra_args": ["--uds", "/run/vllm.sock"]}, ["--uds", "the role decides the listener"]),
    ("CORS for any origin", {"vllm_allowed_origins": ["*"]},
     ['vllm_allowed_origins[0]="*"', "list the exact origins of the web pages that may call the API"]),
    ("CORS for exact origins", {"vllm_allowed_origins": ["https://app.example.com", "http://127.0.0.1:3000"]}, None),
]


@pytest.fixture(scope="module")
def access_playbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("access") / "access.yml"
    path.write_text(
        "- name: Access rules alone\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: Run the access preflight\n      ansible.builtin.include_role:\n"
        "        name: vllm\n        tasks_from: preflight_access.yml\n"
    )
    return path


@pytest.mark.parametrize(("variables", "expected"), [case[1:] for case in ACCESS_CASES], ids=[case[0] for case in ACCESS_CASES])
def test_access_rules_task_file(access_playbook: Path, variables: dict[str, Any], expected: list[str] | None) -> None:
    vars_file = access_playbook.with_name(f"vars-{hashlib.sha256(json.dumps(variables).encode()).hexdigest()[:8]}.json")
    vars_file.write_text(json.dumps(variables))
    environment = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
                   "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(access_playbook),
                             "-e", f"@{vars_file}", "-vvv"],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert API_KEY not in output and HF_TOKEN not in output, "a secret was echoed"
    if expected is None:
        assert result.returncode == 0, output[-3000:]
    else:
        assert result.returncode != 0, output[-3000:]
        failure = output[output.find("fatal:"):].replace('\\"', '"')
        for text in expected:
            assert text in failure, f"{text!r} missing from:\n{failure[:3000]}"


# --- the hardened unit, as rendered, runs the real vLLM -----------------------------------------

def test_unit_as_rendered_runs_verified_with_every_directive_and_the_documented_exposure(deployment: Deployment, converged: PlayResult,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    host = deployment.pool.hosts[0]
    report = deployment.report()[host.name]
    assert report["verified"] is True, converged.tail(80)
    # Exactly the unit the role rendered: no drop-in, no override, no test-only tweak.
    shown = dict(line.split("=", 1) for line in host.sh(
        "systemctl show vllm -p FragmentPath -p DropInPaths -p User -p NoNewPrivileges -p ProtectSystem "
        "-p PrivateDevices -p CapabilityBoundingSet -p AmbientCapabilities -p Restart -p StartLimitBurst "
        "-p StartLimitIntervalUSec -p RestartUSec -p UMask -p ActiveState").stdout.splitlines())
    assert shown["FragmentPath"] == UNIT and shown["DropInPaths"] == "", shown
    assert shown["ActiveState"] == "active" and shown["User"] == "vllm", shown
    assert shown["NoNewPrivileges"] == "yes" and shown["ProtectSystem"] == "strict", shown
    assert shown["CapabilityBoundingSet"] == "" and shown["AmbientCapabilities"] == "", shown
    assert (shown["StartLimitBurst"], shown["StartLimitIntervalUSec"], shown["RestartUSec"]) == ("5", "10min", "10s"), shown
    assert host.sh(f"stat -c '%U %G %a' {ENV_FILE}").stdout.split() == ["root", "root", "600"]

    table = host.sh("systemd-analyze security vllm.service --no-pager", check=False).stdout
    match = re.search(r"Overall exposure level for vllm\.service:\s*([0-9.]+)", table)
    assert match, table
    exposure = float(match.group(1))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "systemd-analyze-security.txt").write_text(table)
    with capsys.disabled():
        print(f"\n--- systemd-analyze security vllm.service (on {host.name}) ---\n{table}")
    assert exposure <= documented_bound("cpu-running"), table
    assert directive_problems(host.sh(f"cat {UNIT}").stdout, "cpu") == []
    # The API port's proxy, the only thing the LAN reaches, is held at least as tight.
    proxy = host.sh("systemd-analyze security vllm-proxy.service --no-pager", check=False).stdout
    match = re.search(r"Overall exposure level for vllm-proxy\.service:\s*([0-9.]+)", proxy)
    assert match and float(match.group(1)) <= documented_bound("proxy-running"), proxy
    assert host.sh("systemctl show vllm vllm-proxy -p PrivateNetwork --value").stdout.split() == ["yes", "yes"]


def test_api_key_required_runtime_lora_off_no_remote_code(deployment: Deployment, converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    assert request(host, "GET", "/v1/models")[0] == 401
    assert request(host, "GET", "/v1/models", key="wrong-" + API_KEY[::-1])[0] == 401
    status, text = request(host, "GET", "/v1/models", key=API_KEY)
    assert status == 200 and sorted(card["id"] for card in json.loads(text)["data"]) == ["alpha", "beta", "tiny-qwen2"]
    assert request(host, "POST", "/v1/chat/completions", chat_body("alpha"))[0] == 401
    assert answer(host, "alpha") != answer(host, "tiny-qwen2")
    # /health is open by vLLM's design (the deployer polls it without a key).
    assert health(host) == 200
    # Runtime adapter loading is off: the route does not exist, even with the key.
    status, _ = request(host, "POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "/tmp"}, key=API_KEY)
    assert status == 404
    unit = host.sh(f"cat {UNIT}").stdout
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "--trust-remote-code" not in exec_start and "--api-key" not in exec_start
    # Loopback only (the default listen address).
    listeners = host.sh("ss -Hltn 'sport = :8000'").stdout.split()
    assert "127.0.0.1:8000" in listeners and "0.0.0.0:8000" not in listeners and "*:8000" not in listeners, listeners


def test_api_key_covers_every_route_that_uses_the_model(deployment: Deployment, converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    open_routes = []
    for path, body in [("/invocations", chat_body("tiny-qwen2")),
                       ("/tokenize", {"model": "tiny-qwen2", "prompt": "hello"})]:
        status, text = request(host, "POST", path, body)
        if status != 401:
            open_routes.append(f"POST {path} without a key -> {status} {text[:120]}")
    assert not open_routes, "\n".join(open_routes)


# --- a bad value in a role variable ---------------------------------------------------------------

BAD_VARIABLES = [
    ("vllm_port", {"vllm_port": "eighty"}, "vllm_port"),
    ("vllm_max_lora_rank", {"vllm_max_lora_rank": 24}, "vllm_max_lora_rank"),
    ("adapter source", {"vllm_lora_adapters": [{"name": "alpha", "source": "s3", "path": "/x"}]}, "vllm_lora_adapters"),
]


@pytest.mark.parametrize(("overrides", "variable"), [case[1:] for case in BAD_VARIABLES], ids=[case[0] for case in BAD_VARIABLES])
def test_bad_variable_rejected_by_argument_specs_before_any_task(deployment: Deployment, converged: PlayResult,
                                                                 overrides: dict[str, Any], variable: str) -> None:
    host = deployment.pool.hosts[0]
    before = snapshot(host)
    result = play(deployment, **overrides)
    assert result.rc != 0
    failure = result.output[result.output.find("Validating arguments against arg spec"):]
    assert "Validation of arguments failed" in failure and variable in failure.split("fatal:")[0], result.tail(40)
    assert task_names(result.output)[0].startswith("Validating arguments against arg spec"), task_names(result.output)
    assert len(task_names(result.output)) == 1, f"tasks ran after the validation: {task_names(result.output)}"
    assert result.recap[host.name]["changed"] == 0
    assert snapshot(host) == before
    assert health(host) == 200



HOST_ACCESS_CASES = [
    ("network without key", {"vllm_listen_host": "0.0.0.0", "vllm_api_key": ""},
     ["vllm_listen_host", "vllm_api_key", "vllm_allow_unauthenticated_network"]),
    ("--api-key in extra args", {"vllm_extra_args": ["--api-key", API_KEY]}, ["--api-key"]),
    ("--trust-remote-code", {"vllm_extra_args": ["--trust-remote-code"]}, ["vllm_trust_remote_code"]),
]


@pytest.mark.parametrize(("overrides", "named"), [case[1:] for case in HOST_ACCESS_CASES], ids=[case[0] for case in HOST_ACCESS_CASES])
def test_access_rules_refuse_before_anything_changes(deployment: Deployment, converged: PlayResult,
                                                     overrides: dict[str, Any], named: list[str]) -> None:
    host = deployment.pool.hosts[0]
    before = snapshot(host)
    result = play(deployment, **overrides)
    assert result.rc != 0
    failure = result.output[result.output.find("Check the access rules"):]
    for name in named:
        assert name in failure, f"{name} not named:\n{failure[:2000]}"
    assert result.recap[host.name]["changed"] == 0
    assert snapshot(host) == before and health(host) == 200


# --- the engine killed ------------------------------------------------------------------------------

def test_sigkill_of_the_api_server_systemd_restarts_and_verification_passes(deployment: Deployment,
                                                                          converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    before = unit_state(host)
    try:
        host.sh(f"kill -KILL {before['MainPID']}")
        wait_until(lambda: unit_state(host)["NRestarts"] != before["NRestarts"], 60, "systemd to schedule a restart")
        wait_healthy(host, 240)
        after = unit_state(host)
        assert after["MainPID"] != before["MainPID"] and after["ActiveState"] == "active"
        result = play(deployment, "--tags", "verify")
        assert result.rc == 0, result.tail(60)
        assert deployment.report()[host.name]["verified"] is True
    finally:
        ensure_healthy(host)


def test_sigkill_of_the_engine_process_systemd_restarts_and_verification_passes(deployment: Deployment,
                                                                              converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    before = unit_state(host)
    try:
        engine = host.sh("pgrep -u vllm -f '^VLLM::EngineCore'").stdout.split()
        assert len(engine) == 1, engine
        host.sh(f"kill -KILL {engine[0]}")

        def restarted_or_down() -> str:
            state = unit_state(host)
            if state["NRestarts"] != before["NRestarts"]:
                return "restarting"
            if state["ActiveState"] in ("inactive", "failed"):
                return f"down: {state['ActiveState']} result={state['Result']}"
            return ""

        outcome = wait_until(restarted_or_down, 60, "the API server to notice the dead engine")
        if outcome.startswith("down"):
            time.sleep(15)  # longer than RestartSec=10: would a restart still come?
            state = unit_state(host)
            assert state["NRestarts"] != before["NRestarts"], (
                f"service {outcome} and not restarted after 15 s; journal:\n"
                + host.sh("journalctl -u vllm -n 6 -o cat --no-pager").stdout)
        wait_healthy(host, 240)
        result = play(deployment, "--tags", "verify")
        assert result.rc == 0, result.tail(60)
    finally:
        ensure_healthy(host)


def test_a_sampled_request_is_answered_and_the_service_survives(deployment: Deployment,
                                                               converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    before = unit_state(host)
    try:
        body = {**chat_body("alpha"), "temperature": 0.8, "top_p": 0.9}
        # The first sampled request compiles the sampler: allow minutes on a busy 2-core host.
        status, text = request(host, "POST", "/v1/chat/completions", body, key=API_KEY, timeout=300)
        time.sleep(8)  # the API server's watchdog shuts down within 5 s of an engine death
        state = unit_state(host)
        assert status == 200, f"{status} {text[:200]}; service {state['ActiveState']}/{state['Result']}"
        assert state["MainPID"] == before["MainPID"] and health(host) == 200
    finally:
        ensure_healthy(host)


# --- a crash loop ---------------------------------------------------------------------------------------

def test_crash_loop_stops_at_the_start_limit(deployment: Deployment, converged: PlayResult) -> None:
    """A service that dies at every start (here: it may no longer read its model) stops at the unit's start
    limit instead of spinning. Caused by hand: a play that deploys a crashing release now rolls it back
    (tests/e2e/test_beelink.py), so no play leaves a crash loop behind."""
    host = deployment.pool.hosts[0]
    config = "/srv/vllm/models/tiny-qwen2/config.json"
    mark = host.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    # The crash loop starts from a fresh start-limit budget: the SIGKILL tests above already spent some
    # of the 5 starts in 10 minutes (seen: two crashes cost more than their two visible starts).
    host.sh("systemctl reset-failed vllm")
    try:
        host.sh(f"chmod 0600 {config} && systemctl restart vllm")
        burst = int(host.sh("systemctl show vllm -p StartLimitBurst --value").stdout)
        wait_until(lambda: unit_state(host)["ActiveState"] == "failed", 400, "the unit to hit its start limit", interval=3)
        failed = unit_state(host)
        journal = host.sh(f"journalctl -u vllm --since '{mark}' -o cat --no-pager").stdout
        assert "Start request repeated too quickly" in journal, journal[-2000:]
        assert failed["Result"] in ("start-limit-hit", "exit-code"), failed
        assert 1 <= int(failed["NRestarts"]) <= burst, failed
        starts = journal.count("Started vllm.service")
        assert 1 <= starts <= burst + 1, starts
        time.sleep(30)  # three times RestartSec: nothing may start any more
        assert unit_state(host) == failed
        later = host.sh(f"journalctl -u vllm --since '{mark}' -o cat --no-pager").stdout.count("Started vllm.service")
        assert later == starts, (starts, later)
    finally:
        host.sh(f"chmod 0640 {config} && systemctl reset-failed vllm")
        restored = play(deployment)
    assert restored.rc == 0, restored.tail(60)
    assert deployment.report()[host.name]["verified"] is True
    assert unit_state(host)["ActiveState"] == "active"


# --- disk and interrupted copies ---------------------------------------------------------------------

def test_not_enough_disk_refused_before_copying(deployment: Deployment, converged: PlayResult,
                                                big_model: dict[str, Any]) -> None:
    host = deployment.pool.hosts[0]
    free_mib = int(host.sh("df -Pm /srv/vllm | awk 'NR==2 {print $4}'").stdout)
    before = snapshot(host)
    # Reserve exactly what is free: the 1 GiB model cannot fit on top of it.
    result = play(deployment, vllm_model=big_model["vllm_model"], vllm_disk_reserve_mib=free_mib)
    assert result.rc != 0
    assert "not enough disk space" in result.output and f"the copies need {PADDING_MIB} MiB" in result.output, result.tail(30)
    assert "Nothing was copied" in result.output
    assert not [name for name in task_names(result.output) if name.startswith("Copy changed files")]
    assert result.recap[host.name]["changed"] == 0
    assert snapshot(host) == before
    assert host.sh("find /srv/vllm/.staging -type f | wc -l").stdout.strip() == "0"
    assert host.sh("find /root/.ansible/tmp -type f 2>/dev/null | wc -l").stdout.strip() == "0"
    assert health(host) == 200 and answer(host, "alpha")


def test_interrupted_copy_is_finished_by_the_next_run_and_never_served_partial(
        deployment: Deployment, converged: PlayResult, big_model: dict[str, Any]) -> None:
    host = deployment.pool.hosts[0]
    old_files = {line.rpartition(" ")[0]: int(line.rpartition(" ")[2]) for line in host.sh(
        "find /srv/vllm/models /srv/vllm/adapters -type f -printf '%p %s\\n'").stdout.splitlines()}
    before = unit_state(host)
    total = big_model["sizes"][f"{SERVED_MODEL}/padding.dat"]
    with ServedDirWatch(host, {**old_files, **big_model["sizes"]}) as watch:
        run = start_play(deployment, vllm_model=big_model["vllm_model"])
        partial = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.running():
            # The SSH user's remote tmp (sftp writes `source` in place; docker cp wrote `.source*`).
            sizes = host.sh(f"find {REMOTE_TMPS} -type f -name '*source*' -printf '%s\\n' 2>/dev/null",
                            check=False).stdout.split()
            growing = [int(size) for size in sizes if 0 < int(size) < total]
            if growing:
                run.kill()
                partial = growing[0]
                break
            time.sleep(0.05)
        killed = run.finish(timeout=60)
        assert partial, f"the run ended (rc={killed.rc}) before a partial copy was seen:\n{killed.tail(30)}"
        print(f"[killed ansible-playbook with {partial / 2**20:.0f} of {total / 2**20:.0f} MiB transferred]")
        time.sleep(3)  # the in-host end of the transfer drains
        served = host.sh(f"ls -A {SERVED_MODEL}").stdout.split()
        assert "padding.dat" not in served, served
        assert unit_state(host)["MainPID"] == before["MainPID"] and health(host) == 200
        leftovers = host.sh(f"find {REMOTE_TMPS} -type f -printf '%p %s\\n' 2>/dev/null", check=False).stdout
        print(f"[left in the remote tmp by the killed run: {leftovers.strip() or 'nothing'}]")

        rerun = play(deployment, vllm_model=big_model["vllm_model"])
    assert rerun.rc == 0, rerun.tail(60)
    assert deployment.report()[host.name]["verified"] is True
    assert watch.polls > 10 and not watch.anomalies, watch.anomalies[:10]
    placed = host.sh(f"sha256sum {SERVED_MODEL}/padding.dat").stdout.split()[0]
    assert placed == big_model["padding_sha256"]
    assert host.sh("find /srv/vllm/.staging -type f | wc -l").stdout.strip() == "0"
    assert unit_state(host)["MainPID"] != before["MainPID"], "the new model files need a restart"


def test_restart_is_not_lost_when_the_play_is_killed_after_the_change(
        deployment: Deployment, converged: PlayResult, big_model: dict[str, Any]) -> None:
    host = deployment.pool.hosts[0]
    fx = deployment.fixtures
    # The adapter named alpha gets other weights (gamma's): its answer must change.
    swapped = [{"name": "alpha", "source": "controller", "path": str(fx.adapters["gamma"])},
               {"name": "beta", "source": "controller", "path": str(fx.adapters["beta"])}]
    old_alpha = answer(host, "alpha")
    alpha_before = served_adapter_path(host, "alpha")
    before = unit_state(host)
    current = host.sh("readlink /opt/vllm/current 2>/dev/null || true").stdout.strip()
    try:
        run = start_play(deployment, vllm_model=big_model["vllm_model"], vllm_lora_adapters=swapped)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.running():
            now = host.sh("readlink /opt/vllm/current 2>/dev/null || true", check=False).stdout.strip()
            if now != current:  # the new release is current; the plan's restart has not run yet
                run.kill()
                break
            time.sleep(0.05)
        killed = run.finish(timeout=60)
        late = unit_state(host)["MainPID"] != before["MainPID"] or "Restart the service (the plan says why)" in killed.output
        assert late or killed.rc != 0, "the run was not interrupted"

        rerun = play(deployment, vllm_model=big_model["vllm_model"], vllm_lora_adapters=swapped)
        assert rerun.rc == 0, rerun.tail(60)
        alpha_now = served_adapter_path(host, "alpha")
        newest = int(host.sh(f"stat -c %Y {alpha_now}/adapter_model.safetensors").stdout)
        assert late or started_at(host) >= newest, (
            f"vLLM (started {started_at(host)}) is older than the adapter files it serves ({newest}); "
            f"re-run: changed={rerun.changed()}")
        assert answer(host, "alpha") != old_alpha

        # Adapters are stored by content: the release before still has alpha's own files, so
        # rollback.yml serves, byte for byte, what that release served (before, alpha's one
        # folder was rewritten in place and the rollback served gamma's weights as alpha).
        assert alpha_before != alpha_now
        back = play(deployment, playbook="rollback.yml")
        assert back.rc == 0, back.tail(60)
        assert host.sh("readlink /opt/vllm/current").stdout.strip() == current
        assert served_adapter_path(host, "alpha") == alpha_before
        placed = host.sh(f"sha256sum {alpha_before}/adapter_model.safetensors").stdout.split()[0]
        assert placed == sha256(fx.adapters["alpha"] / "adapter_model.safetensors")
        assert answer(host, "alpha") == old_alpha
        if late:
            pytest.skip("the kill came after the restart: the restart-not-lost part was not tested this time "
                        "(the rollback part was)")
    except Exception:
        host.sh("systemctl restart vllm", check=False, timeout=120)
        wait_healthy(host)
        raise


# --- a host lost in the middle of a run --------------------------------------------------------------

def test_unreachable_host_mid_run_stops_cleanly_and_rerun_converges(deployment: Deployment, pair: Deployment) -> None:
    # Free the shared CPUs: this test starts vLLM on two more hosts (the module's host is started again after).
    deployment.pool.hosts[0].sh("systemctl stop vllm", check=False, timeout=120)
    try:
        lose_a_host_and_rerun(pair)
    finally:
        ensure_healthy(deployment.pool.hosts[0])


def lose_a_host_and_rerun(pair: Deployment) -> None:
    first, lost = pair.pool.hosts
    run = start_play(pair)
    try:
        wait_until(lambda: lost.sh("systemctl is-active vllm", check=False).stdout.strip() == "active"
                   or not run.running(), 600, f"{lost.name} to start vllm", interval=0.5)
        assert run.running(), "the run ended before the host could be lost"
        subprocess.run(["docker", "kill", lost.name], check=True, capture_output=True, timeout=60)
        lost_at = time.monotonic() - run.started
        result = run.finish(timeout=900)
    finally:
        if run.running():
            run.kill()
    print(f"[{lost.name} killed {lost_at:.0f}s into the run; run rc={result.rc}]")
    assert result.rc != 0
    assert result.recap[first.name]["failed"] == 0 and result.recap[first.name]["unreachable"] == 0, result.tail(40)
    assert result.recap[lost.name]["unreachable"] + result.recap[lost.name]["failed"] >= 1, result.tail(40)
    report = pair.report()
    assert report[first.name]["verified"] is True and report[lost.name]["verified"] is False, report
    marker = unit_state(first)
    assert health(first) == 200 and answer(first, "beta")

    subprocess.run(["docker", "start", lost.name], check=True, capture_output=True, timeout=120)
    assert lost.system_state() in ("running", "degraded")
    rerun = play(pair)
    assert rerun.rc == 0, rerun.tail(80)
    report = pair.report()
    assert report[first.name]["verified"] is True and report[lost.name]["verified"] is True
    assert rerun.recap[first.name]["changed"] == 0, "the host that stayed up must already be converged"
    assert unit_state(first)["MainPID"] == marker["MainPID"], "the host that stayed up must not be restarted"
    assert answer(lost, "alpha") == answer(first, "alpha")


# --- exposure: only the API port answers from another machine --------------------------------------

# Connects to every TCP port of a host; prints the open ones. Run on the peer (another container).
SCAN = """
import asyncio, sys

async def probe(host, port, gate):
    async with gate:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
        except (OSError, asyncio.TimeoutError):
            return 0
        writer.close()
        return port

async def main(host):
    gate = asyncio.Semaphore(400)
    found = await asyncio.gather(*(probe(host, port, gate) for port in range(1, 65536)))
    print(" ".join(str(port) for port in found if port))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def peer(e2e_ready: None) -> Iterator[hosts.TestHost]:
    """Another machine on the same network: a bare test host (no vLLM)."""
    from tests.harness import image

    with HostPool(image=image.build_base(), count=1, prefix="vllm-peer") as pool:
        yield pool.hosts[0]


def open_ports(peer_host: hosts.TestHost, address: str) -> list[int]:
    result = subprocess.run(["docker", "exec", "-i", peer_host.name, "python3", "-", address], input=SCAN,
                            capture_output=True, text=True, timeout=600, check=True)
    return [int(port) for port in result.stdout.split()]


def engine_listeners(host: hosts.TestHost) -> list[tuple[str, int]]:
    """(address, port) of every TCP listener in the service's own network namespace, vLLM's internal
    ones among them: /proc/PID/net/tcp{,6} of its main process (nsenter needs CAP_SYS_PTRACE)."""
    pid = unit_state(host)["MainPID"]
    listeners = []
    for line in host.sh(f"cat /proc/{pid}/net/tcp /proc/{pid}/net/tcp6").stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # LISTEN
            address, port = fields[1].split(":")
            listeners.append(("127.0.0.1" if address == "0100007F" else "0.0.0.0" if set(address) == {"0"}
                              else address, int(port, 16)))
    return listeners


def test_only_the_api_port_answers_from_another_host(deployment: Deployment, converged: PlayResult,
                                                    over_ssh: str, peer: hosts.TestHost) -> None:
    host = deployment.pool.hosts[0]
    # vLLM listens on more than its API port (torch's TCPStore, gloo, ZMQ), all inside its private network.
    inside = engine_listeners(host)
    assert ("127.0.0.1", 8000) in inside and len(inside) >= 3, inside
    # torch's TCPStore listens on every interface: of its private namespace, where there is only loopback.
    assert ("0.0.0.0", 8000) not in inside and any(address == "0.0.0.0" for address, _ in inside), inside
    unit = host.sh("systemctl show vllm -p PrivateNetwork --value").stdout.strip()
    assert unit == "yes"
    # Loopback listener (the default): nothing at all answers from the LAN. (sshd's port 22 is the test's own.)
    assert open_ports(peer, over_ssh) == [22]
    # UDP: no socket of the host's network namespace belongs to the service.
    udp = host.sh("ss -Hlunp").stdout
    assert "python" not in udp and "vllm" not in udp, udp

    # Listening on the LAN (with a key): the API port, and only it.
    result = play(deployment, vllm_listen_host="0.0.0.0")
    assert result.rc == 0, result.tail(80)
    try:
        assert open_ports(peer, over_ssh) == [22, 8000]
        assert len(engine_listeners(host)) >= 3
        # From the peer, through the proxy: the key is asked for and an adapter answers.
        status = peer.sh(f"curl -s -o /dev/null -w '%{{http_code}}' -m 10 http://{over_ssh}:8000/v1/models",
                         check=False).stdout
        assert status == "401", status
        command = (f"curl -s -m 60 -H @- -H 'Content-Type: application/json' --data-binary "
                   f"{shlex.quote(json.dumps(chat_body('alpha')))} http://{over_ssh}:8000/v1/chat/completions")
        out = subprocess.run(["docker", "exec", "-i", peer.name, "sh", "-c", command],
                             input=f"Authorization: Bearer {API_KEY}\n", capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert json.loads(out)["model"] == "alpha", out
    finally:
        back = play(deployment)
        assert back.rc == 0, back.tail(80)
    assert open_ports(peer, over_ssh) == [22]


def test_a_web_page_cannot_call_the_api(deployment: Deployment, converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    evil = {"Origin": "https://evil.example"}
    # A browser's preflight, and a POST it would send (with a key the page somehow had).
    status, text = request(host, "OPTIONS", "/v1/chat/completions",
                           headers={**evil, "Access-Control-Request-Method": "POST"})
    assert status == 403, text
    status, text = request(host, "POST", "/v1/chat/completions", chat_body("alpha"), key=API_KEY, headers=evil)
    assert status == 403, text
    # A page served from the host itself is no better.
    status, _ = request(host, "POST", "/v1/chat/completions", chat_body("alpha"), key=API_KEY,
                        headers={"Origin": "http://127.0.0.1:8000"})
    assert status == 403
    # vLLM's own CORS is closed too (its default is every origin).
    exec_start = next(line for line in host.sh(f"cat {UNIT}").stdout.splitlines() if line.startswith("ExecStart="))
    assert "--allowed-origins '[]'" in exec_start or '--allowed-origins "[]"' in exec_start, exec_start
    # A client that is not a browser sends no Origin: served.
    assert answer(host, "alpha") != answer(host, "tiny-qwen2")


# The hub: a stand-in on the host that records what it was sent and has no such repository.
FAKE_HUB = """
import hashlib, http.server, json
class Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open("/var/lib/fake-hub/requests", "a") as log:
            log.write(json.dumps({"path": self.path, "authorization_sha256":
                hashlib.sha256(self.headers.get("Authorization", "").encode()).hexdigest()}) + "\\n")
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_HEAD = do_GET
http.server.HTTPServer(("127.0.0.1", 18080), Hub).serve_forever()
"""


def test_the_hub_token_reaches_the_download_through_a_file_not_a_command_line(
        deployment: Deployment, converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    subprocess.run(["docker", "exec", "-i", host.name, "sh", "-c",
                    "install -d -m 0700 /var/lib/fake-hub && cat > /var/lib/fake-hub/hub.py"],
                   input=FAKE_HUB, text=True, check=True, timeout=30)
    host.sh("systemd-run --unit fake-hub /usr/bin/python3 /var/lib/fake-hub/hub.py")
    before = snapshot(host)
    try:
        hubbed = {"name": "hubbed", "source": "hf", "repo_id": "acme/hubbed", "revision": "a" * 40}
        result = play(deployment, vllm_hf_endpoint="http://127.0.0.1:18080",
                      vllm_lora_adapters=[*declaration_vars(deployment.fixtures)["vllm_lora_adapters"], hubbed])
        assert result.rc != 0 and "Download into a partial directory" in result.output, result.tail(60)
        requests = [json.loads(line) for line in host.sh("cat /var/lib/fake-hub/requests").stdout.splitlines()]
        sent = hashlib.sha256(f"Bearer {HF_TOKEN}".encode()).hexdigest()  # the stand-in keeps no secret
        assert requests and all(entry["authorization_sha256"] == sent for entry in requests), requests
        assert "acme/hubbed" in requests[0]["path"] and "a" * 40 in requests[0]["path"], requests
        assert host.sh("stat -c '%U %G %a' /etc/vllm/hf-token").stdout.split() == ["root", "root", "600"]
        assert HF_TOKEN not in host.sh(f"cat {ENV_FILE}").stdout, "the service does not need the hub token"
        assert snapshot(host)["MainPID"] == before["MainPID"] and health(host) == 200
    finally:
        host.sh("systemctl stop fake-hub", check=False)


# --- secrets: last, so every run above is covered ----------------------------------------------------

def test_secrets_never_leak(deployment: Deployment, converged: PlayResult) -> None:
    host = deployment.pool.hosts[0]
    # A key rotation at -vvv --diff: the environment file changes, its diff must stay hidden.
    rotated = play(deployment, "-vvv", "--diff", vllm_api_key=ROTATED_API_KEY)
    assert rotated.rc == 0, rotated.tail(80)
    assert request(host, "GET", "/v1/models", key=API_KEY)[0] == 401, "the old key still works after rotation"
    assert request(host, "GET", "/v1/models", key=ROTATED_API_KEY)[0] == 200

    secrets_ = {"API key": API_KEY, "rotated API key": ROTATED_API_KEY, "HF token": HF_TOKEN}
    leaks: list[str] = []

    def look(where: str, text: str) -> None:
        for name, value in secrets_.items():
            if value in text:
                line = next(line for line in text.splitlines() if value in line)
                leaks.append(f"{name} in {where}: {line.replace(value, '<' + name + '>')[:300]}")

    assert len(OUTPUTS) >= 5
    for index, output in enumerate(OUTPUTS):
        look(f"play output #{index}", output)
    for log in LOG_DIR.glob("*.log"):
        look(f"controller log {log}", log.read_text(errors="replace"))
    for report in (deployment.workdir / "reports").glob("*"):
        look(f"report {report}", report.read_text(errors="replace"))

    look("the journal", host.sh("journalctl --no-pager -o verbose --all", timeout=300).stdout)
    look("systemctl show", host.sh("systemctl show vllm --all; systemctl show; systemctl cat vllm").stdout)
    look("ps auxww", host.sh("ps auxww").stdout)
    host.sh("systemctl stop leak-sampler")
    sampled = host.sh(f"cat {SAMPLES}").stdout
    # The sampler ran while the plays did: it saw sudo start Ansible's modules and the hub download.
    assert "sudo" in sampled and "BECOME-SUCCESS" in sampled, sampled[:2000]
    assert "snapshot_download" in sampled, "the sampler never saw the hub download run"
    look("command lines sampled during every play (ps)", sampled)
    look("/proc/*/cmdline", host.sh("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done",
                                    check=False).stdout)
    # Files written on the host while this module ran: only the 0600 environment file may hold a secret.
    holders = host.sh(
        "{ find / -xdev \\( -path /proc -o -path /sys -o -path /opt/vllm/venvs \\) -prune -o -type f "
        "-newer /var/tmp/.security-faults-start -print; "
        "find /run /tmp -xdev -type f -newer /var/tmp/.security-faults-start; } 2>/dev/null "
        f"| xargs -r grep -l -F -e {shlex.quote(ROTATED_API_KEY)} -e {shlex.quote(API_KEY)} "
        f"-e {shlex.quote(HF_TOKEN)} 2>/dev/null | sort -u", check=False, timeout=600).stdout.split()
    env = host.sh(f"stat -c '%U %G %a' {ENV_FILE}; cat {ENV_FILE}").stdout
    assert env.splitlines()[0] == "root root 600"
    assert f"VLLM_API_KEY={ROTATED_API_KEY}" in env and HF_TOKEN not in env and API_KEY not in env
    # The running service's environment holds the key; only root and the service user may read it.
    pid = unit_state(host)["MainPID"]
    assert host.sh(f"runuser -u nobody -- cat /proc/{pid}/environ", check=False).returncode != 0
    assert not leaks, "\n".join(leaks)
    assert host.sh("stat -c '%U %G %a' /etc/vllm/hf-token").stdout.split() == ["root", "root", "600"]
    assert holders == sorted([ENV_FILE, "/etc/vllm/hf-token"]), f"files holding a secret: {holders}"

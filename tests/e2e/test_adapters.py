"""Adapters: bad input is refused before anything on the host changes, and the
running service keeps answering through the adapter deployed before."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest

from tests.e2e.conftest import Deployment
from tests.fixtures import tinyqwen
from tests.harness.hosts import TestHost

# Each broken fixture and a word its refusal must contain besides its name.
BROKEN = {
    "rank_too_high": "LoRA rank 64 is greater than max_lora_rank 16",
    "dora": "use_dora",
    "modules_to_save": "modules_to_save",
    "embed_tokens": "embed_tokens",
    "other_base": "base_model_name_or_path",
    "foreign_base_name": "base_model_name_or_path",
    "no_weights": "no weights file",
    "no_rank": "Missing required configuration fields",
    "bias_all": "bias",
    "unknown_target": "c_attn",
    "pickle_only": "convert it to safetensors",
    "nan_weights": "3 NaN of 512 values",
    "inf_weights": "1 Inf of 512 values",
    "zero_b": "lora_B values = all zero",
}


def alpha_answer(host: TestHost) -> str:
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "temperature": 0, "max_tokens": 12})
    out = host.sh(f"curl -sf -H 'Content-Type: application/json' -d {shlex.quote(body)} "
                  "http://127.0.0.1:8000/v1/chat/completions").stdout
    return str(json.loads(out)["choices"][0]["message"]["content"])


def host_state(host: TestHost) -> tuple[str, str, str]:
    """(service start, unit sha256, current release): all unchanged after a refused run."""
    start = host.sh("systemctl show vllm -p ActiveEnterTimestampMonotonic --value").stdout.strip()
    unit = hashlib.sha256(host.sh("cat /etc/systemd/system/vllm.service").stdout.encode()).hexdigest()
    return start, unit, host.sh("readlink /opt/vllm/current").stdout.strip()


@pytest.fixture(scope="module")
def converged(deployment: Deployment) -> tuple[Deployment, str, tuple[str, str, str]]:
    result = deployment.play()
    assert result.rc == 0, result.tail(120)
    host = deployment.pool.hosts[0]
    return deployment, alpha_answer(host), host_state(host)


def adapters_with(fx: tinyqwen.Fixtures, name: str, path: str) -> list[dict[str, str]]:
    return [{"name": "alpha", "source": "controller", "path": str(fx.adapters["alpha"])},
            {"name": name, "source": "controller", "path": path}]


def assert_nothing_changed(deployment: Deployment, before_text: str, before_state: tuple[str, str, str]) -> None:
    host = deployment.pool.hosts[0]
    assert host_state(host) == before_state
    assert alpha_answer(host) == before_text


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_adapter_is_refused_before_the_host_changes(converged, broken: str) -> None:  # type: ignore[no-untyped-def]
    deployment, text, state = converged
    result = deployment.play(vllm_lora_adapters=adapters_with(deployment.fixtures, broken,
                                                               str(deployment.fixtures.broken[broken].path)))
    assert result.rc != 0
    assert f"adapter '{broken}'" in result.output and BROKEN[broken] in result.output, result.tail(40)
    assert "Fix:" in result.output
    assert_nothing_changed(deployment, text, state)


@pytest.mark.parametrize("overrides, needle", [
    ({"vllm_max_lora_rank": 24}, "vllm_max_lora_rank"),
    ({"vllm_max_lora_rank": 8}, "LoRA rank 16 is greater than max_lora_rank 8"),
    ({"vllm_max_cpu_loras": 1}, "vllm_max_cpu_loras=1: must be >= max_loras 2"),
    ({"vllm_port": "eighty"}, "vllm_port"),
    ("served-name", "equals a served model name"),
    ("duplicate", "declared more than once"),
    ("unsafe", "not safe in a path or URL"),
], ids=["rank-not-allowed", "rank-too-small", "cpu-loras", "port-type", "served-name", "duplicate", "unsafe-name"])
def test_a_bad_setting_is_refused_before_the_host_changes(converged, overrides, needle: str) -> None:  # type: ignore[no-untyped-def]
    deployment, text, state = converged
    fx = deployment.fixtures
    if overrides == "served-name":
        overrides = {"vllm_lora_adapters": adapters_with(fx, "tiny-qwen2", str(fx.adapters["beta"]))}
    elif overrides == "duplicate":
        overrides = {"vllm_lora_adapters": adapters_with(fx, "alpha", str(fx.adapters["beta"]))}
    elif overrides == "unsafe":
        overrides = {"vllm_lora_adapters": adapters_with(fx, "../beta", str(fx.adapters["beta"]))}
    result = deployment.play(**overrides)
    assert result.rc != 0 and needle in result.output, result.tail(40)
    assert_nothing_changed(deployment, text, state)


def test_new_weights_under_the_same_name_are_served(converged) -> None:  # type: ignore[no-untyped-def]
    deployment, text, _state = converged
    fx = deployment.fixtures
    swapped = [{"name": "alpha", "source": "controller", "path": str(fx.adapters["gamma"])},
               {"name": "beta", "source": "controller", "path": str(fx.adapters["beta"])}]
    result = deployment.play(vllm_lora_adapters=swapped)
    assert result.rc == 0, result.tail(80)
    assert alpha_answer(deployment.pool.hosts[0]) != text, "alpha still serves its old weights"
    restored = deployment.play()
    assert restored.rc == 0, restored.tail(80)
    assert alpha_answer(deployment.pool.hosts[0]) == text


def model_ids(host: TestHost) -> list[str]:
    return sorted(card["id"] for card in json.loads(host.sh("curl -sf http://127.0.0.1:8000/v1/models").stdout)["data"])


def test_runtime_updating_adds_and_removes_adapters_without_a_restart(converged) -> None:  # type: ignore[no-untyped-def]
    deployment, _text, _state = converged
    host = deployment.pool.hosts[0]
    # Runtime updating needs the API key on every listener; root's curl on the host sends it (~/.curlrc).
    live = {"vllm_allow_runtime_lora_updating": True, "vllm_api_key": "sk-adapters-live-0123456789"}
    host.sh("echo 'header = \"Authorization: Bearer sk-adapters-live-0123456789\"' > /root/.curlrc")
    switched = deployment.play(**live)  # a changed environment: this one restarts
    assert switched.rc == 0, switched.tail(80)
    start = host_state(host)[0]

    added = deployment.play(adapters=("alpha", "beta", "gamma"), **live)
    assert added.rc == 0, added.tail(80)
    assert host_state(host)[0] == start, "adding an adapter live must not restart the service"
    assert "gamma" in model_ids(host)
    assert "gamma" in [entry["adapter"] for entry in deployment.report()[host.name]["adapters"]]  # type: ignore[index]
    assert '\\"name\\":\\"gamma\\"' in host.sh("grep ExecStart= /etc/systemd/system/vllm.service").stdout

    removed = deployment.play(adapters=("alpha", "beta"), **live)
    assert removed.rc == 0, removed.tail(80)
    assert host_state(host)[0] == start
    body = json.dumps({"model": "gamma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    status = host.sh(f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Content-Type: application/json' "
                     f"-d {shlex.quote(body)} http://127.0.0.1:8000/v1/chat/completions").stdout
    assert status == "404"

    # Drift: an adapter loaded behind the deployer's back (by root, with the deployer's key) fails
    # the next verification.
    alpha_folder = host.sh("ls -d /srv/vllm/adapters/alpha@* | head -1").stdout.strip()  # stored by content
    host.sh("sed -n 's/^VLLM_ADMIN_KEY=/X-Vllm-Admin-Key: /p' /etc/vllm/vllm-admin.env"
            " | curl -sf -H @- -H 'Content-Type: application/json' -d "
            + shlex.quote(json.dumps({"lora_name": "stray", "lora_path": alpha_folder}))
            + " http://127.0.0.1:8000/v1/load_lora_adapter")
    drift = deployment.play("--tags", "verify", **live)
    assert drift.rc != 0 and "stray" in drift.output and "drift" in drift.output, drift.tail(40)

"""The access rules (plugins/filter/vllm_access.py), one case per rule, accepted and refused.

A case is written in role variables, as a user sets them; the test fills in the
role's defaults and hands the filter what tasks/preflight_access.yml hands it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.loader import REPO, load

access = load("plugins/filter/vllm_access.py", "vllm_access_filters")

# Distinctive: a hit in a message can only be a leak.
API_KEY = "sk-unitkey-6f1d0c9a7e"
HF_TOKEN = "hf_unittoken8b3e2a41d7"
SETTINGS = ("listen_host", "api_key", "hf_token", "allow_unauthenticated_network", "allow_runtime_lora_updating",
            "trust_remote_code", "extra_args", "environment", "allowed_origins", "hf_endpoint")
DEFAULTS: dict[str, Any] = yaml.safe_load((REPO / "roles/vllm/defaults/main.yml").read_text())


def errors_for(variables: dict[str, Any]) -> list[str]:
    merged = {**DEFAULTS, **variables}
    return access.vllm_access_errors({key: merged[f"vllm_{key}"] for key in SETTINGS})


def secrets_in(variables: dict[str, Any]) -> list[str]:
    """What no message may echo: key, token, the values in vllm_extra_args, secret-named environment values."""
    found = [str(variables.get("vllm_api_key", "")), str(variables.get("vllm_hf_token", ""))]
    for arg in map(str, variables.get("vllm_extra_args", [])):
        # Option names may be named back; values ("--x VALUE", "--x=VALUE") never.
        found.append(arg.partition("=")[2] if arg.startswith("--") else arg)
    found += [str(value) for name, value in variables.get("vllm_environment", {}).items()
              if access.SECRET_NAME.match(name)]
    return [secret for secret in found if secret]


# (id, role variables, None: accepted | substrings that ONE message must hold: the variable and the fix)
CASES: list[tuple[str, dict[str, Any], list[str] | None]] = [
    # -- listen address and key
    ("defaults", {}, None),
    ("loopback 127.0.1.1", {"vllm_listen_host": "127.0.1.1"}, None),
    ("loopback localhost", {"vllm_listen_host": "LocalHost"}, None),
    ("loopback ::1", {"vllm_listen_host": "::1"}, None),
    ("loopback [::1]", {"vllm_listen_host": "[::1]"}, None),
    ("network without key", {"vllm_listen_host": "0.0.0.0"},
     ['vllm_listen_host="0.0.0.0"', "vllm_api_key is empty", "Fix: set vllm_api_key",
      "vllm_allow_unauthenticated_network: true"]),
    ("network, IPv6, without key", {"vllm_listen_host": "::"}, ['vllm_listen_host="::"', "Fix: set vllm_api_key"]),
    ("all interfaces as empty host", {"vllm_listen_host": ""}, ['vllm_listen_host=""', "Fix: set vllm_api_key"]),
    ("a name that only starts like loopback", {"vllm_listen_host": "127.0.0.1.example.com"},
     ['vllm_listen_host="127.0.0.1.example.com"', "Fix: set vllm_api_key"]),
    ("network with key", {"vllm_listen_host": "0.0.0.0", "vllm_api_key": API_KEY}, None),
    ("network, named opt-out", {"vllm_listen_host": "0.0.0.0", "vllm_allow_unauthenticated_network": True}, None),
    ("network, opt-out as a string from -e", {"vllm_listen_host": "0.0.0.0", "vllm_allow_unauthenticated_network": "true"},
     None),
    # -- runtime adapter loading: the key on every listener
    ("runtime loading on loopback without key", {"vllm_allow_runtime_lora_updating": True},
     ["vllm_allow_runtime_lora_updating: true", 'vllm_listen_host="127.0.0.1"', "Fix: set vllm_api_key",
      "vllm_allow_runtime_lora_updating: false"]),
    ("runtime loading on ::1 without key", {"vllm_listen_host": "::1", "vllm_allow_runtime_lora_updating": "yes"},
     ['vllm_listen_host="::1"', "Fix: set vllm_api_key", "vllm_allow_runtime_lora_updating: false"]),
    ("runtime loading on loopback with key", {"vllm_allow_runtime_lora_updating": True, "vllm_api_key": API_KEY}, None),
    ("runtime loading on the network with key",
     {"vllm_listen_host": "0.0.0.0", "vllm_allow_runtime_lora_updating": True, "vllm_api_key": API_KEY}, None),
    ("opt-out plus runtime loading",
     {"vllm_listen_host": "10.1.2.3", "vllm_allow_unauthenticated_network": True, "vllm_allow_runtime_lora_updating": True},
     ["vllm_allow_runtime_lora_updating: true", 'vllm_listen_host="10.1.2.3"', "Fix: set vllm_api_key"]),
    ("runtime loading off, as a string", {"vllm_allow_runtime_lora_updating": "false"}, None),
    # -- vllm_extra_args
    ("--api-key", {"vllm_extra_args": ["--api-key", API_KEY]}, ["--api-key", "set vllm_api_key"]),
    ("--api-k= prefix", {"vllm_extra_args": [f"--api-k={API_KEY}"]}, ["--api-key", "set vllm_api_key"]),
    ("--api_key underscores", {"vllm_extra_args": ["--api_key", API_KEY]}, ["--api-key", "set vllm_api_key"]),
    ("--trust-remote-code", {"vllm_extra_args": ["--trust-remote-code"]},
     ["--trust-remote-code", "vllm_trust_remote_code: true"]),
    ("--trust_remote prefix", {"vllm_extra_args": ["--trust_remote"]}, ["--trust-remote-code", "vllm_trust_remote_code"]),
    ("--trust-remote-code, asked for", {"vllm_extra_args": ["--trust-remote-code"], "vllm_trust_remote_code": True}, None),
    ("--host", {"vllm_extra_args": ["--host", "192.0.2.7"]}, ["--host", "use vllm_listen_host / vllm_port"]),
    ("--ho prefix and --port=", {"vllm_extra_args": ["--ho", "192.0.2.7", "--port=9123"]},
     ["--ho and --port", "use vllm_listen_host / vllm_port"]),
    ("--uds", {"vllm_extra_args": ["--uds", "/run/vllm-x.sock"]}, ["--uds", "the role decides the listener"]),
    ("--ud= prefix", {"vllm_extra_args": ["--ud=/run/vllm-x.sock"]}, ["--uds", "the role decides the listener"]),
    ("--allowed-origins", {"vllm_extra_args": ["--allowed-origins", '["https://evil.example"]']},
     ["--allowed-origins", "vllm_allowed_origins"]),
    ("--allowed_methods", {"vllm_extra_args": ["--allowed_methods", '["DELETE"]']},
     ["--allowed-methods", "vllm_allowed_origins"]),
    ("--allowed-headers=", {"vllm_extra_args": ['--allowed-headers=["X-Evil"]']},
     ["--allowed-headers", "vllm_allowed_origins"]),
    ("--allow-credentials", {"vllm_extra_args": ["--allow-credentials"]}, ["--allow-credentials", "vllm_allowed_origins"]),
    ("--allowed-o prefix", {"vllm_extra_args": ['--allowed-o=["*"]']}, ["--allowed-o", "vllm_allowed_origins"]),
    ("harmless extra args", {"vllm_extra_args": ["--enforce-eager", "--max-num-seqs", "16", "--hostname-not-an-option"]},
     None),
    # -- vllm_environment
    ("HF_TOKEN", {"vllm_environment": {"HF_TOKEN": HF_TOKEN}}, ["vllm_environment.HF_TOKEN", "set vllm_hf_token"]),
    ("HUGGING_FACE_HUB_TOKEN", {"vllm_environment": {"HUGGING_FACE_HUB_TOKEN": HF_TOKEN}},
     ["vllm_environment.HUGGING_FACE_HUB_TOKEN", "set vllm_hf_token"]),
    ("VLLM_API_KEY", {"vllm_environment": {"VLLM_API_KEY": API_KEY}}, ["vllm_environment.VLLM_API_KEY", "set vllm_api_key"]),
    ("--config in extra args", {"vllm_extra_args": ["--config", "/etc/x.yaml"]}, ["--config", "role's variables"]),
    ("--conf= prefix in extra args", {"vllm_extra_args": ["--conf=/etc/x.yaml"]}, ["--config"]),
    ("hub mirror over http", {"vllm_hf_endpoint": "http://mirror.lan"}, ['vllm_hf_endpoint="http://mirror.lan"', "https://"]),
    ("hub mirror over https", {"vllm_hf_endpoint": "https://hub.mirror.lan:8443/hf"}, None),
    ("stand-in hub on the host itself", {"vllm_hf_endpoint": "http://127.0.0.1:18080"}, None),
    ("hub mirror with credentials", {"vllm_hf_endpoint": "https://u:p@mirror.lan"}, ["vllm_hf_endpoint", "user:password"]),
    ("VLLM_ADMIN_KEY", {"vllm_environment": {"VLLM_ADMIN_KEY": API_KEY}},
     ["vllm_environment.VLLM_ADMIN_KEY", "makes this key on the host itself"]),
    ("OPENAI_API_KEY", {"vllm_environment": {"OPENAI_API_KEY": API_KEY}},
     ["vllm_environment.OPENAI_API_KEY", "rename the variable if it is not secret"]),
    ("AWS_SECRET_ACCESS_KEY", {"vllm_environment": {"AWS_SECRET_ACCESS_KEY": API_KEY}},
     ["vllm_environment.AWS_SECRET_ACCESS_KEY", "rename the variable"]),
    ("harmless environment", {"vllm_environment": {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}}, None),
    ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", {"vllm_environment": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}},
     ["vllm_environment.VLLM_ALLOW_RUNTIME_LORA_UPDATING", "use vllm_allow_runtime_lora_updating"]),
    ("VLLM_SERVER_DEV_MODE on loopback", {"vllm_environment": {"VLLM_SERVER_DEV_MODE": "1"}},
     ['vllm_environment.VLLM_SERVER_DEV_MODE="1"', "/collective_rpc", "Fix: remove it"]),
    ("VLLM_SERVER_DEV_MODE on the network", {"vllm_listen_host": "0.0.0.0", "vllm_api_key": API_KEY,
                                             "vllm_environment": {"VLLM_SERVER_DEV_MODE": "1"}},
     ["vllm_environment.VLLM_SERVER_DEV_MODE", "Fix: remove it"]),
    ("FORWARDED_ALLOW_IPS", {"vllm_environment": {"FORWARDED_ALLOW_IPS": "*"}},
     ['vllm_environment.FORWARDED_ALLOW_IPS="*"', "X-Forwarded-For", "Fix: remove it", "reverse proxy"]),
    ("VLLM_LORA_RESOLVER_CACHE_DIR", {"vllm_environment": {"VLLM_LORA_RESOLVER_CACHE_DIR": "/srv/cache"}},
     ['vllm_environment.VLLM_LORA_RESOLVER_CACHE_DIR="/srv/cache"', "declare the adapters in vllm_lora_adapters"]),
    ("VLLM_PLUGINS", {"vllm_environment": {"VLLM_PLUGINS": "lora_filesystem_resolver"}},
     ['vllm_environment.VLLM_PLUGINS="lora_filesystem_resolver"', "declare the adapters in vllm_lora_adapters"]),
    ("VLLM_HOST_IP", {"vllm_environment": {"VLLM_HOST_IP": "192.0.2.9"}},
     ['vllm_environment.VLLM_HOST_IP="192.0.2.9"', "internal listeners", "Fix: remove it"]),
    ("VLLM_PORT", {"vllm_environment": {"VLLM_PORT": "29555"}},
     ['vllm_environment.VLLM_PORT="29555"', "internal listeners", "Fix: remove it"]),
    ("MASTER_ADDR", {"vllm_environment": {"MASTER_ADDR": "192.0.2.9"}},
     ["vllm_environment.MASTER_ADDR", "internal listeners", "Fix: remove it"]),
    ("MASTER_PORT", {"vllm_environment": {"MASTER_PORT": "29500"}},
     ["vllm_environment.MASTER_PORT", "internal listeners", "Fix: remove it"]),
    ("GLOO_SOCKET_IFNAME", {"vllm_environment": {"GLOO_SOCKET_IFNAME": "eth0"}},
     ['vllm_environment.GLOO_SOCKET_IFNAME="eth0"', "internal listeners", "Fix: remove it"]),
    ("the access guard's own settings", {"vllm_environment": {"VLLM_GUARD_ALLOWED_ORIGINS": '["*"]'}},
     ["vllm_environment.VLLM_GUARD_ALLOWED_ORIGINS=", "access guard", "Fix: remove it", "vllm_allowed_origins"]),
    # -- secrets an environment file cannot carry
    ("key with whitespace", {"vllm_api_key": "two words"}, ["vllm_api_key contains whitespace", "Fix: use a key"]),
    ("key with a dollar", {"vllm_api_key": "sk-$HOME-x"}, ["vllm_api_key contains", "Fix: use a key"]),
    ("token with a quote", {"vllm_hf_token": 'hf_"quoted"'}, ["vllm_hf_token contains", "Fix: paste the token"]),
    ("key and token an env file carries", {"vllm_api_key": "sk-A.b_c~d+e/f=g:h", "vllm_hf_token": HF_TOKEN}, None),
    # -- vllm_allowed_origins
    ("CORS closed", {"vllm_allowed_origins": []}, None),
    ("CORS for exact origins", {"vllm_allowed_origins": ["https://app.example.com", "http://127.0.0.1:3000",
                                                         "http://[::1]:8080", "http://localhost"]}, None),
    ("CORS for any origin", {"vllm_allowed_origins": ["*"]},
     ['vllm_allowed_origins[0]="*"', "list the exact origins of the web pages that may call the API"]),
    ("origin with a trailing slash", {"vllm_allowed_origins": ["https://app.example.com/"]},
     ['vllm_allowed_origins[0]="https://app.example.com/"', "no path", "list the exact origins"]),
    ("origin with a path", {"vllm_allowed_origins": ["https://app.example.com", "https://app.example.com/ui"]},
     ['vllm_allowed_origins[1]="https://app.example.com/ui"', "list the exact origins"]),
    ("origin without a scheme", {"vllm_allowed_origins": ["app.example.com"]},
     ['vllm_allowed_origins[0]="app.example.com"', "scheme http or https"]),
    ("origin with another scheme", {"vllm_allowed_origins": ["ftp://app.example.com"]},
     ['vllm_allowed_origins[0]="ftp://app.example.com"', "scheme http or https"]),
    ("origin in capitals", {"vllm_allowed_origins": ["https://App.example.com"]},
     ['vllm_allowed_origins[0]="https://App.example.com"', "lowercase"]),
    ("origin with a bad port", {"vllm_allowed_origins": ["https://app.example.com:99999"]},
     ['vllm_allowed_origins[0]="https://app.example.com:99999"', "list the exact origins"]),
    ("origin null", {"vllm_allowed_origins": ["null"]}, ['vllm_allowed_origins[0]="null"', "list the exact origins"]),
]


def check(messages: list[str], variables: dict[str, Any], expected: list[str] | None) -> list[str]:
    """What is wrong with `messages` for this case (empty: right). Also used to run
    the cases against other implementations of the rules."""
    problems = [f"a message echoes a secret: {message}" for message in messages
                for secret in secrets_in(variables) if secret in message]
    if expected is None:
        problems += [f"refused: {message}" for message in messages]
    elif not any(all(text in message for text in expected) for message in messages):
        problems.append(f"no message holds all of {expected}: {messages}")
    return problems


@pytest.mark.parametrize(("variables", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_rule(variables: dict[str, Any], expected: list[str] | None) -> None:
    assert check(errors_for(variables), variables, expected) == []


def test_every_rule_at_once_never_echoes_a_secret() -> None:
    variables = {
        "vllm_listen_host": "0.0.0.0", "vllm_api_key": f"{API_KEY} x", "vllm_hf_token": f"{HF_TOKEN}$",
        "vllm_allow_runtime_lora_updating": True,
        "vllm_extra_args": ["--api-key", API_KEY, f"--api-k={API_KEY}", "--host", API_KEY, f"--port={HF_TOKEN}",
                            "--uds", HF_TOKEN, f"--allowed-origins={API_KEY}", "--trust-remote-code"],
        "vllm_environment": {"HF_TOKEN": HF_TOKEN, "VLLM_API_KEY": API_KEY, "MY_PASSWORD": API_KEY,
                             "VLLM_SERVER_DEV_MODE": "1", "FORWARDED_ALLOW_IPS": "*"},
        "vllm_allowed_origins": ["*"],
    }
    messages = errors_for(variables)
    assert len(messages) >= 12, messages
    joined = "\n".join(messages)
    assert API_KEY not in joined and HF_TOKEN not in joined


def e2e_access_cases() -> list[tuple[str, dict[str, Any], list[str] | None]]:
    """ACCESS_CASES of the controller-only e2e test (run there through Ansible),
    evaluated here with its own API_KEY / HF_TOKEN names bound to ours."""
    source = (REPO / "tests/e2e/test_security_faults.py").read_text()
    node = next(statement for statement in ast.parse(source).body
                if isinstance(statement, ast.AnnAssign) and getattr(statement.target, "id", "") == "ACCESS_CASES")
    assert node.value is not None
    value = eval(compile(ast.Expression(node.value), "ACCESS_CASES", "eval"),  # noqa: S307 - our own test data
                 {"__builtins__": {}}, {"API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN})
    return list(value)


@pytest.mark.parametrize(("variables", "expected"), [case[1:] for case in e2e_access_cases()],
                         ids=[case[0] for case in e2e_access_cases()])
def test_e2e_access_cases(variables: dict[str, Any], expected: list[str] | None) -> None:
    messages = errors_for(variables)
    assert not [secret for secret in (API_KEY, HF_TOKEN) if secret in "\n".join(messages)]
    if expected is None:
        assert messages == []
    else:
        failure = "\n".join(messages)
        assert [text for text in expected if text not in failure] == [], failure


def test_the_task_file_hands_every_setting_to_the_filter() -> None:
    tasks = yaml.safe_load((REPO / "roles/vllm/tasks/preflight_access.yml").read_text())
    assert [task["name"] for task in tasks] == [
        "Check the access rules (listen address, API key, remote code, secrets off the command line)"]
    expression = tasks[0]["vars"]["__vllm_access_errors"]
    assert "| inference.vllm_lora.vllm_access_errors" in expression
    assert [key for key in SETTINGS if f"'{key}': vllm_{key}" not in expression] == []
    assert "vllm_access_errors" in access.FilterModule().filters()


def test_new_variable_is_declared() -> None:
    assert DEFAULTS["vllm_allowed_origins"] == []
    specs = yaml.safe_load(Path(REPO / "roles/vllm/meta/argument_specs.yml").read_text())["argument_specs"]
    assert specs["main"]["options"]["vllm_allowed_origins"]["elements"] == "str"

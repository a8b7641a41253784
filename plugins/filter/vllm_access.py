"""Who may talk to the service, and what it may be told to do: the access rules
that tasks/preflight_access.yml asserts before anything on the host changes.

Kept here, in plain typed Python, so every rule is unit-tested without a host.
Each message names the variable, its value where that is not secret, and the
fix. No message echoes a secret: not the key, not the token, not a value of
vllm_extra_args (it may hold one), not a value of a secret-looking name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

LOOPBACK_NAMES = ("localhost", "::1", "[::1]")
LOOPBACK_V4 = re.compile(r"127[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}")
# HF_TOKEN, VLLM_API_KEY, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, ...; not TOKENIZERS_PARALLELISM.
SECRET_NAME = re.compile(r"(?i)^(.*(SECRET|PASSWORD|PASSWD|CREDENTIAL).*|(.*_)?(TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY))$")
# Characters an EnvironmentFile= line cannot carry verbatim.
BAD_SECRET_CHAR = re.compile(r"[\s\"'\\$`]")
# What a browser sends in the Origin header (lowercase), which Starlette's
# CORS middleware compares verbatim: a path or a capital letter never matches.
ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:(?P<port>[0-9]{1,5}))?")
# Secrets the role carries itself, off the unit, by the name the software
# reads them under: the role variable to set instead, and where it goes.
SECRET_SETTINGS = {
    "VLLM_API_KEY": "vllm_api_key (from ansible-vault; the role writes it to the 0600 environment file)",
    "HF_TOKEN": "vllm_hf_token (from ansible-vault; the role keeps it in a root-only file for downloads)",
    "HUGGING_FACE_HUB_TOKEN": "vllm_hf_token (from ansible-vault; the role keeps it in a root-only file for downloads)",
    # The deployer's key for the runtime adapter endpoints: made on the host, never declared.
    "VLLM_ADMIN_KEY": "nothing in its place: the role makes this key on the host itself (root-only), for the deployer alone",
}
# Option names of `vllm serve` that vllm_extra_args may not carry.
CORS_OPTIONS = ("--allowed-origins", "--allowed-methods", "--allowed-headers", "--allow-credentials")
# vllm_environment names that would quietly undo a guard of the role: the
# text after "vllm_environment.NAME=value: ", with the fix.
GUARD_DEFEATING = {
    "VLLM_SERVER_DEV_MODE": (
        "dev mode adds /sleep, /reset_prefix_cache and /collective_rpc, which vLLM does not protect with the"
        " API key; behind the local proxy every client looks like loopback, so no listen address keeps them"
        " private. Fix: remove it from vllm_environment."
    ),
    "FORWARDED_ALLOW_IPS": (
        "uvicorn would trust X-Forwarded-For from those addresses, so any client could claim to be loopback"
        " and pass the loopback-only guards. Fix: remove it; the role's local proxy is the only front the"
        " service trusts (put a reverse proxy in front of the API port instead)."
    ),
    "VLLM_LORA_RESOLVER_CACHE_DIR": (
        "it registers vLLM's filesystem LoRA resolver: with runtime updating, a request whose `model` names"
        " an unknown adapter makes vLLM load that name from the folder (e.g. ../../srv/x: any directory the"
        " service can read), past the role's adapter checks. Fix: remove it and declare the adapters in"
        " vllm_lora_adapters."
    ),
    "VLLM_PLUGINS": (
        "it chooses which vLLM plugins load, LoRA resolvers among them: with runtime updating a resolver loads"
        " any adapter a request's `model` names (e.g. ../../srv/x), past the role's adapter checks. Fix:"
        " remove it and declare the adapters in vllm_lora_adapters."
    ),
    **{
        name: (
            "the role pins the engine's internal listeners (unauthenticated torch.distributed and ZMQ,"
            " pickled data) inside the service's private network; this would move them. Fix: remove it from"
            " vllm_environment."
        )
        for name in ("VLLM_HOST_IP", "VLLM_PORT", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    },
}
# The shipped access guard reads its settings from VLLM_GUARD_* lines of the
# unit; a vllm_environment line comes later in the unit and would win.
GUARD_SETTINGS_PREFIX = "VLLM_GUARD_"
TRUE_WORDS = frozenset(("y", "yes", "on", "1", "true", "t"))


def _bool(value: Any) -> bool:
    """Ansible's `| bool`: settings may arrive as strings from -e."""
    if isinstance(value, str):
        return value.strip().lower() in TRUE_WORDS
    return value is True or (isinstance(value, (int, float)) and value == 1)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_NAMES or LOOPBACK_V4.fullmatch(host) is not None


def _option_names(extra_args: Iterable[Any]) -> list[str]:
    """Option names in vllm_extra_args as argparse sees them: vLLM accepts any
    unambiguous prefix (--api-k, --trust-remote) and '_' for '-'."""
    return [
        _text(arg).split("=", 1)[0].replace("_", "-")
        for arg in extra_args
        if re.match(r"--[A-Za-z]", _text(arg))
    ]


def _given_as(flags: list[str], *options: str) -> list[str]:
    """The flags (as typed) that argparse reads as one of `options`, each once.
    A flag here is a prefix of a known option name, so echoing it reveals nothing."""
    found: list[str] = []
    for option in options:
        found += [flag for flag in flags if option.startswith(flag) and flag not in found]
    return found


def _listener_errors(host: str, loopback: bool, has_key: bool, opt_out: bool, runtime_updating: bool) -> list[str]:
    errors: list[str] = []
    if not loopback and not has_key and not opt_out:
        errors.append(
            f"vllm_listen_host={json.dumps(host)} is not a loopback address and vllm_api_key is empty: anyone who"
            " can reach the port could use the model without a key. Fix: set vllm_api_key (from ansible-vault), or"
            " listen on 127.0.0.1, or, only behind another authenticating layer, set"
            " vllm_allow_unauthenticated_network: true."
        )
    if runtime_updating and not has_key:
        errors.append(
            f"vllm_allow_runtime_lora_updating: true with vllm_listen_host={json.dumps(host)} and no vllm_api_key"
            " would let anyone who reaches the port make the server load files from its disk. Behind the local"
            " proxy every client looks like loopback, and even a loopback listener without a key lets any local"
            " process, or any web page open in a browser on the host, swap the adapters. Fix: set vllm_api_key"
            " (from ansible-vault), or set vllm_allow_runtime_lora_updating: false."
        )
    return errors


def _extra_args_errors(flags: list[str], trust_remote_code: bool) -> list[str]:
    errors: list[str] = []
    if _given_as(flags, "--api-key"):
        errors.append(
            "vllm_extra_args contains --api-key (or a prefix of it, which vLLM reads as the same option):"
            " a key on the command line is visible to every local user (ps, /proc/*/cmdline), in"
            " `systemctl show` and in the journal. Fix: remove it from vllm_extra_args and set"
            " vllm_api_key (the role writes it to the 0600 environment file)."
        )
    if _given_as(flags, "--trust-remote-code") and not trust_remote_code:
        errors.append(
            "vllm_extra_args contains --trust-remote-code (or a prefix of it): it runs Python code"
            " shipped with the model or tokenizer. Fix: remove it, or set vllm_trust_remote_code: true"
            " if you have reviewed that code."
        )
    host_flags = _given_as(flags, "--host", "--port")
    if host_flags:
        errors.append(
            f"vllm_extra_args contains {' and '.join(host_flags)}"
            " (vLLM reads a prefix as --host / --port): it would override the listen address this"
            " check approved. Fix: use vllm_listen_host / vllm_port instead."
        )
    if _given_as(flags, "--uds"):
        errors.append(
            "vllm_extra_args contains --uds (or a prefix of it): vLLM would listen on a Unix socket instead of"
            " the address this check approved. Fix: remove it; the role decides the listener"
            " (vllm_listen_host / vllm_port)."
        )
    if _given_as(flags, "--config"):
        errors.append(
            "vllm_extra_args contains --config (or a prefix of it): a YAML file of vllm serve options could set"
            " the listener, the API key, CORS or middlewares past every check here. Fix: remove it and declare"
            " the settings with the role's variables (or as separate vllm_extra_args words)."
        )
    cors_flags = _given_as(flags, *CORS_OPTIONS)
    if cors_flags:
        errors.append(
            f"vllm_extra_args contains {' and '.join(cors_flags)} (vLLM reads a prefix as the full option:"
            f" {', '.join(CORS_OPTIONS)}): it would override the CORS policy the role sets, which decides"
            " which web pages may call the API from a visitor's browser. Fix: remove it and list the exact"
            " origins of those pages in vllm_allowed_origins."
        )
    return errors


def _shown(environment: dict[Any, Any], name: str) -> str:
    """name=value of a variable whose fixed name says it is not secret (and
    vllm_environment lands in the world-readable unit anyway): the value helps the fix."""
    return f"vllm_environment.{name}={json.dumps(_text(environment.get(name, '')))}"


def _environment_errors(environment: dict[Any, Any]) -> list[str]:
    errors: list[str] = []
    names = [_text(name) for name in environment]
    for name in names:
        if name in SECRET_SETTINGS:
            errors.append(
                f"vllm_environment.{name} looks like a secret: vllm_environment goes into the unit file (mode 0644)"
                f" and `systemctl show`. Fix: remove it and set {SECRET_SETTINGS[name]}."
            )
        elif SECRET_NAME.match(name):
            errors.append(
                f"vllm_environment.{name} looks like a secret: vllm_environment goes into the unit file (mode 0644)"
                " and `systemctl show`. Fix: use vllm_api_key / vllm_hf_token (0600 environment file), or rename"
                " the variable if it is not secret."
            )
    if "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in names:
        errors.append(
            "vllm_environment.VLLM_ALLOW_RUNTIME_LORA_UPDATING: use vllm_allow_runtime_lora_updating"
            " instead, so the access check sees it."
        )
    errors += [f"{_shown(environment, name)}: {why}" for name, why in GUARD_DEFEATING.items() if name in names]
    errors += [
        f"{_shown(environment, name)}: the role sets it for the shipped access guard, and this line would"
        " override it. Fix: remove it from vllm_environment; set vllm_allowed_origins or vllm_lora_adapters"
        " instead."
        for name in names
        if name.startswith(GUARD_SETTINGS_PREFIX)
    ]
    return errors


def _origin_errors(origins: Iterable[Any]) -> list[str]:
    errors: list[str] = []
    for index, origin in enumerate(origins):
        value = _text(origin)
        where = f"vllm_allowed_origins[{index}]={json.dumps(value)}"
        if value == "*":
            errors.append(
                f"{where}: \"*\" lets any web page, on any site, call the API from the browser of anyone who"
                " can reach it. Fix: list the exact origins of the web pages that may call the API"
                " (e.g. https://app.example.com)."
            )
            continue
        match = ORIGIN.fullmatch(value)
        if match is None or not 0 < int(match.group("port") or 80) <= 65535:
            errors.append(
                f"{where} is not an origin: write scheme://host[:port], lowercase, with scheme http or https and"
                " no path or trailing slash, as a browser sends it in the Origin header. Fix: list the exact"
                " origins of the web pages that may call the API (e.g. https://app.example.com)."
            )
    return errors


def _hf_endpoint_errors(endpoint: str) -> list[str]:
    """The hub (mirror) the token is sent to: over TLS, or to this host itself; no credentials in the URL
    (the endpoint is in the download task's environment, which is on the remote command line)."""
    if not endpoint:
        return []
    match = re.fullmatch(r"(?P<scheme>https?)://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[^\s@]*)?", endpoint)
    host = (match.group("host").strip("[]") if match else "")
    if match is None or (match.group("scheme") == "http" and not _is_loopback(host)):
        return [
            f"vllm_hf_endpoint={json.dumps(endpoint)}: the hub token is sent there. Fix: an https:// URL of the hub"
            " mirror, without user:password (http:// only to this host itself, e.g. a local tunnel), or \"\" for"
            " huggingface.co."
        ]
    return []


def vllm_access_errors(settings: dict[str, Any]) -> list[str]:
    """Every broken access rule, one message each. Empty list: fine.

    Keys: listen_host, api_key, hf_token, allow_unauthenticated_network,
    allow_runtime_lora_updating, trust_remote_code, extra_args, environment,
    allowed_origins, hf_endpoint.
    """
    host = _text(settings.get("listen_host"))
    api_key = _text(settings.get("api_key"))
    hf_token = _text(settings.get("hf_token"))
    errors = _listener_errors(
        host,
        loopback=_is_loopback(host),
        has_key=len(api_key) > 0,
        opt_out=_bool(settings.get("allow_unauthenticated_network", False)),
        runtime_updating=_bool(settings.get("allow_runtime_lora_updating", False)),
    )
    errors += _extra_args_errors(
        _option_names(settings.get("extra_args") or []), _bool(settings.get("trust_remote_code", False))
    )
    errors += _environment_errors(dict(settings.get("environment") or {}))
    if BAD_SECRET_CHAR.search(api_key):
        errors.append(
            "vllm_api_key contains whitespace, a quote, a backslash, \"$\" or \"`\": the 0600 environment file"
            " cannot carry it verbatim. Fix: use a key of letters, digits and -._~+/=:"
        )
    if BAD_SECRET_CHAR.search(hf_token):
        errors.append(
            "vllm_hf_token contains whitespace, a quote, a backslash, \"$\" or \"`\": the root-only token file"
            " would not carry it verbatim. Fix: paste the token exactly as the hub shows it."
        )
    errors += _origin_errors(settings.get("allowed_origins") or [])
    errors += _hf_endpoint_errors(_text(settings.get("hf_endpoint")))
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"vllm_access_errors": vllm_access_errors}

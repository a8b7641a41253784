#!/usr/bin/python
"""Ansible module: prove a running vLLM 0.11 serves each declared LoRA adapter.

Why: vLLM answers with the BASE model whenever an adapter is not selected
(e.g. an ignored ``lora_name`` field), and that looks like success. A 200 from
``/v1/models`` or from a chat request proves nothing; only an answer that
differs from the base model's, at temperature 0, shows the adapter is applied.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vllm_verify
short_description: Prove that a vLLM OpenAI server applies its LoRA adapters
description:
  - Reads C(/v1/models) and checks that the base model card exists and that every
    declared adapter has a card whose C(parent) is the base model.
  - Fails on adapters that are served but not declared (drift), unless allowed.
  - Sends one chat request to the base model and one per adapter at temperature 0
    with a fixed seed. Each adapter must answer with HTTP 200, name itself in the
    response C(model), and give text different from the base model's text.
  - With O(lora_name_compat), also proves the server honours the C(lora_name)
    request field (see the role's C(vllm_lora_name_compat) middleware), and that
    an unknown C(lora_name) gets HTTP 404 instead of a silent base-model answer.
  - Only reads; never changes the server. Runs on the target host and needs no
    Python package beyond the standard library.
options:
  url:
    description: Base URL of the server, without C(/v1).
    type: str
    required: true
  api_key:
    description: API key, sent as a Bearer token in C(Authorization); omit if the server has none.
    type: str
    required: false
  base_model:
    description: Served name of the base model the adapters hang off.
    type: str
    required: true
  adapters:
    description: Served names of the adapters expected on the server.
    type: list
    elements: str
    default: []
  prompt:
    description:
      - User message sent to every model. Pick one the adapters answer differently
        from the base model, because an adapter that changes nothing for this
        prompt fails the check.
    type: str
    default: "Write one short sentence about the sea."
  max_tokens:
    description: Tokens generated per request.
    type: int
    default: 16
  seed:
    description: Sampling seed sent with every request (temperature is always 0).
    type: int
    default: 0
  lora_name_compat:
    description: Also prove the C(lora_name) request field selects the adapter.
    type: bool
    default: false
  timeout:
    description: Seconds allowed for each HTTP request.
    type: float
    default: 60
  allow_undeclared_adapters:
    description: Do not fail when the server serves adapters that are not in O(adapters).
    type: bool
    default: false
author:
  - vllm-lora-ansible (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Prove every declared adapter is applied
  vllm_verify:
    url: "http://127.0.0.1:{{ vllm_port }}"
    api_key: "{{ vllm_api_key | default(omit) }}"
    base_model: "{{ vllm_served_model_name }}"
    adapters: "{{ vllm_lora_adapters | map(attribute='name') | list }}"
    lora_name_compat: "{{ vllm_lora_name_compat }}"
"""

RETURN = r"""
models:
  description: Ids of all cards in C(/v1/models).
  returned: when /v1/models answered
  type: list
  elements: str
  sample: [tiny, alpha, beta]
base_text:
  description: The base model's answer to the prompt.
  returned: when the base request answered
  type: str
results:
  description: One entry per declared adapter.
  returned: when the base request answered
  type: list
  elements: dict
  contains:
    adapter: {description: Adapter name., type: str}
    status: {description: HTTP status of the C(model=adapter) request., type: int}
    model: {description: C(model) in the response., type: str}
    text: {description: The adapter's answer., type: str}
    differs_from_base: {description: The answer differs from RV(base_text)., type: bool}
    lora_name_ok:
      description: The C(lora_name) request gave the same answer; null when not checked.
      type: bool
problems:
  description: One message per failed check (the same text as C(msg)).
  returned: on failure
  type: list
  elements: str
  sample: ["adapter 'alpha': answer identical to the base model's ('...'): the adapter is not applied"]
lora_name_unknown_status:
  description: HTTP status for a C(lora_name) naming no adapter (must be 404).
  returned: when O(lora_name_compat) is true
  type: int
"""

import json
import urllib.error
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

# (method, path, payload) -> (HTTP status, parsed JSON body or raw text)
Http = Callable[[str, str, Optional[dict]], "tuple[int, Any]"]

UNKNOWN_ADAPTER = "vllm-verify-no-such-adapter"
_SHOWN = 80  # characters of an answer quoted in a message


@dataclass
class AdapterResult:
    adapter: str
    status: int
    model: Optional[str]
    text: Optional[str]
    differs_from_base: bool
    lora_name_ok: Optional[bool] = None


class VerifyError(Exception):
    """A check failed in a way that makes the remaining checks meaningless."""

    def __init__(self, message: str, facts: Optional[dict] = None) -> None:
        super().__init__(message)
        self.facts = facts or {}


def quote(text: Optional[str]) -> str:
    """Short, single-line rendering of an answer for messages."""
    if text is None:
        return "no text"
    flat = json.dumps(text)[1:-1]
    return "'" + (flat if len(flat) <= _SHOWN else flat[:_SHOWN] + "...") + "'"


def card_problems(cards: list[dict], base_model: str, adapters: list[str],
                  allow_undeclared: bool) -> list[str]:
    """Compare /v1/models with the declaration; one message per mismatch."""
    by_id = {str(card.get("id")): card for card in cards}
    problems: list[str] = []
    base = by_id.get(base_model)
    if base is None:
        problems.append(f"base model '{base_model}' is not served "
                        f"(served: {sorted(by_id)})")
    elif base.get("parent") is not None:
        problems.append(f"'{base_model}' is an adapter of '{base.get('parent')}', "
                        "not a base model")
    for name in adapters:
        card = by_id.get(name)
        if card is None:
            problems.append(f"adapter '{name}': not served (no card in /v1/models)")
        elif card.get("parent") != base_model:
            problems.append(f"adapter '{name}': its parent is '{card.get('parent')}', "
                            f"expected '{base_model}'")
    if not allow_undeclared:
        declared = set(adapters)
        for card_id, card in by_id.items():
            if (card.get("parent") is not None and card_id not in declared
                    and card_id != base_model):
                problems.append(f"adapter '{card_id}': served but not declared "
                                "(drift; remove it or declare it)")
    return problems


def chat_payload(model: str, prompt: str, max_tokens: int, seed: int,
                 lora_name: Optional[str] = None) -> dict:
    """Greedy, seeded request: the same model must give the same text."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": seed,
    }
    if lora_name is not None:
        payload["lora_name"] = lora_name
    return payload


def answer_text(body: Any) -> Optional[str]:
    """The first choice's message text, or None if the body is not a chat answer."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else ""


def error_message(body: Any) -> str:
    """vLLM's error text (``{"error": {"message": ...}}`` or ``{"error": "..."}``)."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
    return quote(str(body))


def adapter_problems(result: AdapterResult, base_text: str) -> list[str]:
    """Why one adapter's answer does not prove the adapter is applied."""
    name = result.adapter
    if result.status != 200:
        return [f"adapter '{name}': HTTP {result.status} ({result.text})"]
    problems: list[str] = []
    if result.model != name:
        problems.append(f"adapter '{name}': the response names model "
                        f"'{result.model}', not the adapter")
    if result.text is None:
        problems.append(f"adapter '{name}': the response has no chat answer")
    elif not result.differs_from_base:
        problems.append(f"adapter '{name}': answer identical to the base model's "
                        f"({quote(base_text)}): the adapter is not applied")
    return problems


def lora_name_problems(name: str, status: int, model: Optional[str],
                       text: Optional[str], adapter_text: Optional[str],
                       base_text: str) -> list[str]:
    """Why a ``{"model": base, "lora_name": name}`` answer is not the adapter's."""
    prefix = f"adapter '{name}' via lora_name"
    if status != 200:
        return [f"{prefix}: HTTP {status} ({text})"]
    if text == base_text and text != adapter_text:
        return [f"{prefix}: answered by '{model}' with the base model's text "
                f"({quote(text)}): lora_name is ignored"]
    problems: list[str] = []
    if text != adapter_text:
        problems.append(f"{prefix}: answer {quote(text)} differs from the "
                        f"model='{name}' answer {quote(adapter_text)}")
    if model != name:
        problems.append(f"{prefix}: the response names model '{model}'")
    return problems


def unknown_lora_name_problems(name: str, status: int, body: Any) -> list[str]:
    """An unknown adapter must be an error, never a base-model answer."""
    if status == 404:
        return []
    if status == 200:
        return [f"lora_name '{name}' (no such adapter) was answered with "
                f"HTTP 200 ({quote(answer_text(body))}): unknown adapters "
                "fall back to the base model"]
    return [f"lora_name '{name}' (no such adapter): HTTP {status} "
            f"({error_message(body)}), expected 404"]


def unused_name(taken: list[str]) -> str:
    """A name that is certainly not an adapter on this server."""
    name = UNKNOWN_ADAPTER
    while name in taken:
        name += "-x"
    return name


def fail_message(problems: list[str]) -> str:
    return "vLLM verification failed: " + "; ".join(problems)


def unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def run(params: dict, http: Http) -> tuple[dict, list[str]]:
    """All checks; returns (facts for the result, problems). Empty problems: pass."""
    base_model: str = params["base_model"]
    adapters = unique(list(params.get("adapters") or []))
    facts: dict[str, Any] = {}

    def ask(model: str, lora_name: Optional[str] = None) -> tuple[int, Any]:
        payload = chat_payload(model, params["prompt"], params["max_tokens"],
                               params["seed"], lora_name)
        try:
            return http("POST", "/v1/chat/completions", payload)
        except VerifyError as exc:  # say which request, keep what is known
            what = f"lora_name '{lora_name}'" if lora_name else f"model '{model}'"
            raise VerifyError(f"chat request for {what}: {exc}", facts) from exc

    status, body = http("GET", "/v1/models", None)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise VerifyError(f"GET /v1/models: HTTP {status} ({error_message(body)})")
    cards: list[dict] = [c for c in body["data"] if isinstance(c, dict)]
    facts["models"] = [str(c.get("id")) for c in cards]
    problems = card_problems(cards, base_model, adapters,
                             params["allow_undeclared_adapters"])

    status, body = ask(base_model)
    base_text = answer_text(body)
    if status != 200 or base_text is None:
        raise VerifyError(f"base model '{base_model}': HTTP {status} "
                          f"({error_message(body)})", facts)
    facts["base_text"] = base_text

    facts["results"] = []
    for name in adapters:
        status, body = ask(name)
        text = answer_text(body) if status == 200 else error_message(body)
        differs = status == 200 and text is not None and text != base_text
        result = AdapterResult(
            adapter=name, status=status,
            model=body.get("model") if isinstance(body, dict) else None,
            text=text, differs_from_base=differs)
        problems += adapter_problems(result, base_text)
        if params["lora_name_compat"]:
            lstatus, lbody = ask(base_model, name)
            ltext = answer_text(lbody) if lstatus == 200 else error_message(lbody)
            lmodel = lbody.get("model") if isinstance(lbody, dict) else None
            lproblems = lora_name_problems(name, lstatus, lmodel, ltext,
                                           result.text, base_text)
            result.lora_name_ok = not lproblems and result.differs_from_base
            problems += lproblems
        facts["results"].append(asdict(result))

    if params["lora_name_compat"]:
        unknown = unused_name(facts["models"])
        status, body = ask(base_model, unknown)
        facts["lora_name_unknown_status"] = status
        problems += unknown_lora_name_problems(unknown, status, body)
    return facts, problems


def urllib_http(url: str, api_key: Optional[str], timeout: float) -> Http:
    """HTTP through urllib (Ansible's open_url); error statuses are returned, not raised."""
    root = url.rstrip("/")

    def call(method: str, path: str, payload: Optional[dict]) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            # use_netrc=False: a ~/.netrc entry must not replace the Authorization header.
            with open_url(root + path, data=data, headers=headers, method=method, timeout=timeout,
                          use_netrc=False) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise VerifyError(f"{method} {root}{path}: {reason}") from exc
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    return call


ARGUMENT_SPEC: dict[str, Any] = {
    "url": {"type": "str", "required": True},
    "api_key": {"type": "str", "no_log": True},
    "base_model": {"type": "str", "required": True},
    "adapters": {"type": "list", "elements": "str", "default": []},
    "prompt": {"type": "str", "default": "Write one short sentence about the sea."},
    "max_tokens": {"type": "int", "default": 16, "no_log": False},  # a token count, not a secret
    "seed": {"type": "int", "default": 0},
    "lora_name_compat": {"type": "bool", "default": False},
    "timeout": {"type": "float", "default": 60},
    "allow_undeclared_adapters": {"type": "bool", "default": False},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    http = urllib_http(params["url"], params["api_key"], params["timeout"])
    try:
        facts, problems = run(params, http)
    except VerifyError as exc:
        module.fail_json(msg=f"vLLM verification failed: {exc}", problems=[str(exc)],
                         changed=False, **exc.facts)
    if problems:
        module.fail_json(msg=fail_message(problems), problems=problems,
                         changed=False, **facts)
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()

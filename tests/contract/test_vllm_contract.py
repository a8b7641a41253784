"""What this project relies on from vLLM 0.11.0, checked against the real server.

Each test pins one statement of /work/shared/VLLM-0.11-FACTS.md (or a behaviour
seen while checking them) on a real ``vllm serve`` (the CPU build of the same
source) with the tiny Qwen2 fixtures. Texts are compared with texts the server
produced (temperature 0, fixed prompt), never with constants, and identical
requests are repeated first so that "differs" means the adapter, not noise.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.fixtures.tinyqwen import Fixtures
from tests.vllm_cpu.server import FailedStart, ServerError

if TYPE_CHECKING:  # pytest imports the conftest itself; importing it again would duplicate it
    from tests.contract.conftest import Live

pytestmark = pytest.mark.vllm

SERVED_NAME = "tinyqwen"
"""The --served-model-name the conftest uses (checked against the fixture in ``texts``)."""
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
IGNORED_WARNING = "The following fields were present in the request but ignored: {'lora_name'}"


def chat(live: Live, model: str | None, **extra: object) -> httpx.Response:
    body: dict[str, object] = {"messages": MESSAGES, "temperature": 0, "max_tokens": 16, **extra}
    if model is not None:
        body["model"] = model
    return live.client.post("/v1/chat/completions", json=body)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def load(live: Live, name: str, path: Path | str) -> httpx.Response:
    return live.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(live: Live, name: str) -> httpx.Response:
    return live.client.post("/v1/unload_lora_adapter", json={"lora_name": name})


def wait_for_log(live: Live, needle: str, *, count: int, timeout: float = 10.0) -> int:
    """Occurrences of ``needle`` in the server log once there are ``count`` (or at timeout)."""
    deadline = time.monotonic() + timeout
    while (seen := live.server.log_text().count(needle)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


@pytest.fixture(scope="module")
def texts(live: Live) -> dict[str, str]:
    """Greedy answers of the base and the static adapters, each asked twice."""
    assert live.served_name == SERVED_NAME
    out: dict[str, str] = {}
    for model in (SERVED_NAME, "alpha", "beta"):
        first, second = text_of(chat(live, model)), text_of(chat(live, model))
        assert first == second, f"{model}: temperature 0 is not deterministic here: {first!r} {second!r}"
        out[model] = first
    return out


# --- start-up -------------------------------------------------------------------
def test_static_adapter_above_max_lora_rank_stops_startup(rank_failure: FailedStart | ServerError) -> None:
    assert isinstance(rank_failure, FailedStart), str(rank_failure)
    assert rank_failure.returncode != 0
    assert "LoRA rank 64 is greater than max_lora_rank 16." in rank_failure.log


def test_health_refuses_connections_until_ready_then_200(live: Live) -> None:
    """No sd_notify and no 503 phase: a deployer polls until the first 200."""
    probes = live.server.health_probes
    assert probes[0] == "refused" and probes[-1] == "200", probes
    assert set(probes) == {"refused", "200"}, probes
    response = httpx.get(f"{live.server.url}/health")  # no API key: /health is outside /v1
    assert (response.status_code, response.content) == (200, b"")


def test_static_adapters_are_loaded_before_the_port_answers(live: Live) -> None:
    ids = [card["id"] for card in live.first_models["data"]]
    assert ids == [SERVED_NAME, "alpha", "beta"]


def test_version_is_0_11_0(live: Live) -> None:
    response = httpx.get(f"{live.server.url}/version")
    assert response.status_code == 200
    assert response.json()["version"].startswith("0.11.0"), response.text


def test_api_key_from_env_guards_v1_only(live: Live) -> None:
    url = live.server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{url}/v1/models", headers=headers)
        assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
        response = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                              json={"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 1})
        assert response.status_code == 401
    assert live.client.get("/v1/models").status_code == 200
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert live.api_key not in " ".join(live.server.command)


# --- choosing an adapter ------------------------------------------------------------
def test_model_field_selects_the_adapter(live: Live, texts: dict[str, str]) -> None:
    assert all(texts.values()), texts
    assert len(set(texts.values())) == 3, f"base and adapters should all differ: {texts}"
    for model in ("alpha", "beta"):
        assert chat(live, model).json()["model"] == model
    assert chat(live, SERVED_NAME).json()["model"] == SERVED_NAME


def test_model_omitted_means_the_base(live: Live, texts: dict[str, str]) -> None:
    response = chat(live, None)
    assert text_of(response) == texts[SERVED_NAME]
    assert response.json()["model"] == SERVED_NAME


def test_lora_name_field_is_ignored_with_a_warning(live: Live, texts: dict[str, str]) -> None:
    before = live.server.log_text().count(IGNORED_WARNING)
    response = chat(live, SERVED_NAME, lora_name="alpha")
    assert text_of(response) == texts[SERVED_NAME] != texts["alpha"]
    assert response.json()["model"] == SERVED_NAME
    assert wait_for_log(live, IGNORED_WARNING, count=before + 1) == before + 1
    # without `model` as well: still the base, not the adapter
    assert text_of(chat(live, None, lora_name="beta")) == texts[SERVED_NAME]


# --- /v1/models and errors --------------------------------------------------------
def test_models_cards(live: Live, tiny: Fixtures) -> None:
    cards = {card["id"]: card for card in live.client.get("/v1/models").json()["data"]}
    base = cards[SERVED_NAME]
    assert (base["root"], base["parent"], base["max_model_len"]) == (str(tiny.model), None, live.max_model_len)
    for name in ("alpha", "beta"):
        card = cards[name]
        assert (card["root"], card["parent"], card["max_model_len"]) \
            == (str(tiny.adapters[name]), SERVED_NAME, None), card


def test_unknown_model_is_404_with_openai_error_shape(live: Live) -> None:
    response = chat(live, "no-such-adapter")
    assert response.status_code == 404
    assert response.json() == {"error": {
        "message": "The model `no-such-adapter` does not exist.",
        "type": "NotFoundError", "param": None, "code": 404}}


# --- adapters at run time ----------------------------------------------------------
def test_runtime_load_of_a_loaded_name_is_400(live: Live, tiny: Fixtures) -> None:
    response = load(live, "alpha", tiny.adapters["alpha"])
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "The lora adapter 'alpha' has already been loaded.",
        "type": "InvalidUserInput", "param": None, "code": 400}


def test_runtime_load_new_adapter_answers_then_unload_forgets_it(
        live: Live, tiny: Fixtures, texts: dict[str, str]) -> None:
    response = load(live, "gamma", tiny.adapters["gamma"])
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'gamma' added successfully.")
    cards = {card["id"]: card for card in live.client.get("/v1/models").json()["data"]}
    assert (cards["gamma"]["root"], cards["gamma"]["parent"]) == (str(tiny.adapters["gamma"]), SERVED_NAME)
    answer = chat(live, "gamma")
    assert answer.json()["model"] == "gamma"
    assert text_of(answer) not in texts.values(), (text_of(answer), texts)

    response = unload(live, "gamma")
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'gamma' removed successfully.")
    assert chat(live, "gamma").status_code == 404
    assert "gamma" not in [card["id"] for card in live.client.get("/v1/models").json()["data"]]


def test_unload_of_unknown_adapter_is_404(live: Live) -> None:
    response = unload(live, "never-loaded")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The lora adapter 'never-loaded' cannot be found.",
        "type": "NotFoundError", "param": None, "code": 404}


def test_reloading_a_name_with_other_weights_serves_the_new_weights(
        live: Live, tiny: Fixtures, texts: dict[str, str]) -> None:
    """Seen on 0.11.0: each load gets a new internal id, so nothing stale is served.

    (VLLM-0.11-FACTS.md warns that stale weights *can* be served; not reproduced
    through the API. Naming changed adapters by content hash stays the safe choice.)
    """
    assert load(live, "delta", tiny.adapters["alpha"]).status_code == 200
    try:
        assert text_of(chat(live, "delta")) == texts["alpha"]
        assert unload(live, "delta").status_code == 200
        assert load(live, "delta", tiny.adapters["beta"]).status_code == 200
        assert text_of(chat(live, "delta")) == texts["beta"]
    finally:
        unload(live, "delta")


REJECTED_AT_RUNTIME_LOAD = {
    "rank_too_high": "LoRA rank 64 is greater than max_lora_rank 16.",
    "dora": "vLLM does not yet support DoRA.",
    "modules_to_save": "vLLM only supports modules_to_save being None.",
    "bias_all": "Adapter bias cannot be used without bias_enabled.",
    "no_rank": "Missing required configuration fields: {'r'}",
    "no_weights": "doesn't contain tensors",
    "embed_tokens": "but received ['model.embed_tokens'",
    "unknown_target": "but received ['model.layers.0.self_attn.c_attn'",
    "other_base": "The size of tensor a (64) must match the size of tensor b (128)",
}


@pytest.mark.parametrize("name", sorted(REJECTED_AT_RUNTIME_LOAD))
def test_runtime_load_rejects_broken_adapter_with_400(live: Live, tiny: Fixtures, name: str) -> None:
    response = load(live, f"broken-{name}", tiny.broken[name].path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["message"].startswith("Call to add_lora method failed: "), error
    assert REJECTED_AT_RUNTIME_LOAD[name] in error["message"], error
    assert f"broken-{name}" not in [c["id"] for c in live.client.get("/v1/models").json()["data"]]


def test_foreign_base_model_name_is_not_checked_by_vllm(live: Live, tiny: Fixtures) -> None:
    """base_model_name_or_path names another model, shapes fit: vLLM loads it anyway."""
    response = load(live, "foreign", tiny.broken["foreign_base_name"].path)
    try:
        assert response.status_code == 200, response.text
        assert chat(live, "foreign").status_code == 200
    finally:
        unload(live, "foreign")


@pytest.mark.parametrize("path", ["/nonexistent/adapter", "relative/adapter"])
def test_runtime_load_of_missing_path_is_404(live: Live, path: str) -> None:
    """A relative path is tried as a hub repo id; offline, that is "No adapter found"."""
    response = load(live, "missing", path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "NotFoundError"
    assert error["message"] == ("Call to add_lora method failed: Loading lora missing failed: "
                                f"No adapter found for {path}")


def test_server_still_healthy_and_unchanged_after_rejected_loads(live: Live, texts: dict[str, str]) -> None:
    assert httpx.get(f"{live.server.url}/health").status_code == 200
    assert {m: text_of(chat(live, m)) for m in texts} == texts


# --- metrics ---------------------------------------------------------------------
LORA_INFO = re.compile(r'^vllm:lora_requests_info\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)


def test_metrics_show_the_running_adapter(live: Live, texts: dict[str, str]) -> None:
    before = time.time()
    text_of(chat(live, "beta"))
    metrics = httpx.get(f"{live.server.url}/metrics").text
    assert re.search(r'^vllm:num_requests_running\{[^}]*\} \d', metrics, re.M)
    assert re.search(r'^vllm:num_requests_waiting\{[^}]*\} \d', metrics, re.M)
    series = [(dict(re.findall(r'(\w+)="([^"]*)"', m["labels"])), float(m["value"]))
              for m in LORA_INFO.finditer(metrics)]
    beta = [(labels, value) for labels, value in series if labels["running_lora_adapters"] == "beta"]
    assert beta, series
    labels, value = beta[0]
    assert labels == {"max_lora": str(live.max_loras), "running_lora_adapters": "beta", "waiting_lora_adapters": ""}
    # the value is a timestamp (when that label set was last seen), not a count
    assert math.isclose(value, time.time(), abs_tol=120) and value >= before - 1, value


# --- the shipped per-model request counter (RequestsPerModel) -----------------------
COUNTER = re.compile(r'^vllm_deploy_model_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)


def counted(live: Live) -> dict[tuple[str, str, str], float]:
    """{(model, kind, code): value} from the server's own /metrics (no key: a probe path)."""
    metrics = httpx.get(f"{live.server.url}/metrics").text
    found = {}
    for match in COUNTER.finditer(metrics):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        found[(labels["model"], labels["kind"], labels["code"])] = float(match["value"])
    return found


def test_the_shipped_counter_counts_requests_per_model_on_vllm_s_own_metrics(
        live: Live, tiny: Fixtures, texts: dict[str, str]) -> None:
    """vLLM 0.11.0 serves prometheus_client's default REGISTRY on /metrics (one API server), loads a
    --middleware class, and exposes base_model_paths / lora_requests on app.state: the counter
    counts by the model vLLM served, an adapter loaded at run time included."""
    before = counted(live)
    assert {(SERVED_NAME, "base", "2xx"), ("alpha", "adapter", "2xx"), ("beta", "adapter", "2xx")} <= set(before)
    text_of(chat(live, "alpha"))
    text_of(chat(live, "alpha"))
    text_of(chat(live, None))  # no model: the base
    assert chat(live, "no-such-model").status_code == 404
    completion = live.client.post("/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    assert load(live, "counted", tiny.adapters["gamma"]).status_code == 200
    try:
        text_of(chat(live, "counted"))
    finally:
        assert unload(live, "counted").status_code == 200
    no_key = httpx.post(f"{live.server.url}/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})
    assert no_key.status_code == 401  # vLLM's key check, inside the counter, answers before reading the body

    after = counted(live)
    delta = {labels: after[labels] - before.get(labels, 0.0) for labels in after
             if after[labels] != before.get(labels, 0.0)}
    assert delta == {("alpha", "adapter", "2xx"): 2, (SERVED_NAME, "base", "2xx"): 1, ("beta", "adapter", "2xx"): 1,
                     ("counted", "adapter", "2xx"): 1, ("other", "other", "4xx"): 2}, delta
    # vLLM's own counter cannot tell them apart: every one of these carries the base's name.
    metrics = httpx.get(f"{live.server.url}/metrics").text
    names = set(re.findall(r'^vllm:request_success_total\{[^}]*model_name="([^"]*)"', metrics, re.M))
    assert names == {SERVED_NAME}, names

"""Unit tests for RequestsPerModel (roles/vllm/files/vllm_lora_name_compat.py): the per-model
request counter on vLLM's /metrics.

A fake ASGI app answers like vLLM 0.11.0's completion routes and carries the one piece of vLLM
state the counter reads (app.state.openai_serving_models: base_model_paths, lora_requests).
The counter is a real prometheus_client Counter; the tests read what a scrape would read
(the text exposition, parsed by prometheus_client's own parser).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.loader import REPO, load

compat = load("roles/vllm/files/vllm_lora_name_compat.py")

BASE = "tiny"
NAME = "vllm_deploy_model_requests_total"


class FakeServingModels:
    """What the middlewares read from vLLM's OpenAIServingModels."""

    def __init__(self, adapters: tuple[str, ...] = ("alpha", "beta")) -> None:
        self.base_model_paths = [SimpleNamespace(name=BASE, model_path="/srv/vllm/models/tiny")]
        self.lora_requests: dict[str, object] = {name: object() for name in adapters}

    def is_base_model(self, name: str) -> bool:
        return any(path.name == name for path in self.base_model_paths)


class FakeVllm:
    """vLLM's completion routes: reads the whole body, 200 for a served name, 404 otherwise,
    400 for a body that is not a JSON object."""

    def __init__(self, adapters: tuple[str, ...] = ("alpha", "beta")) -> None:
        self.state = SimpleNamespace(openai_serving_models=FakeServingModels(adapters))
        self.chunks: list[list[bytes]] = []
        self.scopes: list[dict] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.chunks.append(chunks)
        try:
            payload = json.loads(b"".join(chunks))
            assert isinstance(payload, dict)
        except (ValueError, AssertionError, RecursionError):
            await _answer(send, 400, {"error": {"message": "bad request", "code": 400}})
            return
        model = payload.get("model") or BASE
        models = getattr(self.state, "openai_serving_models", None)
        if models is None or (model not in models.lora_requests and not models.is_base_model(model)):
            await _answer(send, 404, {"error": {"message": f"The model `{model}` does not exist.", "code": 404}})
            return
        await _answer(send, 200, {"model": model})


async def _answer(send: Any, status: int, payload: dict) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def fresh_counter(max_models: int = compat.DEFAULT_MAX_MODELS) -> tuple[Any, CollectorRegistry]:
    registry = CollectorRegistry()
    return compat.ModelRequestCounter(Counter(compat.METRIC, compat.METRIC_HELP, compat.LABELS, registry=registry),
                                      max_models=max_models), registry


def scraped(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """{(model, kind, code): value} of the counter, as a scrape of /metrics reads it."""
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == NAME:
                found[(sample.labels["model"], sample.labels["kind"], sample.labels["code"])] = sample.value
    return found


def moved(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    return {labels: value for labels, value in scraped(registry).items() if value}


class Stack:
    """LoraNameMiddleware(RequestsPerModel(vLLM)): the order the role's --middleware list gives."""

    def __init__(self, app: Optional[Any] = None, counter: Optional[Any] = None, compat_on: bool = True,
                 max_body_bytes: int = compat.DEFAULT_MAX_BODY_BYTES) -> None:
        self.vllm = app or FakeVllm()
        if counter is None:
            counter, self.registry = fresh_counter()
        self.counter = counter
        inner = compat.RequestsPerModel(self.vllm, counter=counter, max_body_bytes=max_body_bytes)
        self.app = compat.LoraNameMiddleware(inner) if compat_on else inner

    def request(self, body: bytes | list[bytes], path: str = "/v1/chat/completions", method: str = "POST",
                tail: Optional[list[dict]] = None) -> list[dict]:
        chunks = body if isinstance(body, list) else [body]
        messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                    for i, chunk in enumerate(chunks)] + (tail or [])
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": self.vllm,
                 "headers": [(b"content-type", b"application/json")]}
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(asyncio.wait_for(self.app(scope, receive, send), 5))
        return sent


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}).encode()


def test_each_way_of_selecting_a_model_counts_on_the_model_vllm_serves() -> None:
    stack = Stack()
    stack.request(chat(model="alpha"))
    stack.request(chat(model=BASE, lora_name="alpha"))  # moved into model by LoraNameMiddleware
    stack.request(chat(lora_name="beta"))
    stack.request(chat(model=BASE))
    stack.request(chat())  # no model: vLLM serves the base
    stack.request(json.dumps({"model": "beta", "prompt": "x"}).encode(), path="/v1/completions")
    assert moved(stack.registry) == {("alpha", "adapter", "2xx"): 2, ("beta", "adapter", "2xx"): 2,
                                     (BASE, "base", "2xx"): 2}


def test_without_the_lora_name_middleware_lora_name_counts_on_the_base_as_vllm_serves_it() -> None:
    stack = Stack(compat_on=False)
    stack.request(chat(model=BASE, lora_name="alpha"))
    assert moved(stack.registry) == {(BASE, "base", "2xx"): 1}


def test_names_vllm_does_not_serve_and_unreadable_bodies_are_other() -> None:
    stack = Stack()
    stack.request(chat(model="nope"))
    stack.request(chat(model=BASE, lora_name="nope"))      # vLLM's 404 through the compat rewrite
    stack.request(chat(model="beta", lora_name="alpha"))   # the compat middleware's own 400: never reaches us
    stack.request(b'{"model": "alpha"')                     # not JSON
    stack.request(b'["alpha"]')                             # JSON, not an object
    stack.request(chat(model=7))                            # not a name
    assert moved(stack.registry) == {("other", "other", "4xx"): 5}


def test_label_values_stay_bounded_whatever_clients_send() -> None:
    stack = Stack()
    for index in range(300):
        stack.request(chat(model=f"attacker-{index}-" + "x" * 100))
    assert {labels[0] for labels in scraped(stack.registry)} == {BASE, "alpha", "beta", "other"}
    assert moved(stack.registry) == {("other", "other", "4xx"): 300}


def test_an_adapter_loaded_at_run_time_counts_under_its_name_up_to_the_cap() -> None:
    counter, registry = fresh_counter(max_models=5)  # other + tiny + alpha + beta + one more
    stack = Stack(counter=counter)
    stack.request(chat(model="alpha"))
    models = stack.vllm.state.openai_serving_models
    models.lora_requests["gamma"] = object()
    models.lora_requests["delta"] = object()
    stack.request(chat(model="gamma"))
    stack.request(chat(model="delta"))
    assert moved(registry) == {("alpha", "adapter", "2xx"): 1, ("gamma", "adapter", "2xx"): 1,
                               ("other", "other", "2xx"): 1}


def test_served_names_start_at_zero_before_any_request() -> None:
    """The first scrape (itself a request through the middleware) already shows them."""
    stack = Stack()
    stack.request(b"", path="/metrics", method="GET")
    assert scraped(stack.registry) == {(BASE, "base", "2xx"): 0, ("alpha", "adapter", "2xx"): 0,
                                       ("beta", "adapter", "2xx"): 0}


@pytest.mark.parametrize("method,path", [("GET", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
                                         ("POST", "/v1/chat/completions/x"), ("GET", "/health")])
def test_other_requests_are_not_counted_and_pass_untouched(method: str, path: str) -> None:
    stack = Stack(compat_on=False)
    chunks = [b'{"model": ', b'"alpha"}']
    stack.request(chunks, path=path, method=method)
    assert moved(stack.registry) == {}
    assert stack.vllm.chunks == [chunks]


def test_the_body_reaches_vllm_chunk_by_chunk_unchanged() -> None:
    stack = Stack(compat_on=False)
    body = chat(model="alpha")
    chunks = [body[:3], body[3:4], b"", body[4:30], body[30:]]
    sent = stack.request(chunks)
    assert stack.vllm.chunks == [chunks]
    assert sent[0]["status"] == 200
    assert moved(stack.registry) == {("alpha", "adapter", "2xx"): 1}


def test_a_body_over_the_copy_limit_is_served_and_counted_as_other() -> None:
    stack = Stack(compat_on=False, max_body_bytes=64)
    body = chat(model="alpha", pad="x" * 200)
    sent = stack.request([body[:50], body[50:]])
    assert sent[0]["status"] == 200 and stack.vllm.chunks == [[body[:50], body[50:]]]
    assert moved(stack.registry) == {("other", "other", "2xx"): 1}


def test_a_stream_counts_once_when_vllm_starts_answering() -> None:
    counter, registry = fresh_counter()
    seen_at_start: list[dict] = []

    class Streamer(FakeVllm):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            seen_at_start.append(moved(registry))
            for index in range(3):
                await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": index < 2})

    stack = Stack(app=Streamer(), counter=counter, compat_on=False)
    stack.request(chat(model="beta", stream=True))
    assert seen_at_start == [{("beta", "adapter", "2xx"): 1}]
    assert moved(registry) == {("beta", "adapter", "2xx"): 1}


def test_an_exception_counts_as_5xx_and_propagates() -> None:
    class Broken(FakeVllm):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            await receive()
            raise RuntimeError("engine dead")

    stack = Stack(app=Broken(), compat_on=False)
    with pytest.raises(RuntimeError, match="engine dead"):
        stack.request(chat(model="alpha"))
    assert moved(stack.registry) == {("alpha", "adapter", "5xx"): 1}


def test_a_client_gone_before_any_answer_counts_as_none() -> None:
    stack = Stack(compat_on=False)
    stack.request([], tail=[{"type": "http.request", "body": b'{"model": "alpha", ', "more_body": True},
                            {"type": "http.disconnect"}])
    assert moved(stack.registry) == {("other", "other", "none"): 1}


def test_an_answer_before_the_body_was_read_is_other() -> None:
    """vLLM's AuthenticationMiddleware (inside ours) answers 401 without reading the body."""
    class KeyCheck(FakeVllm):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            await _answer(send, 401, {"error": "Unauthorized"})

    stack = Stack(app=KeyCheck(), compat_on=False)
    stack.request(chat(model="alpha"))
    assert moved(stack.registry) == {("other", "other", "4xx"): 1}


def test_without_vllm_state_everything_counts_as_other_and_is_served() -> None:
    stack = Stack(compat_on=False)
    stack.vllm.state = SimpleNamespace()
    sent = stack.request(chat(model="alpha"))
    assert sent[0]["status"] == 404  # the fake has no models either; nothing was refused by the counter
    assert moved(stack.registry) == {("other", "other", "4xx"): 1}


def test_lifespan_passes_through() -> None:
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)

    counter, registry = fresh_counter()
    asyncio.run(compat.RequestsPerModel(app, counter=counter)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == [{"type": "lifespan"}] and scraped(registry) == {}


def test_the_default_counter_is_one_counter_on_the_default_registry() -> None:
    """What vLLM 0.11's /metrics serves without PROMETHEUS_MULTIPROC_DIR (get_prometheus_registry)."""
    from prometheus_client import REGISTRY

    first = compat.default_counter()
    assert compat.default_counter() is first  # a second middleware stack reuses it: no duplicate error
    first.count(BASE, "base", "2xx")
    assert REGISTRY.get_sample_value(NAME, {"model": BASE, "kind": "base", "code": "2xx"}) >= 1


MULTIPROCESS_CHILD = """
import sys
sys.path.insert(0, {files!r})
import vllm_lora_name_compat as compat
counter = compat.default_counter()
for _ in range(int(sys.argv[1])):
    counter.count("alpha", "adapter", "2xx")
"""


def test_with_prometheus_multiproc_dir_the_api_servers_counts_are_summed(tmp_path: Path) -> None:
    """What vLLM does for --api-server-count > 1: PROMETHEUS_MULTIPROC_DIR set before the API server
    processes start, /metrics from a MultiProcessCollector (vllm/v1/metrics/prometheus.py)."""
    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    child = MULTIPROCESS_CHILD.format(files=str(REPO / "roles/vllm/files"))
    for count in (2, 3):
        subprocess.run([sys.executable, "-c", child, str(count)], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    assert scraped(registry) == {("alpha", "adapter", "2xx"): 5}


def _middleware_list(**values: Any) -> list[str]:
    """__vllm_middleware from roles/vllm/vars/main.yml, rendered with these variables."""
    import jinja2
    import yaml

    template = yaml.safe_load((REPO / "roles/vllm/vars/main.yml").read_text())["__vllm_middleware"]
    rendered = jinja2.Environment().from_string(template).render(**values)
    return list(yaml.safe_load(rendered))


@pytest.mark.parametrize("compat_on,lora,runtime,key", [
    (True, True, False, ""), (False, True, False, ""), (True, False, False, ""), (True, True, True, "k")])
def test_the_role_always_enables_the_counter_inside_the_lora_name_middleware(
        compat_on: bool, lora: bool, runtime: bool, key: str) -> None:
    """First in the --middleware list: Starlette puts the last added outermost, so the counter
    sees the body after LoraNameMiddleware moved lora_name into model."""
    listed = _middleware_list(vllm_lora_name_compat=compat_on, __vllm_lora_enabled=lora,
                              vllm_allow_runtime_lora_updating=runtime, vllm_api_key=key)
    assert listed[0] == "vllm_lora_name_compat.RequestsPerModel"
    assert listed.count("vllm_lora_name_compat.RequestsPerModel") == 1

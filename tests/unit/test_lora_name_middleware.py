"""Unit tests for roles/vllm/files/vllm_lora_name_compat.py.

A fake ASGI app stands in for vLLM: it answers like vLLM 0.11.0's serving layer
(adapter name in ``model`` selects it, an unknown name is a 404 NotFoundError),
so the tests show what a client would see, with no network and no vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from tests.unit.loader import load



compat = load("roles/vllm/files/vllm_lora_name_compat.py")

BASE = "tiny"
ADAPTERS = {"alpha", "beta"}


class FakeServingModels:
    """The one method the middleware uses from vLLM's OpenAIServingModels."""

    def is_base_model(self, name: str) -> bool:
        return name == BASE


class FakeVllm:
    """Records what reached it and answers like vLLM's completion routes."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.state = SimpleNamespace(openai_serving_models=FakeServingModels())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            self.calls.append({"scope": scope})
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        self.calls.append({"scope": scope, "body": body, "chunks": chunks,
                           "receive": receive})
        try:
            model = dict(json.loads(body)).get("model") or BASE
        except (ValueError, TypeError, RecursionError):  # FastAPI: 400 for any body it cannot parse
            await _send_json(send, 400, {"error": {"message": "bad json"}})
            return
        if model != BASE and model not in ADAPTERS:
            await _send_json(send, 404, {"error": {
                "message": f"The model `{model}` does not exist.",
                "type": "NotFoundError", "param": None, "code": 404}})
            return
        await _send_json(send, 200, {"model": model})


async def _send_json(send: Any, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Result:
    def __init__(self, sent: list[dict]) -> None:
        self.sent = sent

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def _scope(app: FakeVllm, path: str = "/v1/chat/completions", method: str = "POST",
           headers: Optional[list[tuple[bytes, bytes]]] = None,
           body_len: Optional[int] = None, root_path: str = "") -> dict:
    if headers is None:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        if body_len is not None:
            headers.append((b"content-length", str(body_len).encode()))
    return {"type": "http", "method": method, "path": root_path + path,
            "root_path": root_path, "headers": headers, "app": app}


def _run(scope: dict, chunks: list[bytes], app: FakeVllm,
         max_body_bytes: int = 1024, tail: Optional[list[dict]] = None) -> Result:
    """Drive the middleware; ``tail`` are messages after the body (disconnect)."""
    messages: list[dict] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)] + (tail or [])
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # like a server with nothing more to say
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    middleware = compat.LoraNameMiddleware(app, max_body_bytes=max_body_bytes)
    asyncio.run(asyncio.wait_for(middleware(scope, receive, send), 5))
    return Result(sent)


def _chat(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "secret prompt"}],
                       "max_tokens": 4, **fields}).encode()


def _content_length(scope: dict) -> list[bytes]:
    return [v for k, v in scope["headers"] if k == b"content-length"]


def test_lora_name_with_base_model_is_routed_to_the_adapter(caplog) -> None:
    app = FakeVllm()
    body = _chat(model=BASE, lora_name="alpha")
    with caplog.at_level(logging.INFO, logger="vllm.lora_name_compat"):
        result = _run(_scope(app, body_len=len(body)), [body], app)
    assert result.status == 200 and result.json == {"model": "alpha"}
    seen = app.calls[0]
    forwarded = json.loads(seen["body"])
    assert forwarded["model"] == "alpha" and "lora_name" not in forwarded
    assert forwarded["messages"][0]["content"] == "secret prompt"
    assert _content_length(seen["scope"]) == [str(len(seen["body"])).encode()]
    records = [r for r in caplog.records if r.name == "vllm.lora_name_compat"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "alpha" in records[0].getMessage()
    assert "secret prompt" not in records[0].getMessage()


@pytest.mark.parametrize("fields", [{}, {"model": ""}, {"model": None}])
def test_lora_name_without_model_is_routed_to_the_adapter(fields: dict) -> None:
    app = FakeVllm()
    result = _run(_scope(app), [_chat(lora_name="beta", **fields)], app)
    assert result.json == {"model": "beta"}
    assert "lora_name" not in json.loads(app.calls[0]["body"])


def test_completions_path_is_rewritten_too() -> None:
    app = FakeVllm()
    body = json.dumps({"model": BASE, "lora_name": "alpha", "prompt": "x"}).encode()
    result = _run(_scope(app, path="/v1/completions"), [body], app)
    assert result.json == {"model": "alpha"}


def test_unknown_adapter_reaches_vllm_as_model_and_gets_its_404() -> None:
    app = FakeVllm()
    result = _run(_scope(app), [_chat(model=BASE, lora_name="nope")], app)
    assert json.loads(app.calls[0]["body"])["model"] == "nope"
    assert result.status == 404
    assert result.json["error"]["message"] == "The model `nope` does not exist."


def test_model_naming_another_adapter_conflicts_with_400() -> None:
    app = FakeVllm()
    result = _run(_scope(app), [_chat(model="beta", lora_name="alpha")], app)
    assert app.calls == []
    assert result.status == 400
    error = result.json["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == "lora_name"
    assert "'beta'" in error["message"] and "'alpha'" in error["message"]


def test_model_equal_to_lora_name_just_drops_lora_name() -> None:
    app = FakeVllm()
    result = _run(_scope(app), [_chat(model="alpha", lora_name="alpha")], app)
    forwarded = json.loads(app.calls[0]["body"])
    assert forwarded["model"] == "alpha" and "lora_name" not in forwarded
    assert result.json == {"model": "alpha"}


@pytest.mark.parametrize("value", ["", 7, ["alpha"]])
def test_lora_name_that_is_not_a_name_is_refused(value: Any) -> None:
    app = FakeVllm()
    result = _run(_scope(app), [_chat(model=BASE, lora_name=value)], app)
    assert app.calls == [] and result.status == 400
    assert result.json["error"]["param"] == "lora_name"


@pytest.mark.parametrize("body", [
    _chat(model=BASE),                       # no lora_name at all
    _chat(model=BASE, lora_name=None),       # explicit "no adapter"
    _chat(model=3, lora_name="alpha"),       # vLLM's validation must answer
    b'{"model": "tiny", "lora_name": "alpha"',  # invalid JSON
    b'["lora_name"]',                        # JSON, but not an object
    b"\xff\xfe not utf-8 lora_name",
])
def test_other_bodies_pass_through_byte_for_byte(body: bytes) -> None:
    app = FakeVllm()
    scope = _scope(app, body_len=len(body))
    headers_before = list(scope["headers"])
    _run(scope, [body], app)
    seen = app.calls[0]
    assert seen["body"] == body
    assert seen["scope"]["headers"] == headers_before


# ~2 KB that makes json.loads raise RecursionError: vLLM alone answers 400, so
# the middleware must not turn it into a 500 with a traceback per request.
NESTED = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize("body", [
    NESTED,
    b'{"model": "tiny", "lora_name": "alpha", "messages": ' + NESTED + b"}",
    b'{"lora_name": "alpha", "messages": [{"role": "user", "content": ' + NESTED + b"}]}",
])
def test_too_deeply_nested_body_reaches_vllm_untouched_and_gets_its_400(body: bytes) -> None:
    app = FakeVllm()
    scope = _scope(app, body_len=len(body))
    headers_before = list(scope["headers"])
    result = _run(scope, [body], app, max_body_bytes=4096)
    seen = app.calls[0]
    assert seen["body"] == body and seen["scope"]["headers"] == headers_before
    assert result.status == 400


def test_decide_passes_a_too_deeply_nested_body_through() -> None:
    assert compat.decide(NESTED, lambda name: name == BASE) == compat.Decision()


def test_body_that_cannot_be_written_back_is_a_400_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed but too deep to serialise again (a deeper stack): refuse, never the base model."""
    body = _chat(model=BASE, lora_name="alpha")
    real_dumps = json.dumps

    def dumps(obj: Any, **kwargs: Any) -> str:
        if isinstance(obj, dict) and "messages" in obj:
            raise RecursionError("maximum recursion depth exceeded")
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(compat.json, "dumps", dumps)
    app = FakeVllm()
    result = _run(_scope(app), [body], app)
    assert app.calls == [] and result.status == 400
    error = result.json["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == "lora_name"


@pytest.mark.parametrize("method,path,content_type", [
    ("GET", "/v1/chat/completions", b"application/json"),
    ("POST", "/v1/embeddings", b"application/json"),
    ("POST", "/v1/chat/completions/extra", b"application/json"),
    ("POST", "/v1/chat/completions", b"text/plain"),
])
def test_other_requests_are_not_buffered_or_changed(method: str, path: str,
                                                    content_type: bytes) -> None:
    app = FakeVllm()
    chunks = [b'{"model": "tiny", ', b'"lora_name": "alpha", "prompt": "x"}']
    scope = _scope(app, path=path, method=method,
                   headers=[(b"content-type", content_type)])
    _run(scope, chunks, app)
    assert app.calls[0]["chunks"] == chunks  # same chunking: nothing buffered
    assert app.calls[0]["scope"] is scope


def test_root_path_prefix_is_ignored_when_matching() -> None:
    app = FakeVllm()
    result = _run(_scope(app, root_path="/llm"), [_chat(lora_name="alpha")], app)
    assert result.json == {"model": "alpha"}


def test_body_in_several_chunks_is_reassembled_and_rewritten() -> None:
    app = FakeVllm()
    body = _chat(model=BASE, lora_name="alpha")
    chunks = [body[:5], body[5:6], b"", body[6:40], body[40:]]
    result = _run(_scope(app), chunks, app)
    assert result.json == {"model": "alpha"}
    assert len(app.calls[0]["chunks"]) == 1


def test_chunked_request_gets_a_content_length_and_loses_transfer_encoding() -> None:
    app = FakeVllm()
    body = _chat(lora_name="alpha")
    scope = _scope(app, headers=[(b"transfer-encoding", b"chunked")])
    _run(scope, [body[:10], body[10:]], app)
    seen = app.calls[0]
    names = [k for k, _ in seen["scope"]["headers"]]
    assert b"transfer-encoding" not in names
    assert _content_length(seen["scope"]) == [str(len(seen["body"])).encode()]


def test_declared_oversized_body_is_refused_before_reading() -> None:
    app = FakeVllm()
    body = _chat(lora_name="alpha", pad="x" * 2000)
    result = _run(_scope(app, body_len=len(body)), [body], app, max_body_bytes=1024)
    assert app.calls == [] and result.status == 413
    assert result.json["error"]["code"] == 413


def test_undeclared_oversized_body_is_refused_while_reading() -> None:
    app = FakeVllm()
    chunks = [b"x" * 600, b"x" * 600, b"x" * 600]
    result = _run(_scope(app), chunks, app, max_body_bytes=1024)
    assert app.calls == [] and result.status == 413


def test_body_at_the_limit_is_accepted() -> None:
    app = FakeVllm()
    body = _chat(lora_name="alpha")
    result = _run(_scope(app), [body], app, max_body_bytes=len(body))
    assert result.json == {"model": "alpha"}


def test_disconnect_while_reading_ends_quietly() -> None:
    app = FakeVllm()
    result = _run(_scope(app), [], app, tail=[
        {"type": "http.request", "body": b'{"lora_', "more_body": True},
        {"type": "http.disconnect"}])
    assert app.calls == [] and result.sent == []


def test_after_the_body_the_app_still_sees_the_disconnect() -> None:
    """vLLM aborts generation on disconnect; the replay must not hide it."""
    seen: list[dict] = []

    class Listener(FakeVllm):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            seen.append(await receive())
            seen.append(await receive())

    app = Listener()
    disconnect = {"type": "http.disconnect"}
    _run(_scope(app), [_chat(lora_name="alpha")], app, tail=[disconnect])
    assert seen[0]["type"] == "http.request"
    assert json.loads(seen[0]["body"])["model"] == "alpha"
    assert seen[1] is disconnect  # the server's own message, not a made-up one


def test_streaming_response_is_forwarded_untouched() -> None:
    frames = [b"data: {\"a\": 1}\n\n", b"data: {\"a\": 2}\n\n", b"data: [DONE]\n\n"]

    class Streamer(FakeVllm):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i, frame in enumerate(frames):
                await send({"type": "http.response.body", "body": frame,
                            "more_body": i < len(frames) - 1})

    app = Streamer()
    result = _run(_scope(app), [_chat(lora_name="alpha", stream=True)], app)
    assert [m.get("body") for m in result.sent[1:]] == frames
    assert result.sent[0]["headers"] == [(b"content-type", b"text/event-stream")]


def test_without_vllm_state_it_fails_closed() -> None:
    app = FakeVllm()
    app.state = SimpleNamespace()
    result = _run(_scope(app), [_chat(model=BASE, lora_name="alpha")], app)
    assert app.calls == [] and result.status == 500
    assert "model" in result.json["error"]["message"]


def test_lifespan_passes_through() -> None:
    app = FakeVllm()
    scope = {"type": "lifespan"}
    _run(scope, [], app)
    assert app.calls == [{"scope": scope}]


def test_decide_is_pure_and_keeps_other_fields() -> None:
    raw = json.dumps({"model": BASE, "lora_name": "alpha", "seed": 1,
                      "temperature": 0}).encode()
    decision = compat.decide(raw, lambda name: name == BASE)
    assert decision.adapter == "alpha" and decision.status == 0
    assert json.loads(decision.body) == {"model": "alpha", "seed": 1, "temperature": 0}


def test_conflict_answer_is_what_the_live_server_sent() -> None:
    """Recorded from vLLM 0.11.0 running this middleware (tests/unit/data/vllm_0.11.0)."""
    recorded = json.loads((Path(__file__).resolve().parent / "data" / "vllm_0.11.0"
                           / "chat_lora_name_conflict.json").read_text())
    raw = json.dumps(recorded["request"]["body"]).encode()
    decision = compat.decide(raw, lambda name: name == BASE)
    assert (decision.status, json.loads(decision.error)) == (
        recorded["status"], recorded["body"])

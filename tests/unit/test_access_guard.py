"""Access guards: adapter endpoints for loopback only; the API key on every model route."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.unit.loader import load

guard = load("roles/vllm/files/vllm_access_guard.py")


def call(path: str, client: str, method: str = "POST", middleware: Any = None,
         headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, Any] | None, bool]:
    reached = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "client": (client, 5555),
             "headers": headers or []}
    asyncio.run((middleware or guard.AdapterEndpointsLoopbackOnly)(app)(scope, receive, send))
    body = sent[-1]["body"]
    return sent[0]["status"], (json.loads(body) if body != b"ok" else None), bool(reached)


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter/"])
@pytest.mark.parametrize("client", ["10.0.0.5", "172.17.0.1", "::ffff:192.168.1.2", "2001:db8::1", ""])
def test_remote_callers_get_403(path: str, client: str) -> None:
    status, body, reached = call(path, client)
    assert status == 403 and not reached
    assert body is not None and body["error"]["code"] == 403


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_loopback_callers_pass(client: str) -> None:
    assert call("/v1/load_lora_adapter", client) == (200, None, True)


def test_other_paths_pass_from_anywhere() -> None:
    assert call("/v1/chat/completions", "10.0.0.5") == (200, None, True)
    assert call("/v1/models", "10.0.0.5", method="GET") == (200, None, True)


def keyed(app):  # type: ignore[no-untyped-def]
    return guard.ApiKeyOnEveryRoute(app, api_key="s3cret")


@pytest.mark.parametrize("path", ["/invocations", "/tokenize", "/detokenize", "/pooling", "/v1/chat/completions", "/"])
def test_model_routes_need_the_key(path: str) -> None:
    status, body, reached = call(path, "127.0.0.1", middleware=keyed)
    assert (status, body, reached) == (401, {"error": "Unauthorized"}, False)
    status, _body, reached = call(path, "127.0.0.1", middleware=keyed, headers=[(b"authorization", b"Bearer wrong")])
    assert status == 401 and not reached
    assert call(path, "127.0.0.1", middleware=keyed, headers=[(b"authorization", b"Bearer s3cret")]) == (200, None, True)


@pytest.mark.parametrize("path", ["/health", "/ping", "/version", "/metrics", "/load"])
def test_probes_stay_open(path: str) -> None:
    assert call(path, "10.0.0.5", method="GET", middleware=keyed) == (200, None, True)


def test_no_key_configured_means_no_check() -> None:
    assert call("/invocations", "10.0.0.5", middleware=lambda app: guard.ApiKeyOnEveryRoute(app, api_key="")) == (200, None, True)


@pytest.mark.parametrize("header", [b"bearer s3cret", b"BEARER s3cret", b"Bearer  s3cret"])
def test_the_bearer_scheme_is_case_insensitive(header: bytes) -> None:
    assert call("/invocations", "10.0.0.5", middleware=keyed, headers=[(b"authorization", header)]) == (200, None, True)


def test_a_websocket_without_the_key_is_closed() -> None:
    sent: list[dict[str, Any]] = []
    reached: list[str] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        reached.append(scope["path"])

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/v1/realtime", "root_path": "", "client": ("10.0.0.5", 1), "headers": []}
    asyncio.run(keyed(app)(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and not reached

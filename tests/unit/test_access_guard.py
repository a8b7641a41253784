"""Access guards: adapter endpoints for the deployer only, the API key on every model route, no web page origins."""

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
    asyncio.run(middleware(app)(scope, receive, send))
    body = sent[-1]["body"]
    return sent[0]["status"], (json.loads(body) if body != b"ok" else None), bool(reached)


ADMIN = "adm1n-" + "x" * 20


def deployer(roots: str = "/srv/vllm/adapters"):  # type: ignore[no-untyped-def]
    return lambda app: guard.AdapterEndpointsForTheDeployer(app, admin_key=ADMIN, adapter_roots=roots)


def admin_call(path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
               roots: str = "/srv/vllm/adapters") -> tuple[int, dict[str, Any] | None, bytes | None]:
    """Like call(), with a request body; returns what the app read of the body (None: not reached)."""
    seen: list[bytes] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        received = b""
        while True:
            message = await receive()
            received += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(received)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "client": ("127.0.0.1", 5555),
             "headers": headers if headers is not None else [(b"x-vllm-admin-key", ADMIN.encode())]}
    asyncio.run(deployer(roots)(app)(scope, receive, send))
    out = sent[-1]["body"]
    return sent[0]["status"], (json.loads(out) if out != b"ok" else None), (seen[0] if seen else None)


def load_body(path: str) -> bytes:
    return json.dumps({"lora_name": "gamma", "lora_path": path}).encode()


# Behind the local proxy every client is 127.0.0.1: the address proves nothing.
@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter/"])
@pytest.mark.parametrize("client", ["127.0.0.1", "::1", "10.0.0.5", ""])
def test_adapter_endpoints_without_the_deployers_key_get_403(path: str, client: str) -> None:
    status, body, reached = call(path, client, middleware=deployer())
    assert status == 403 and not reached
    assert body is not None and body["error"]["code"] == 403 and "deployer" in body["error"]["message"]


@pytest.mark.parametrize("key", [b"", b"wrong", ADMIN.encode()[:-1], b"Bearer " + ADMIN.encode()])
def test_a_wrong_deployers_key_gets_403(key: bytes) -> None:
    status, _body, reached = admin_call("/v1/load_lora_adapter", load_body("/srv/vllm/adapters/gamma"),
                                        headers=[(b"x-vllm-admin-key", key)])
    assert status == 403 and reached is None


def test_no_deployers_key_on_the_host_means_nobody_passes() -> None:
    status, _, reached = call("/v1/unload_lora_adapter", "127.0.0.1", headers=[(b"x-vllm-admin-key", b"")],
                              middleware=lambda app: guard.AdapterEndpointsForTheDeployer(app, admin_key="", adapter_roots="/srv"))
    assert status == 403 and not reached


def test_the_deployer_loads_from_the_adapter_folder_and_the_body_reaches_vllm_whole() -> None:
    body = load_body("/srv/vllm/adapters/gamma")
    assert admin_call("/v1/load_lora_adapter", body) == (200, None, body)
    # A body in several chunks is replayed whole.
    padded = json.dumps({"lora_name": "gamma", "lora_path": "/srv/vllm/adapters/gamma", "pad": "p" * 5000}).encode()
    assert admin_call("/v1/load_lora_adapter", padded) == (200, None, padded)
    assert admin_call("/v1/unload_lora_adapter", b'{"lora_name": "gamma"}')[0] == 200


@pytest.mark.parametrize("lora_path", ["/dev/shm/evil", "/run/lock/x", "/srv/vllm/adapters/../models/m",
                                       "/srv/vllm/adaptersX/y", "relative/adapters", "", 5])
def test_a_load_from_anywhere_else_gets_403(lora_path: object) -> None:
    status, body, reached = admin_call("/v1/load_lora_adapter",
                                       json.dumps({"lora_name": "gamma", "lora_path": lora_path}).encode())
    assert status == 403 and reached is None and body is not None
    assert "lora_path" in body["error"]["message"]


def test_a_symlink_out_of_the_adapter_folder_gets_403(tmp_path: Any) -> None:
    (tmp_path / "adapters").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "adapters" / "link").symlink_to(tmp_path / "elsewhere")
    roots = str(tmp_path / "adapters")
    assert admin_call("/v1/load_lora_adapter", load_body(str(tmp_path / "adapters" / "link")), roots=roots)[0] == 403
    (tmp_path / "adapters" / "real").mkdir()
    assert admin_call("/v1/load_lora_adapter", load_body(str(tmp_path / "adapters" / "real")), roots=roots)[0] == 200


def test_an_adapter_adopted_in_place_is_a_root_of_its_own() -> None:
    roots = "/srv/vllm/adapters:/home/beelink/adapters/sql"
    assert admin_call("/v1/load_lora_adapter", load_body("/home/beelink/adapters/sql"), roots=roots)[0] == 200
    assert admin_call("/v1/load_lora_adapter", load_body("/home/beelink/adapters/other"), roots=roots)[0] == 403


@pytest.mark.parametrize("body", [b"[" * 1000 + b"]" * 1000, b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_load_body_that_is_no_json_object_gets_400(body: bytes) -> None:
    status, answer, reached = admin_call("/v1/load_lora_adapter", body)
    assert status == 400 and reached is None and answer is not None


def test_an_oversized_load_body_gets_413() -> None:
    assert admin_call("/v1/load_lora_adapter", b"{" + b" " * (65 * 1024) + b"}")[0] == 413


def test_other_paths_pass_without_the_deployers_key() -> None:
    assert call("/v1/chat/completions", "10.0.0.5", middleware=deployer()) == (200, None, True)
    assert call("/v1/models", "10.0.0.5", method="GET", middleware=deployer()) == (200, None, True)


def test_releases_made_before_the_proxy_still_import_the_old_class_name() -> None:
    assert guard.AdapterEndpointsLoopbackOnly is guard.AdapterEndpointsForTheDeployer


def origins(allowed: str = "[]"):  # type: ignore[no-untyped-def]
    return lambda app: guard.ForeignOriginsRefused(app, allowed_origins=allowed)


@pytest.mark.parametrize("method", ["POST", "OPTIONS", "GET"])
@pytest.mark.parametrize("origin", [b"https://evil.example", b"null", b"http://127.0.0.1:8000", b"http://localhost"])
def test_a_request_from_a_web_page_is_refused_by_default(method: str, origin: bytes) -> None:
    status, body, reached = call("/v1/load_lora_adapter", "127.0.0.1", method=method, middleware=origins(),
                                 headers=[(b"origin", origin)])
    assert status == 403 and not reached and body is not None and "vllm_allowed_origins" in body["error"]["message"]


def test_listed_origins_pass_and_clients_without_an_origin_pass() -> None:
    allowed = origins('["https://chat.example.org", "http://10.0.0.9:3000/"]')
    assert call("/v1/chat/completions", "127.0.0.1", middleware=allowed,
                headers=[(b"origin", b"https://chat.example.org")]) == (200, None, True)
    assert call("/v1/chat/completions", "127.0.0.1", middleware=allowed,
                headers=[(b"Origin", b"http://10.0.0.9:3000")]) == (200, None, True)
    assert call("/v1/chat/completions", "127.0.0.1", middleware=allowed,
                headers=[(b"origin", b"https://evil.example")])[0] == 403
    assert call("/v1/chat/completions", "127.0.0.1", middleware=origins()) == (200, None, True)


def test_a_broken_origin_list_refuses_every_origin() -> None:
    assert call("/v1/models", "127.0.0.1", method="GET", middleware=origins("not json"),
                headers=[(b"origin", b"https://a.example")])[0] == 403


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

"""ASGI middlewares that close two gaps in vLLM 0.11's access control.

AdapterEndpointsLoopbackOnly: vLLM's runtime adapter endpoints answer only the host itself.

With VLLM_ALLOW_RUNTIME_LORA_UPDATING on, vLLM 0.11 lets any API caller load any
path the server can read (POST /v1/load_lora_adapter) or drop a served adapter.
vLLM calls that unsafe for production. The deployer needs the endpoints (live
adapter changes, run on the host itself), clients never do: requests to them
from any address but loopback get 403 in vLLM's error shape. The API key, when
set, is still checked by vLLM behind this.

ApiKeyOnEveryRoute: vLLM's --api-key / VLLM_API_KEY guards only paths under
/v1, yet POST /invocations generates text and /tokenize, /detokenize, /pooling,
/classify, /score, /rerank use the model too. With VLLM_API_KEY set, every path
but the probes (/health, /ping, /version, /metrics, /load) needs the key.

Enabled with `vllm serve ... --middleware vllm_access_guard.<Class>`.
Standard library only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Any, Awaitable, Callable, Dict

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
# Probes for load balancers and monitoring: no model output, no key needed.
OPEN_PATHS = ("/health", "/ping", "/version", "/metrics", "/load")


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _path(scope: Scope) -> str:
    path = str(scope.get("path", "")).rstrip("/")
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


async def _deny(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyOnEveryRoute:
    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        self.key = (api_key if api_key is not None else os.environ.get("VLLM_API_KEY", "")).encode()

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                scheme, _, token = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if (self.key and kind in ("http", "websocket") and scope.get("method") != "OPTIONS"
                and _path(scope) not in OPEN_PATHS and not self._authorised(scope)):
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _deny(send, 401, b'{"error":"Unauthorized"}')  # vLLM's own 401 body
            return
        await self.app(scope, receive, send)


class AdapterEndpointsLoopbackOnly:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http":
            path = _path(scope)
            client = scope.get("client") or ("", 0)
            if path in GUARDED and not is_loopback(str(client[0])):
                await _deny(send, 403, json.dumps({"error": {
                    "message": f"{path} is only available from the host itself.",
                    "type": "ForbiddenError", "param": None, "code": 403}}).encode())
                return
        await self.app(scope, receive, send)

"""ASGI middleware: vLLM's runtime adapter endpoints answer only the host itself.

With VLLM_ALLOW_RUNTIME_LORA_UPDATING on, vLLM 0.11 lets any API caller load any
path the server can read (POST /v1/load_lora_adapter) or drop a served adapter.
vLLM calls that unsafe for production. The deployer needs the endpoints (live
adapter changes, run on the host itself), clients never do: requests to them
from any address but loopback get 403 in vLLM's error shape. The API key, when
set, is still checked by vLLM behind this.

Enabled with `vllm serve ... --middleware vllm_lora_admin_guard.AdapterEndpointsLoopbackOnly`.
Standard library only.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Awaitable, Callable, Dict

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class AdapterEndpointsLoopbackOnly:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http":
            path = str(scope.get("path", "")).rstrip("/")
            root = str(scope.get("root_path", "")).rstrip("/")
            if root and path.startswith(root):
                path = path[len(root):]
            client = scope.get("client") or ("", 0)
            if path in GUARDED and not is_loopback(str(client[0])):
                body = json.dumps({"error": {
                    "message": f"{path} is only available from the host itself.",
                    "type": "ForbiddenError", "param": None, "code": 403}}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

"""ASGI middlewares that close gaps in vLLM 0.11's access control.

The service runs in a private network namespace behind a local proxy
(systemd-socket-proxyd), so EVERY client reaches vLLM from 127.0.0.1: no guard
here may trust the client's address.

AdapterEndpointsForTheDeployer: with VLLM_ALLOW_RUNTIME_LORA_UPDATING on, vLLM
0.11 lets any API caller load any path the server can read
(POST /v1/load_lora_adapter) or drop a served adapter; vLLM calls that unsafe
for production. Clients never need these endpoints; the deployer does, on the
host itself. They answer only a request that carries the deployer's key
(header X-Vllm-Admin-Key = VLLM_ADMIN_KEY, from a root-only file on the host
that clients never see), and a load only from a folder the role placed
adapters in (VLLM_GUARD_ADAPTER_ROOTS). vLLM still checks the API key behind this.

ApiKeyOnEveryRoute: vLLM's --api-key / VLLM_API_KEY guards only paths under
/v1, yet POST /invocations generates text and /tokenize, /detokenize, /pooling,
/classify, /score, /rerank use the model too. With VLLM_API_KEY set, every path
but the probes (/health, /ping, /version, /metrics, /load) needs the key.

ForeignOriginsRefused: a web page open in a browser on any machine that can
reach the port (the host itself included) may send requests to it; the
browser adds an Origin header to every cross-origin POST and preflight. A
request whose Origin is not listed in VLLM_GUARD_ALLOWED_ORIGINS (a JSON list,
from vllm_allowed_origins; empty by default) gets 403 before vLLM sees it.
CORS response headers alone would not stop a "simple" POST from running.

Enabled with `vllm serve ... --middleware vllm_access_guard.<Class>`.
Standard library only.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
LOAD = "/v1/load_lora_adapter"
# Probes for load balancers and monitoring: no model output, no key needed.
OPEN_PATHS = ("/health", "/ping", "/version", "/metrics", "/load")
ADMIN_HEADER = b"x-vllm-admin-key"
# A load request is a name and a path: anything bigger is not one.
MAX_ADMIN_BODY = 64 * 1024


def _path(scope: Scope) -> str:
    path = str(scope.get("path", "")).rstrip("/")
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _header(scope: Scope, wanted: bytes) -> Optional[bytes]:
    for name, value in scope.get("headers") or []:
        if bytes(name).lower() == wanted:
            return bytes(value)
    return None


def _error(status: int, message: str) -> bytes:
    kind = {400: "BadRequestError", 403: "ForbiddenError", 413: "BadRequestError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


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
        value = _header(scope, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

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


def _roots(value: str) -> List[str]:
    return [os.path.realpath(root) for root in value.split(os.pathsep) if root.startswith("/")]


def _inside(path: str, roots: List[str]) -> bool:
    """path, resolved as this process sees it (symlinks and '..' included), is one of roots or inside one."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


async def _read_body(receive: Receive, limit: int) -> Tuple[Optional[bytes], List[Dict[str, Any]]]:
    """The whole request body (None when over limit) and the messages, to replay to the app."""
    messages: List[Dict[str, Any]] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message.get("type") != "http.request":
            return body, messages
        body += message.get("body", b"")
        if len(body) > limit:
            return None, messages
        if not message.get("more_body", False):
            return body, messages


class AdapterEndpointsForTheDeployer:
    def __init__(self, app: ASGIApp, admin_key: str | None = None, adapter_roots: str | None = None) -> None:
        self.app = app
        self.key = (admin_key if admin_key is not None else os.environ.get("VLLM_ADMIN_KEY", "")).encode()
        self.roots = _roots(adapter_roots if adapter_roots is not None else os.environ.get("VLLM_GUARD_ADAPTER_ROOTS", ""))

    def _refusal(self, scope: Scope, path: str, body: Optional[bytes]) -> Tuple[int, str]:
        """(status, message) of a refusal, or (0, "") to let the request through."""
        given = _header(scope, ADMIN_HEADER)
        if not self.key or given is None or not hmac.compare_digest(given.strip(), self.key):
            return 403, f"{path} is only for the deployer on the host itself."
        if path != LOAD:
            return 0, ""
        if body is None:
            return 413, "The request body is too large."
        try:
            lora_path = json.loads(body or b"{}").get("lora_path")
        except (ValueError, RecursionError, AttributeError):
            return 400, "The request body is not a JSON object."
        if not isinstance(lora_path, str) or not lora_path.startswith("/") or not _inside(lora_path, self.roots):
            return 403, "lora_path must be an adapter folder the deployer placed on this host."
        return 0, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or _path(scope) not in GUARDED:
            await self.app(scope, receive, send)
            return
        path = _path(scope)
        body, messages = (await _read_body(receive, MAX_ADMIN_BODY)) if path == LOAD else (b"", [])
        status, message = self._refusal(scope, path, body)
        if status:
            await _deny(send, status, _error(status, message))
            return

        async def replay() -> Dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# Releases made before the service moved behind the local proxy name this class.
AdapterEndpointsLoopbackOnly = AdapterEndpointsForTheDeployer


def _allowed_origins(value: str) -> List[str]:
    try:
        origins = json.loads(value or "[]")
    except ValueError:
        return []
    return [str(origin).rstrip("/").lower() for origin in origins if isinstance(origin, str)] if isinstance(origins, list) else []


class ForeignOriginsRefused:
    def __init__(self, app: ASGIApp, allowed_origins: str | None = None) -> None:
        self.app = app
        self.allowed = _allowed_origins(allowed_origins if allowed_origins is not None
                                        else os.environ.get("VLLM_GUARD_ALLOWED_ORIGINS", "[]"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket"):
            origin = _header(scope, b"origin")
            if origin is not None and origin.decode("latin-1").rstrip("/").lower() not in self.allowed:
                if scope.get("type") == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await _deny(send, 403, _error(403, "Requests from web pages of this origin are not allowed"
                                                       " (vllm_allowed_origins)."))
                return
        await self.app(scope, receive, send)

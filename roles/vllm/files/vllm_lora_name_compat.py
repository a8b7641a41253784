"""Honour the non-standard ``lora_name`` request field on vLLM 0.11.

Why this exists: some clients (the Niodoo GenerationEngine ``with_lora()``)
select an adapter by sending ``{"model": <base served name>, "lora_name": X}``.
vLLM 0.11.0 selects adapters only through ``model``; it logs that ``lora_name``
was ignored and answers with the BASE model, which looks like success. This
middleware moves ``lora_name`` into ``model`` so vLLM itself decides: the
adapter if it is registered, or vLLM's own 404 ``NotFoundError`` if it is not.
It never falls back to the base model.

Enabled with ``vllm serve ... --middleware vllm_lora_name_compat.LoraNameMiddleware``
(vLLM calls ``app.add_middleware(LoraNameMiddleware)``, so it is the outermost
user middleware and runs before vLLM's API-key check: a rewritten request still
meets that check, but the 400/413 answered here reach clients without a key too.
Only bodies of the two completion paths are read, up to ``max_body_bytes``).

Standard library only: this file is copied into the vLLM venv's site-packages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Optional

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A child of vLLM's "vllm" logger, so the line goes through vLLM's own handler.
logger = logging.getLogger("vllm.lora_name_compat")

REWRITTEN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Names echoed in messages and logs are clipped: they come from the client.
_MAX_ECHO = 200


class RequestTooLarge(Exception):
    """The request body exceeded the buffering limit."""


class BaseNamesUnavailable(Exception):
    """The running app does not expose vLLM's served base model names."""


def _clip(name: str) -> str:
    return name if len(name) <= _MAX_ECHO else name[:_MAX_ECHO] + "..."


def error_body(message: str, err_type: str, code: int,
               param: Optional[str] = None) -> bytes:
    """vLLM's ``ErrorResponse`` shape, so clients parse our errors like its own."""
    return json.dumps({"error": {"message": message, "type": err_type,
                                 "param": param, "code": code}}).encode()


def _relative_path(scope: Scope) -> str:
    # Same rule as vLLM's AuthenticationMiddleware: compare without root_path.
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path


def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _json_content_type(scope: Scope) -> bool:
    """FastAPI parses a body as JSON when the type is absent, */json or */*+json."""
    raw = _header(scope, b"content-type")
    if raw is None:
        return True
    main = raw.decode("latin-1").split(";", 1)[0].strip().lower()
    return main.endswith("/json") or main.endswith("+json")


def base_model_checker(scope: Scope) -> Callable[[str], bool]:
    """Ask the running vLLM which names are its base model.

    Read from the app rather than configuration so the answer is always the
    server's own (``--served-model-name``), whatever the deployment says.
    """
    app = scope.get("app")
    models = getattr(getattr(app, "state", None), "openai_serving_models", None)
    is_base = getattr(models, "is_base_model", None)
    if not callable(is_base):
        raise BaseNamesUnavailable(
            "app.state.openai_serving_models.is_base_model is missing")
    return is_base


@dataclass(frozen=True)
class Decision:
    """What to do with one request body.

    ``status`` set: answer it with ``error``. Else ``body`` set: forward that
    (``model`` now names ``adapter``). Else: forward the original bytes.
    """

    body: Optional[bytes] = None
    adapter: Optional[str] = None
    status: int = 0
    error: bytes = b""


def decide(raw: bytes, is_base: Callable[[str], bool]) -> Decision:
    """Pure rewrite rule, kept apart from the ASGI plumbing so it is testable."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # Not JSON we can read (a ~2 KB body of nested arrays exhausts the
        # recursion limit): like any non-JSON body, vLLM answers its own 400.
        return Decision()
    if not isinstance(payload, dict) or "lora_name" not in payload:
        return Decision()
    lora_name = payload["lora_name"]
    if lora_name is None:
        return Decision()  # explicit "no adapter": vLLM's behaviour is right
    if not isinstance(lora_name, str) or not lora_name:
        return Decision(status=400, error=error_body(
            "`lora_name` must be a non-empty string naming a LoRA adapter.",
            "BadRequestError", 400, "lora_name"))
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        return Decision()  # vLLM's request validation reports the bad type
    if model and model != lora_name and not is_base(model):
        return Decision(status=400, error=error_body(
            f"`model` ({_clip(model)!r}) and `lora_name` ({_clip(lora_name)!r}) "
            "name different adapters; send one of them.",
            "BadRequestError", 400, "lora_name"))
    del payload["lora_name"]
    payload["model"] = lora_name
    try:
        body = json.dumps(payload).encode()
    except (ValueError, RecursionError):
        # Read but too deep to write back (dumps may run on a deeper stack):
        # forwarding the original would serve the base model, so refuse.
        return Decision(status=400, error=error_body(
            "The request body is nested too deeply to honour `lora_name`; "
            "select the adapter with `model` instead.",
            "BadRequestError", 400, "lora_name"))
    return Decision(body=body, adapter=lora_name)


def _with_content_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", [])
               if k.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length).encode()))
    new_scope = dict(scope)
    new_scope["headers"] = headers
    return new_scope


class LoraNameMiddleware:
    """Pure ASGI middleware: ``lora_name`` -> ``model`` on the completion paths."""

    def __init__(self, app: ASGIApp,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or _relative_path(scope) not in REWRITTEN_PATHS
                or not _json_content_type(scope)):
            await self.app(scope, receive, send)
            return

        try:
            raw = await self._read_body(scope, receive)
        except RequestTooLarge:
            await _respond(send, 413, error_body(
                f"Request body larger than {self.max_body_bytes} bytes.",
                "Request Entity Too Large", 413))
            return
        if raw is None:
            return  # client went away while sending: nobody to answer

        try:
            decision = decide(raw, base_model_checker(scope))
        except BaseNamesUnavailable as exc:
            # Fail closed: guessing could serve the base model for an adapter.
            logger.error("lora_name compat disabled: %s", exc)
            await _respond(send, 500, error_body(
                "The server cannot honour `lora_name`; select the adapter "
                "with `model` instead.", "InternalServerError", 500, "lora_name"))
            return

        if decision.status:
            await _respond(send, decision.status, decision.error)
            return
        if decision.body is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        logger.info("lora_name compat: lora_name %r moved into `model`",
                    _clip(decision.adapter or ""))
        await self.app(_with_content_length(scope, len(decision.body)),
                       _replay(decision.body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> Optional[bytes]:
        """Whole body, or None if the client disconnected; bounded by the limit."""
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    raise RequestTooLarge()
            except ValueError:
                pass  # the server rejects a malformed length before we run
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the app the buffered body once, then the real channel.

    Later ``receive()`` calls must reach the server: vLLM and Starlette wait on
    them to notice a client disconnect and abort generation.
    """
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

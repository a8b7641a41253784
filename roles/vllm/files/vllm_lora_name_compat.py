"""Which model a request selects, on vLLM 0.11: two ASGI middlewares.

``LoraNameMiddleware`` honours the non-standard ``lora_name`` request field.
``RequestsPerModel`` counts the requests each served model (the base, every
adapter) receives, on vLLM's own ``/metrics`` (see its docstring). Both read the
``model`` a completion request names; they share one file so the role installs
one file and the path rule is written once.

LoraNameMiddleware. Why it exists: some clients (the Niodoo GenerationEngine ``with_lora()``)
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

LoraNameMiddleware is standard library only; RequestsPerModel imports
``prometheus_client`` (a dependency of vLLM itself) when vLLM builds it. This
file is copied into the vLLM venv's site-packages.
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


# --- RequestsPerModel -----------------------------------------------------------

METRIC = "vllm_deploy_model_requests"
"""Exposed as ``vllm_deploy_model_requests_total`` (and ``_created``) by prometheus_client."""
METRIC_HELP = ("Requests to /v1/chat/completions and /v1/completions by the model they selected "
               "(a base served name, an adapter vLLM serves, or other), as vLLM answered them.")
LABELS = ("model", "kind", "code")
OTHER = "other"
# Distinct `model` label values one process keeps, whatever vLLM serves: a safety net under
# the rule that only names vLLM serves become labels (see RequestsPerModel).
DEFAULT_MAX_MODELS = 64
_UNREAD = object()  # no complete body seen: too large, or answered before vLLM read it


def status_class(status: Optional[int]) -> str:
    """'2xx' .. '5xx' from an HTTP status; 'none' when no answer was sent."""
    if status is None or not 100 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


def requested_model(raw: bytes) -> Any:
    """The ``model`` a completion body names: a str, None (absent/null: vLLM serves the
    base), or _UNREAD when the body is not a JSON object vLLM would accept."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _UNREAD
    if not isinstance(payload, dict):
        return _UNREAD
    model = payload.get("model")
    return model if model is None or isinstance(model, str) else _UNREAD


def _serving_models(scope: Scope) -> Any:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "openai_serving_models", None)


def served_names(models: Any) -> tuple[list[str], list[str]]:
    """(base served names, adapter names) as the running vLLM knows them right now."""
    bases = [str(getattr(path, "name", "")) for path in getattr(models, "base_model_paths", None) or []]
    adapters = [str(name) for name in (getattr(models, "lora_requests", None) or {})]
    return [name for name in bases if name], adapters


def classify(model: Any, models: Any) -> tuple[str, str]:
    """(model label, kind) the way vLLM 0.11 resolves a name (serving_engine._maybe_get_adapters):
    an adapter it serves, else the base (no name, or a base served name), else other."""
    if models is None or model is _UNREAD:
        return OTHER, OTHER
    bases, adapters = served_names(models)
    if isinstance(model, str) and model in adapters:
        return model, "adapter"
    if not model:
        return (bases[0], "base") if bases else (OTHER, OTHER)
    if model in bases:
        return model, "base"
    return OTHER, OTHER


class ModelRequestCounter:
    """The counter and the label values it has handed out (bounded by ``max_models``)."""

    def __init__(self, counter: Any, max_models: int = DEFAULT_MAX_MODELS) -> None:
        self.counter = counter
        self.max_models = max_models
        self.models: set[str] = {OTHER}

    def _label(self, model: str) -> str:
        if model in self.models:
            return model
        if len(self.models) >= self.max_models:
            return OTHER
        self.models.add(model)
        return model

    def count(self, model: str, kind: str, code: str) -> None:
        label = self._label(model)
        self.counter.labels(model=label, kind=kind if label != OTHER else OTHER, code=code).inc()

    def show(self, models: Any) -> None:
        """Start every served name at 0 (code 2xx): a counter that exists before its first
        request gives rate() and before/after readings a starting point."""
        bases, adapters = served_names(models)
        for name, kind in [(name, "base") for name in bases] + [(name, "adapter") for name in adapters]:
            if name not in self.models and len(self.models) < self.max_models:
                self.models.add(name)
                self.counter.labels(model=name, kind=kind, code="2xx")


_DEFAULT: Optional[ModelRequestCounter] = None


def default_counter() -> ModelRequestCounter:
    """One counter per process, on prometheus_client's default REGISTRY: what vLLM 0.11's
    /metrics serves (PROMETHEUS_MULTIPROC_DIR unset; see RequestsPerModel for when it is set).

    Made when vLLM builds its middleware stack (at start-up, after its stat loggers exist):
    vLLM's unregister_vllm_metrics() drops every registered collector whose name contains
    "vllm", and it runs when a stat logger is made.
    """
    global _DEFAULT
    if _DEFAULT is None:
        from prometheus_client import Counter  # vLLM's own dependency; imported on use only

        _DEFAULT = ModelRequestCounter(Counter(METRIC, METRIC_HELP, LABELS))
    return _DEFAULT


class _BodyCopy:
    """A bounded copy of the request body as the app reads it; parsed once complete."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: Optional[list[bytes]] = []  # None: done (parsed, or over the limit)
        self.size = 0
        self.model: Any = _UNREAD

    def add(self, message: Message) -> None:
        if self.chunks is None:
            return
        chunk = message.get("body", b"") or b""
        self.size += len(chunk)
        if self.size > self.limit:
            self.chunks = None
            return
        self.chunks.append(chunk)
        if not message.get("more_body", False):
            raw, self.chunks = b"".join(self.chunks), None
            self.model = requested_model(raw)


class RequestsPerModel:
    """Pure ASGI middleware: count completion requests per selected model on /metrics.

    vLLM 0.11 has no per-adapter request count: ``vllm:request_success_total`` carries the
    base model's name even for adapter requests, ``vllm:lora_requests_info`` is a gauge of
    timestamps (absent when idle). This counts every POST to /v1/chat/completions and
    /v1/completions that reaches it, when vLLM answers (or fails to):

        vllm_deploy_model_requests_total{model, kind, code}

    - ``model``: the name the request selected, after ``LoraNameMiddleware`` moved a
      ``lora_name`` into ``model`` (it must run inside that middleware: first in the
      ``--middleware`` list); a base served name, an adapter vLLM serves, or ``other``;
    - ``kind``: ``base``, ``adapter`` or ``other``;
    - ``code``: vLLM's answer, ``2xx``/``4xx``/``5xx``, ``none`` when none was sent.

    The name comes from the client, so only names the running vLLM serves become label
    values (its ``openai_serving_models``, asked when it answers: an adapter loaded at run
    time counts under its name), at most ``max_models`` of them per process; everything
    else (unknown names, bodies that are not JSON, bodies over ``max_body_bytes``, requests
    answered before their body was read, like vLLM's own 401) is ``other``. Label memory is
    bounded whatever clients send.

    It never answers, changes or delays a request: the body reaches vLLM chunk by chunk as
    vLLM reads it, and a bounded copy is parsed once complete. Requests answered before they
    reach it are not counted: the role's access guards (outer middlewares) and
    LoraNameMiddleware's own 400/413.

    Registry: prometheus_client's default REGISTRY, which vLLM 0.11's /metrics serves when
    PROMETHEUS_MULTIPROC_DIR is unset (one API server, the role's case). vLLM sets that
    variable itself for ``--api-server-count`` > 1 before it starts the API server
    processes; prometheus_client then keeps this counter in files in that directory, each
    process its own, and the /metrics of any process sums them (the ``_created`` series is
    not kept in that mode).
    """

    def __init__(self, app: ASGIApp, counter: Optional[ModelRequestCounter] = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.counter = counter if counter is not None else default_counter()
        self.max_body_bytes = max_body_bytes
        self._warned = False

    def _models(self, scope: Scope) -> Any:
        models = _serving_models(scope)
        if models is None and not self._warned:
            self._warned = True
            logger.warning("requests per model: app.state.openai_serving_models is missing;"
                           " every request counts as %r", OTHER)
        return models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        models = _serving_models(scope)
        if models is not None:
            self.counter.show(models)  # before /metrics answers, too
        if scope.get("method") != "POST" or _relative_path(scope) not in REWRITTEN_PATHS:
            await self.app(scope, receive, send)
            return

        body = _BodyCopy(self.max_body_bytes)
        counted = False

        def count(status: Optional[int]) -> None:
            nonlocal counted
            if not counted:
                counted = True
                model, kind = classify(body.model, self._models(scope))
                self.counter.count(model, kind, status_class(status))

        async def tee() -> Message:
            message = await receive()
            if message.get("type") == "http.request":
                body.add(message)
            return message

        async def watch(message: Message) -> None:
            if message.get("type") == "http.response.start":
                count(int(message.get("status", 0)))
            await send(message)

        try:
            await self.app(scope, tee, watch)
        except Exception:
            count(500)  # Starlette's ServerErrorMiddleware answers 500
            raise
        finally:
            count(None)

"""A real HTTP server on 127.0.0.1, served from a thread, for modules that speak HTTP.

The test gives the server a function that answers one request; the server keeps
every request it saw (method, path, headers, JSON body) for the test to check.
An answer's body is sent as vLLM's FastAPI app sends it: a dict or list as compact
JSON (Starlette's ``JSONResponse``, see as_sent), a str or bytes as is with no content
type (``Response(content=...)``).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional


@dataclass
class Request:
    method: str
    path: str
    headers: Message  # case-insensitive .get(), as HTTP headers are
    body: Any  # the JSON body, None without one (or when it is not JSON)
    raw: bytes


Answer = Callable[[Request], tuple[int, Any]]


def as_sent(body: Any) -> str:
    """A JSON body as Starlette's JSONResponse renders it (and so as a client reads it)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class LocalServer(ThreadingHTTPServer):
    """Answers each request with answer(request) = (status, body). Use as a context manager."""

    def __init__(self, answer: Optional[Answer] = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer_function = answer
        self.seen: list[Request] = []
        self._thread: Optional[threading.Thread] = None

    def answer(self, request: Request) -> tuple[int, Any]:
        assert self.answer_function is not None, "give LocalServer an answer function or override answer()"
        return self.answer_function(request)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> LocalServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(self.command, self.path, self.headers, body, raw)
        self.server.seen.append(request)
        status, answer = self.server.answer(request)
        if isinstance(answer, (dict, list)):
            data, kind = as_sent(answer).encode(), "application/json"
        else:
            data, kind = (answer.encode() if isinstance(answer, str) else answer or b""), ""
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def refused_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"

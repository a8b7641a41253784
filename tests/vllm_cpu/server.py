"""Run a real vLLM 0.11.0 (CPU build) server as a plain process, for contract tests.

Every wait is bounded and every process is cleaned up: vLLM's API server starts
an engine-core child, so the server runs in its own session and ``stop()``
signals the whole process group, then sweeps the session for stragglers.
The server listens on 127.0.0.1 only, with caches in a private directory, and
the environment is scrubbed of the caller's ``VLLM_*``/``HF_*`` settings so a
stray ``VLLM_API_KEY`` or cache path cannot change what a test sees.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from tests.vllm_cpu.wheelhouse import lock_hash

DEFAULT_CACHE = Path("/var/cache/vllm-lora-ansible")
STARTUP_TIMEOUT = 240.0
"""Seconds; start-up takes ~20-30 s on 2 cores, more when the machine is busy."""
STOP_TIMEOUT = 20.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SCRUB_PREFIXES = ("VLLM_", "HF_", "HUGGING", "TRANSFORMERS_", "PYTHON", "VIRTUAL_ENV", "TORCH")


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_LORA_CACHE", str(DEFAULT_CACHE)))


def venv_path() -> Path:
    """The runtime venv ``tests/vllm_cpu/wheelhouse.py`` installs for this lock file."""
    return cache_root() / "venvs" / f"vllm-cpu-{lock_hash()}"


def venv_ready(venv: Path | None = None) -> bool:
    venv = venv or venv_path()
    return (venv / ".complete").is_file() and (venv / "bin" / "vllm").is_file()


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(cache_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Offline, hermetic environment for ``vllm serve``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache_dir / "hf"),
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "VLLM_CONFIG_ROOT": str(cache_dir / "vllm-config"),
        "XDG_CACHE_HOME": str(cache_dir / "xdg"),
        "XDG_CONFIG_HOME": str(cache_dir / "xdg-config"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",  # log lines reach the file when they happen
    })
    env.update(extra or {})
    return env


class ServerError(RuntimeError):
    """The server did not do what the test needed; the message carries the log tail."""


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (children that left the process group too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after "(comm)": state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class VllmServer:
    """``vllm serve MODEL ARGS`` on 127.0.0.1:<free port>; a context manager.

    ``with VllmServer(model, args) as server:`` starts the process and waits
    for ``/health``; leaving the block stops it (and its engine child).
    """

    model: Path
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    venv: Path = field(default_factory=venv_path)
    workdir: Path | None = None
    startup_timeout: float = STARTUP_TIMEOUT
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)
    started_at: float = field(default=0.0, init=False)
    ready_after: float | None = field(default=None, init=False)
    """Seconds from launch to the first 200 on /health."""
    health_probes: list[str] = field(default_factory=list, init=False)
    """Every /health outcome seen while waiting: "refused", "timeout", or the status code."""
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vllm-server-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"vllm-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "vllm"), "serve", str(self.model),
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self) -> VllmServer:
        if self.process is not None:
            raise ServerError("already started")
        assert self.workdir is not None
        if not venv_ready(self.venv):
            raise ServerError(f"vLLM venv {self.venv} is not ready (no .complete)")
        env = server_env(self.workdir / "cache", self.env)
        with self.log_path.open("wb") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir, start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        """The combined stdout/stderr so far, without the ANSI colours vLLM adds."""
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def probe_health(self) -> str:
        """One GET /health: "refused", "timeout" or the status code as text."""
        try:
            return str(httpx.get(f"{self.url}/health", timeout=2.0).status_code)
        except httpx.ConnectError:
            return "refused"
        except httpx.TimeoutException:
            return "timeout"

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll /health until 200; fail at once, with the log tail, if the process exits."""
        if self.process is None:
            raise ServerError("not started")
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            probe = self.probe_health()
            if not self.health_probes or self.health_probes[-1] != probe:
                self.health_probes.append(probe)
            if probe == "200":
                self.ready_after = time.monotonic() - self.started_at
                return self.ready_after
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"vllm serve exited with {code} before it was ready:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ServerError(f"vllm serve not ready after {timeout or self.startup_timeout:.0f} s:\n"
                          f"{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit on its own; its code or None."""
        if self.process is None:
            raise ServerError("not started")
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT, then sweep the session."""
        if self.process is None:
            return None
        sid = self.process.pid  # start_new_session: pid == pgid == sid
        if self.process.poll() is None:
            try:
                os.killpg(sid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := _session_pids(sid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait(timeout=STOP_TIMEOUT)
        if left := _session_pids(sid):
            raise ServerError(f"processes of the vLLM session survived SIGKILL: {left}")
        return code

    def close(self) -> None:
        """Stop and drop the private work directory (log included)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class FailedStart:
    returncode: int
    log: str
    seconds: float


def run_expect_failure(model: Path, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                       venv: Path | None = None, workdir: Path | None = None,
                       timeout: float = STARTUP_TIMEOUT) -> FailedStart:
    """Start a server that must NOT come up; return its exit code and log.

    Raises :class:`ServerError` if it becomes healthy or is still running after
    ``timeout`` s (it is stopped either way), so a test cannot pass by accident.
    """
    server = VllmServer(model, args, env=env or {}, venv=venv or venv_path(), workdir=workdir,
                        startup_timeout=timeout)
    server.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = server.wait_exit(timeout=1.0)
            if code is not None:
                return FailedStart(code, server.log_text(), time.monotonic() - server.started_at)
            if server.probe_health() == "200":
                raise ServerError(f"vllm serve started although it should have failed:\n{server.log_tail()}")
        raise ServerError(f"vllm serve neither failed nor started in {timeout:.0f} s:\n{server.log_tail()}")
    finally:
        server.stop()

"""A real vLLM 0.11.0 (CPU build) for the contract tests: few starts, one at a time.

Each start costs ~25-40 s on 2 cores, so the module shares one long-lived
server (two static adapters, run-time updating on, an API key) and one
start-up that must fail. The failing start is a dependency of the shared
server's fixture only to order them: two vLLM processes never run at once.

Without the runtime venv the tests are skipped, except under CI (env ``CI``
set), where a missing venv is a failure: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.tinyqwen import MAX_LORA_RANK, Fixtures, make_all
from tests.vllm_cpu.server import FailedStart, ServerError, VllmServer, run_expect_failure, venv_path, venv_ready

SERVED_NAME = "tinyqwen"
MAX_LORAS = 2
MAX_MODEL_LEN = 512
REQUEST_TIMEOUT = 60.0
# The role's shipped middlewares (copied into the venv's site-packages on a host).
SHIPPED_MIDDLEWARES = Path(__file__).resolve().parents[2] / "roles" / "vllm" / "files"
COUNTER_MODULE = "vllm_lora_name_compat"


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    if not venv_ready():
        reason = (f"vLLM 0.11.0 CPU venv {venv_path()} is not ready (no .complete): "
                  "run `python tests/vllm_cpu/wheelhouse.py --cache $VLLM_LORA_CACHE` "
                  "or `scripts/setup.sh --vllm`")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return venv_path()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    return make_all(tmp_path_factory.mktemp("tinyqwen"))


@pytest.fixture(scope="module")
def rank_failure(vllm_venv: Path, tiny: Fixtures,
                 tmp_path_factory: pytest.TempPathFactory) -> FailedStart | ServerError:
    """A start with a static adapter of rank 64 > --max-lora-rank 16 (must exit)."""
    try:
        return run_expect_failure(
            tiny.model,
            ["--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN),
             "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK),
             "--lora-modules", f"big={tiny.broken['rank_too_high'].path}"],
            venv=vllm_venv, workdir=tmp_path_factory.mktemp("vllm-rank-failure"),
        )
    except ServerError as error:  # reported by the test, not as a fixture error
        return error


@dataclass
class Live:
    """The shared server and what the tests need to know about how it was started.

    (Tests read the settings from here rather than importing this conftest.)
    """

    server: VllmServer
    client: httpx.Client
    """Sends the API key; use ``httpx`` directly for requests without it."""
    api_key: str
    first_models: dict[str, Any]
    """/v1/models as answered right after /health first said 200."""
    served_name: str = SERVED_NAME
    max_loras: int = MAX_LORAS
    max_model_len: int = MAX_MODEL_LEN


@pytest.fixture(scope="module")
def live(vllm_venv: Path, tiny: Fixtures, rank_failure: FailedStart | ServerError,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    del rank_failure  # ordering only: that server has exited before this one starts
    api_key = secrets.token_urlsafe(16)
    server = VllmServer(
        tiny.model,
        ["--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN),
         "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", str(MAX_LORAS),
         "--max-cpu-loras", "4",
         "--lora-modules", f"alpha={tiny.adapters['alpha']}", f"beta={tiny.adapters['beta']}",
         # The shipped request counter only observes (the tests of vLLM's own behaviour see vLLM's
         # answers unchanged); LoraNameMiddleware is left out: lora_name must meet vLLM alone.
         "--middleware", f"{COUNTER_MODULE}.RequestsPerModel"],
        # the key in the environment, never on the command line
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_API_KEY": api_key,
             "PYTHONPATH": str(SHIPPED_MIDDLEWARES)},
        venv=vllm_venv, workdir=tmp_path_factory.mktemp("vllm-live"),
    )
    with server:
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT,
                          headers={"Authorization": f"Bearer {api_key}"}) as client:
            first_models = client.get("/v1/models").json()
            yield Live(server, client, api_key, first_models)

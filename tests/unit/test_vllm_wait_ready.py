"""vllm_wait_ready: an answer on the API port counts only while the service's socket unit holds the port."""

from __future__ import annotations

import pytest

from tests.unit.loader import load

wait_ready = load("roles/vllm/library/vllm_wait_ready.py", "vllm_wait_ready")
SOCKET = "vllm-proxy.socket"


@pytest.mark.parametrize("state", [
    {"LoadState": "loaded", "ActiveState": "active", "SubState": "listening", "Result": "success"},
    {"LoadState": "loaded", "ActiveState": "active", "SubState": "running", "Result": "success"},
    # A release made before the socket units: vLLM listens itself.
    {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead", "Result": "success"},
])
def test_the_services_own_socket_is_no_problem(state: dict[str, str]) -> None:
    assert wait_ready.socket_problem(SOCKET, state) == ""


@pytest.mark.parametrize("state", [
    # Seen on a test host when another process held 0.0.0.0:8000: the bind failed, the service ran anyway.
    {"LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "Result": "resources"},
    {"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "success"},
])
def test_an_answer_without_the_services_socket_is_someone_elses(state: dict[str, str]) -> None:
    problem = wait_ready.socket_problem(SOCKET, state)
    assert f"{SOCKET} is {state['ActiveState']}/{state['SubState']}" in problem
    assert f"result {state['Result']}" in problem and "another process holds the port" in problem

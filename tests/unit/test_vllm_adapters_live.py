"""plugins/modules/vllm_adapters_live.py: adapters loaded and unloaded in a running vLLM.

What roles/vllm/tasks/service.yml relies on: the served adapter set is brought
to the declared one (unload before load, a changed adapter reloaded), a
converged server is left alone (changed false, nothing posted), check mode
posts nothing, the applied marker is touched only after a change was applied,
every failure names the adapter, its path, vLLM's answer and the setting to fix,
and neither the deployer's admin key nor the API key shows in a result.

The module runs in-process as Ansible would run it, against a real HTTP server
on 127.0.0.1 playing a vLLM 0.11.0 started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1:
/v1/models starts as the recording tests/unit/data/vllm_0.11.0/models.json, the
adapter endpoints answer as vLLM's source does (cited below), and the shipped
access guard (roles/vllm/files/vllm_access_guard.py) itself stands in front of
them, so a request without the deployer's key is refused as on a host.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.unit.loader import load
from tests.unit.local_http import LocalServer, Request, as_sent
from tests.unit.modules import run_main

live = load("plugins/modules/vllm_adapters_live.py")
guard = load("roles/vllm/files/vllm_access_guard.py")

DATA = Path(__file__).resolve().parent / "data" / "vllm_0.11.0"
MODELS = json.loads((DATA / "models.json").read_text())["body"]
UNAUTHORIZED = json.loads((DATA / "models_unauthorized.json").read_text())["body"]
API_KEY = "test-key"  # the key the recordings were made with
# As service.yml makes it: "VLLM_ADMIN_KEY=" + secrets.token_urlsafe(32).
ADMIN_KEY = "qG7v0m3SxQ2b9yP1hT4kLw8eZc5aRn6dFj0uHs2oVxM"
MAX_LORA_RANK = 16  # the fake engine's --max-lora-rank (vLLM's default)


def vllm_error(message: str, kind: str, status: int) -> dict[str, Any]:
    """vLLM's ErrorResponse body (entrypoints/openai/serving_models.py: create_error_response)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class FakeVllm(LocalServer):
    """vLLM 0.11.0's adapter endpoints behind the shipped access guard.

    Order as on a host: vLLM's build_app (entrypoints/openai/api_server.py) adds the
    `--middleware` classes after its own AuthenticationMiddleware, Starlette puts the
    last added outermost, and the role's list ends with ApiKeyOnEveryRoute (__vllm_middleware
    in roles/vllm/vars/main.yml, same 401 body as vLLM's): so the API key is checked
    first, then the deployer's guard, then vLLM's route.
    """

    def __init__(self, adapter_roots: str, api_key: Optional[str] = API_KEY,
                 runtime_updating: bool = True) -> None:
        super().__init__()
        self.api_key = api_key
        self.runtime_updating = runtime_updating
        self.adapter_roots = adapter_roots
        # OpenAIServingModels.lora_requests: name -> path, in load order; starts as recorded.
        self.loaded = {card["id"]: card["root"] for card in MODELS["data"] if card["parent"]}

    def models(self) -> dict[str, Any]:
        """OpenAIServingModels.show_available_models: base cards, then one card per loaded adapter."""
        base = [card for card in MODELS["data"] if not card["parent"]]
        adapters = [self.card(name, path) for name, path in self.loaded.items()]
        return {"object": MODELS["object"], "data": base + adapters}

    @staticmethod
    def card(name: str, path: str) -> dict[str, Any]:
        """The recorded card of that name, else one made like it (each card has its own permission id)."""
        recorded_cards = {card["id"]: card for card in MODELS["data"] if card["parent"]}
        card = copy.deepcopy(recorded_cards.get(name, recorded_cards["alpha"]))
        if name not in recorded_cards:
            card["permission"][0]["id"] = f"modelperm-{name}"
        return dict(card, id=name, root=path)

    def answer(self, request: Request) -> tuple[int, Any]:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, UNAUTHORIZED  # vLLM's --api-key on /v1
        if request.path in guard.GUARDED:
            refusal = self.guard(request)
            if refusal:
                return refusal
        if (request.method, request.path) == ("GET", "/v1/models"):
            return 200, self.models()
        if not self.runtime_updating or request.method != "POST":
            # The adapter routes exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING
            # (api_server.py); FastAPI answers any other path like this.
            return 404, {"detail": "Not Found"}
        body = request.body or {}
        if request.path == "/v1/load_lora_adapter":
            return self.load_adapter(body["lora_name"], body["lora_path"])
        return self.unload_adapter(body["lora_name"])

    def guard(self, request: Request) -> Optional[tuple[int, Any]]:
        """The shipped AdapterEndpointsForTheDeployer on this request: its refusal, or None."""
        reached: list[bool] = []
        sent: list[dict[str, Any]] = []

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            reached.append(True)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": request.raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": request.method, "path": request.path, "root_path": "",
                 "client": ("127.0.0.1", 40000),
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]}
        middleware = guard.AdapterEndpointsForTheDeployer(app, admin_key=ADMIN_KEY, adapter_roots=self.adapter_roots)
        asyncio.run(middleware(scope, receive, send))
        return None if reached else (sent[0]["status"], json.loads(sent[1]["body"]))

    def load_adapter(self, name: str, path: str) -> tuple[int, Any]:
        """OpenAIServingModels.load_lora_adapter (entrypoints/openai/serving_models.py)."""
        if name in self.loaded:  # _check_load_lora_adapter_request
            return 400, vllm_error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
        # engine_client.add_lora: a failure in the engine core comes back as
        # "Call to add_lora method failed: <error>" (v1/engine/core.py), 404 when it
        # says "No adapter found" (lora/worker_manager.py: _load_adapter), else 400.
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return 404, vllm_error(f"Call to add_lora method failed: Loading lora {name} failed: "
                                   f"No adapter found for {path}", "NotFoundError", 404)
        rank = json.loads(config.read_text())["r"]
        if rank > MAX_LORA_RANK:  # lora/peft_helper.py: validate_legal
            return 400, vllm_error(f"Call to add_lora method failed: LoRA rank {rank} is greater than "
                                   f"max_lora_rank {MAX_LORA_RANK}.", "BadRequestError", 400)
        self.loaded[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, name: str) -> tuple[int, Any]:
        """OpenAIServingModels.unload_lora_adapter (entrypoints/openai/serving_models.py)."""
        if name not in self.loaded:  # _check_unload_lora_adapter_request
            return 404, vllm_error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.loaded[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def posts(self) -> list[tuple[str, Any]]:
        return [(r.path, r.body) for r in self.seen if r.method == "POST"]


@pytest.fixture()
def adapter_dir(tmp_path: Path) -> Path:
    """The role's adapter folder on the host (__vllm_adapter_dir)."""
    return tmp_path / "srv-vllm" / "adapters"


def place(adapter_dir: Path, name: str, rank: int = 8) -> str:
    """An adapter folder as the role places it (what vLLM reads of it here: adapter_config.json)."""
    folder = adapter_dir / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16,
                                                             "target_modules": ["q_proj", "v_proj"]}))
    return str(folder)


@pytest.fixture()
def vllm(adapter_dir: Path) -> Iterator[FakeVllm]:
    with FakeVllm(str(adapter_dir)) as server:
        yield server


@pytest.fixture()
def admin_env(tmp_path: Path) -> Path:
    """The root-only file service.yml writes: one line VLLM_ADMIN_KEY=<key>."""
    path = tmp_path / "etc-vllm" / "vllm-admin.env"
    path.parent.mkdir()
    path.write_text(f"VLLM_ADMIN_KEY={ADMIN_KEY}\n")
    path.chmod(0o600)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "var-lib-vllm" / "applied-live"


def run(capsys: pytest.CaptureFixture[str], server: FakeVllm, admin_env: Optional[Path], marker: Path,
        adapters: list[dict[str, str]], **args: Any) -> tuple[int, dict[str, Any]]:
    """main() as service.yml calls it; (exit code, result JSON). Secrets must never show."""
    marker.parent.mkdir(exist_ok=True)
    args = {"url": server.url, "api_key": API_KEY, "admin_key_file": str(admin_env) if admin_env else None,
            "adapters": adapters, "applied_marker": str(marker), **args}
    rc, result = run_main(live.main, args, capsys)
    text = json.dumps(result)
    assert ADMIN_KEY not in text and API_KEY not in text, result
    return rc, result


def recorded(name: str) -> dict[str, str]:
    """A declared adapter at the path the recorded server serves it from."""
    return {"name": name, "path": next(c["root"] for c in MODELS["data"] if c["id"] == name)}


# --- pure logic ---------------------------------------------------------------------
def test_plan_unloads_the_undeclared_loads_the_new_and_reloads_the_changed() -> None:
    assert live.plan(["alpha", "beta"], ["alpha", "beta"], []) == ([], [])
    assert live.plan(["alpha", "beta"], ["alpha", "gamma"], []) == (["beta"], ["gamma"])
    assert live.plan(["alpha", "beta"], ["alpha", "beta"], ["alpha"]) == (["alpha"], ["alpha"])
    # A changed name that is not served yet is loaded once, not unloaded first.
    assert live.plan(["alpha"], ["alpha", "gamma"], ["gamma"]) == ([], ["gamma"])


def test_admin_key_is_read_from_the_role_made_file_and_empty_without_one(
        admin_env: Path, tmp_path: Path) -> None:
    assert live.admin_key(str(admin_env)) == ADMIN_KEY
    other = tmp_path / "other.env"
    other.write_text(f"# made by the role\nVLLM_API_KEY=not-this\nVLLM_ADMIN_KEY={ADMIN_KEY}\n")
    assert live.admin_key(str(other)) == ADMIN_KEY
    assert live.admin_key(str(tmp_path / "missing.env")) == ""
    assert live.admin_key(None) == ""


# --- the fake server against the recording ------------------------------------------
def test_fake_server_starts_as_the_recorded_vllm_answers(vllm: FakeVllm) -> None:
    assert vllm.models() == MODELS


# --- the whole module ---------------------------------------------------------------
def test_converged_server_is_left_alone(
        vllm: FakeVllm, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha"), recorded("beta")])
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["loaded"], result["unloaded"]) == (False, [], [])
    assert vllm.posts() == []
    assert not marker.exists()


def test_declared_set_is_reached_unloading_first_with_the_deployers_key(
        vllm: FakeVllm, adapter_dir: Path, admin_env: Path, marker: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gamma = place(adapter_dir, "gamma")
    declared = [recorded("alpha"), {"name": "gamma", "path": gamma}]
    rc, result = run(capsys, vllm, admin_env, marker, declared)
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["unloaded"], result["loaded"]) == (True, ["beta"], ["gamma"])
    assert vllm.posts() == [("/v1/unload_lora_adapter", {"lora_name": "beta"}),
                            ("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": gamma})]
    assert vllm.loaded == {"alpha": recorded("alpha")["path"], "gamma": gamma}
    # The admin key goes to the guarded endpoints only; the API key to every request.
    for request in vllm.seen:
        admin = request.headers.get("X-Vllm-Admin-Key")
        assert admin == (ADMIN_KEY if request.method == "POST" else None), request.path
        assert request.headers.get("Authorization") == f"Bearer {API_KEY}"
    assert marker.is_file()
    # Converged now: the same call again changes nothing.
    rc, result = run(capsys, vllm, admin_env, marker, declared)
    assert rc == 0 and result["changed"] is False and len(vllm.posts()) == 2


def test_changed_adapter_is_unloaded_then_loaded_from_its_path(
        vllm: FakeVllm, adapter_dir: Path, admin_env: Path, marker: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    alpha = place(adapter_dir, "alpha")
    rc, result = run(capsys, vllm, admin_env, marker, [{"name": "alpha", "path": alpha}, recorded("beta")],
                     changed_names=["alpha"])
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["unloaded"], result["loaded"]) == (True, ["alpha"], ["alpha"])
    assert vllm.posts() == [("/v1/unload_lora_adapter", {"lora_name": "alpha"}),
                            ("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": alpha})]
    assert vllm.loaded["alpha"] == alpha


def test_only_adapter_cards_count_the_base_model_is_never_unloaded(
        vllm: FakeVllm, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = run(capsys, vllm, admin_env, marker, [])
    assert rc == 0, result.get("msg")
    assert result["unloaded"] == ["alpha", "beta"] and result["loaded"] == []
    assert vllm.loaded == {}
    assert [card["id"] for card in vllm.models()["data"]] == ["tiny"]


def test_check_mode_reports_the_change_and_posts_nothing(
        vllm: FakeVllm, adapter_dir: Path, admin_env: Path, marker: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gamma = place(adapter_dir, "gamma")
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha"), {"name": "gamma", "path": gamma}],
                     _ansible_check_mode=True)
    assert rc == 0, result.get("msg")
    assert (result["changed"], result["unloaded"], result["loaded"]) == (True, ["beta"], ["gamma"])
    assert vllm.posts() == []
    assert set(vllm.loaded) == {"alpha", "beta"}
    assert not marker.exists()


def test_applied_marker_is_renewed_after_a_change(
        vllm: FakeVllm, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vllm_service_freshness compares it with the unit's files: it must be newer than them."""
    marker.parent.mkdir()
    marker.write_text("")
    os.utime(marker, (1_000_000, 1_000_000))
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha")])
    assert rc == 0 and result["changed"] is True, result
    assert marker.stat().st_mtime > 1_000_000


def test_failed_load_names_adapter_path_and_vllms_reason_and_leaves_the_marker(
        vllm: FakeVllm, adapter_dir: Path, admin_env: Path, marker: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(adapter_dir / "gamma")  # declared, never placed on the host
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha"), recorded("beta"),
                                                       {"name": "gamma", "path": missing}])
    assert rc == 1
    answer = as_sent(vllm_error(f"Call to add_lora method failed: Loading lora gamma failed: "
                                   f"No adapter found for {missing}", "NotFoundError", 404))
    assert result["msg"] == (f"loading adapter 'gamma' from {missing} answered 404: {answer}. "
                             "The answer above is vLLM's; fix the adapter it names, or run site.yml to apply "
                             "the set with a restart.")
    assert not marker.exists()


def test_adapter_vllm_rejects_fails_with_vllms_reason(
        vllm: FakeVllm, adapter_dir: Path, admin_env: Path, marker: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    wide = place(adapter_dir, "wide", rank=64)
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha"), recorded("beta"),
                                                       {"name": "wide", "path": wide}])
    assert rc == 1
    assert result["msg"].startswith(f"loading adapter 'wide' from {wide} answered 400: ")
    assert "LoRA rank 64 is greater than max_lora_rank 16." in result["msg"]
    assert "wide" not in vllm.loaded and not marker.exists()


def test_server_without_runtime_updating_names_the_setting(
        adapter_dir: Path, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gamma = place(adapter_dir, "gamma")
    with FakeVllm(str(adapter_dir), runtime_updating=False) as server:
        rc, result = run(capsys, server, admin_env, marker,
                         [recorded("alpha"), recorded("beta"), {"name": "gamma", "path": gamma}])
    assert rc == 1
    assert result["msg"] == (f"loading adapter 'gamma' from {gamma} answered 404: "
                             '{"detail":"Not Found"}. The running service has no runtime updating: set '
                             "vllm_allow_runtime_lora_updating: true and run site.yml (it restarts the service).")


@pytest.mark.parametrize("key_file", ["missing", "wrong key"])
def test_without_the_deployers_key_the_guard_refuses_and_the_run_fails(
        vllm: FakeVllm, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str], key_file: str) -> None:
    if key_file == "missing":
        admin_env.unlink()
    else:
        admin_env.write_text("VLLM_ADMIN_KEY=not-the-hosts-key\n")
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha")])
    assert rc == 1
    assert result["msg"].startswith("unloading adapter 'beta' answered 403: ")
    assert "/v1/unload_lora_adapter is only for the deployer on the host itself." in result["msg"]
    assert result["msg"].endswith("run site.yml to restart it with the current key.")
    assert set(vllm.loaded) == {"alpha", "beta"} and not marker.exists()


def test_a_wrong_api_key_fails_on_the_first_request(
        vllm: FakeVllm, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = run(capsys, vllm, admin_env, marker, [recorded("alpha")], api_key="wrong")
    assert rc == 1
    assert result["msg"] == ('GET /v1/models answered 401: {"error":"Unauthorized"}. The API key was refused: '
                             "vllm_api_key must be the key the running service was started with.")
    assert "wrong" not in result["msg"]
    assert vllm.posts() == []


def test_without_an_api_key_no_authorization_is_sent(
        adapter_dir: Path, admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """service.yml omits api_key when vllm_api_key is empty; the server then has no --api-key."""
    with FakeVllm(str(adapter_dir), api_key=None) as server:
        rc, result = run(capsys, server, admin_env, marker, [recorded("alpha")], api_key=None)
        assert rc == 0, result.get("msg")
        assert result["unloaded"] == ["beta"]
        assert [r.headers.get("Authorization") for r in server.seen] == [None, None]


def test_a_service_that_does_not_answer_is_named_with_its_address(
        admin_env: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found while writing these tests: a refused connection raised out of the module (a traceback)."""
    with socket.socket() as spare:  # a port nobody listens on
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    rc, result = run_main(live.main, {"url": f"http://127.0.0.1:{port}", "adapters": [], "timeout": 2,
                                      "admin_key_file": str(admin_env), "applied_marker": str(marker)}, capsys)
    assert rc == 1
    assert result["msg"].startswith(f"GET /v1/models answered 0: no answer from http://127.0.0.1:{port}/v1/models: ")
    assert result["msg"].endswith("Is the service running (systemctl status vllm) and vllm_listen_host/vllm_port "
                                  "its address?")

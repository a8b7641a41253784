"""Shared pieces of the end-to-end tests: fixtures on disk, the shared software
image, converged hosts. Everything runs against real systemd containers and a
real vLLM 0.11.0 (CPU build) inside them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.fixtures import tinyqwen
from tests.harness.ansible import REPO, PlayResult, run_playbook
from tests.harness.hosts import CACHE, HostPool, remove_stale, write_inventory
from tests.harness.software import LOCAL_GROUP_VARS, ensure_software_image
from tests.vllm_cpu import wheelhouse
LOG_DIR = Path(os.environ.get("VLLM_LORA_TEST_LOGS", REPO / "build" / "test-logs"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_ready() -> None:
    """The e2e tier needs dockerd, the base image and the wheelhouse (scripts/setup.sh --vllm)."""
    problems = []
    try:
        docker.from_env().ping()
    except Exception as error:  # noqa: BLE001 - any failure means "no engine"
        problems.append(f"Docker engine not reachable ({error})")
    if not (CACHE / "wheelhouse" / f".complete-{wheelhouse.lock_hash()}").exists():
        problems.append(f"wheelhouse missing in {CACHE / 'wheelhouse'}")
    if problems:
        message = "; ".join(problems) + ": run scripts/setup.sh --vllm"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> tinyqwen.Fixtures:
    return tinyqwen.make_all(tmp_path_factory.mktemp("fixtures"))


def declaration_vars(fx: tinyqwen.Fixtures, adapters: tuple[str, ...] = ("alpha", "beta"), **overrides: object) -> dict[str, object]:
    """The local inventory's declaration, pointed at this run's fixtures."""
    return {
        "vllm_model": {"name": "tiny-qwen2", "source": "controller", "path": str(fx.model),
                       "aliases": [fx.base_model_name]},
        "vllm_lora_adapters": [
            {"name": name, "source": "controller", "path": str(fx.adapters[name])} for name in adapters
        ],
        **overrides,
    }


def write_vars(path: Path, data: dict[str, object]) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


@pytest.fixture(scope="session")
def software_image(e2e_ready: None, fixtures: tinyqwen.Fixtures, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Base image + vLLM venv, shared by every test host (see tests/harness/software.py)."""
    workdir = tmp_path_factory.mktemp("software-image")
    return ensure_software_image(workdir, write_vars(workdir / "vars.json", declaration_vars(fixtures)),
                                 log=LOG_DIR / "software-image.log")


@pytest.fixture(scope="session", autouse=True)
def no_leftover_containers() -> Iterator[None]:
    yield
    try:
        remove_stale(docker.from_env())
    except Exception:  # noqa: BLE001 - no engine: nothing was started
        pass


class Deployment:
    """Hosts plus the inventory and vars to run playbooks against them."""

    def __init__(self, pool: HostPool, workdir: Path, fx: tinyqwen.Fixtures, inventory: Path | None = None) -> None:
        self.pool = pool
        self.workdir = workdir
        self.fixtures = fx
        self.inventory = inventory or write_inventory(workdir / "inventory", pool.names, group_vars_from=LOCAL_GROUP_VARS)
        self.runs = 0

    def report(self, name: str = "site") -> dict[str, dict[str, object]]:
        """The JSON deployment report the last run of playbook `name` wrote."""
        return json.loads((self.workdir / "reports" / f"{name}-latest.json").read_text())

    def play(self, *extra_args: str, adapters: tuple[str, ...] = ("alpha", "beta"),
             playbook: str = "site.yml", project: Path | None = None,
             env: dict[str, str] | None = None, **overrides: object) -> PlayResult:
        self.runs += 1
        overrides.setdefault("vllm_report_dir", str(self.workdir / "reports"))
        vars_file = write_vars(self.workdir / f"vars-{self.runs}.json",
                               declaration_vars(self.fixtures, adapters, **overrides))
        return run_playbook(playbook, self.inventory, extra_args=extra_args, project=project, env=env,
                            extra_vars_files=[vars_file], log=LOG_DIR / f"{self.workdir.name}.log")


@pytest.fixture(scope="module")
def deployment(software_image: str, fixtures: tinyqwen.Fixtures,
               tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    count = getattr(request.module, "HOST_COUNT", 1)
    with HostPool(image=software_image, count=count, prefix="vllm-e2e") as pool:
        yield Deployment(pool, tmp_path_factory.mktemp(request.module.__name__.split(".")[-1]), fixtures)

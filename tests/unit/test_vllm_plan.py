"""The plan (plugins/module_utils/vllm_plan.py, the filter vllm_plan): what one run does to the
service, start / restart / live / nothing, and why. service.yml computes it once per host and
everything after it (the restart task, the live load, rolling_restart.yml) carries it out.

The releases are not written by hand: each is the vllm role's own __vllm_release_record,
__vllm_release_id and __vllm_engine_identity, rendered by Ansible's Templar from the shipped
inventories (inventory/local, inventory/beelink) with the overrides an operator would make
(tests/unit/role_render.py). The running release is the same rendering before the change, as
service.yml reads it back from release.json.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest

from tests.unit.loader import REPO, load
from tests.unit.role_render import render_var

plan_rules = load("plugins/module_utils/vllm_plan.py",
                  "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_plan")
filters = load("plugins/filter/vllm.py", "ansible_collections.inference.vllm_lora.plugins.filter.vllm")

LOCAL_ADAPTERS = [
    {"name": "alpha", "source": "controller", "path": "/srv/adapters/alpha"},
    {"name": "beta", "source": "controller", "path": "/srv/adapters/beta"},
]


def manifests(digests: dict[str, str]) -> dict[str, Any]:
    """vllm_manifests as artifacts.yml registers it (looped results with a digest each)."""
    return {"results": [{"item": {"kind": kind, "name": name}, "digest": digest}
                        for kind, name, digest in ((k.split("/")[0], k.split("/")[1], v) for k, v in digests.items())]}


DIGESTS = {"model/tiny-qwen2": "m" * 64, "adapter/alpha": "a" * 64, "adapter/beta": "b" * 64}


def release(inventory: str = "local", **overrides: Any) -> dict[str, Any]:
    """{id, record, identity} of the release the role declares for `inventory` + overrides."""
    overrides.setdefault("vllm_manifests", manifests(DIGESTS))
    if inventory == "local":
        overrides.setdefault("vllm_lora_adapters", LOCAL_ADAPTERS)
    return copy.deepcopy(_rendered(inventory, json.dumps(overrides, sort_keys=True)))


@functools.cache
def _rendered(inventory: str, overrides_json: str) -> dict[str, Any]:
    """Rendered once per declaration (Ansible's Templar is slow; the tests copy the result)."""
    overrides = json.loads(overrides_json)
    return {
        "id": str(render_var("__vllm_release_id", inventory, **overrides)),
        "record": render_var("__vllm_release_record", inventory, **overrides),
        "identity": render_var("__vllm_engine_identity", inventory, **overrides),
    }


def facts(declared: dict[str, Any], running: dict[str, Any] | None, state: str = "active",
          **more: Any) -> dict[str, Any]:
    """What service.yml passes to the plan, for a host running `running` (None: nothing yet)."""
    base = {
        "release_id": declared["id"], "release_record": declared["record"],
        "engine_identity": declared["identity"],
        "running_release_id": running["id"] if running else "",
        "running_release": copy.deepcopy(running["record"]) if running else {},
        "service_state": state, "runtime_updating": declared["record"]["runtime_lora_updating"],
        "env_changed": False, "units_changed": [], "stale": "", "venv_built": False,
        "force": False, "deferred": False, "kernel": "none",
    }
    base.update(more)
    return base


def test_first_install_starts() -> None:
    declared = release()
    plan = filters.vllm_plan(facts(declared, None, state="inactive"))
    assert plan["service"] == "start"
    assert plan["why"] == [f"no release runs yet: release {declared['id']} is installed and started"]
    assert plan["running_release"] == ""


def test_a_stopped_or_failed_service_is_started_not_restarted() -> None:
    declared = release()
    for state in ("inactive", "failed"):
        plan = filters.vllm_plan(facts(declared, declared, state=state))
        assert plan["service"] == "start", state
        assert f"the service is {state}" in plan["why"][0]


def test_no_change_does_nothing() -> None:
    declared = release()
    plan = filters.vllm_plan(facts(declared, release()))
    assert (plan["service"], plan["why"]) == ("nothing", [f"release {declared['id']} runs and nothing it reads changed"])


def test_a_crash_looping_service_counts_as_running() -> None:
    """systemd restarting it (activating/auto-restart): a change restarts it, no change leaves it."""
    declared = release()
    assert filters.vllm_plan(facts(declared, declared, state="activating"))["service"] == "nothing"
    changed = release(vllm_max_model_len=1024)
    assert filters.vllm_plan(facts(changed, declared, state="activating"))["service"] == "restart"


@pytest.mark.parametrize("inventory", ["local", "beelink"])
def test_adapter_only_change_with_runtime_updating_is_live(inventory: str) -> None:
    on = {"vllm_allow_runtime_lora_updating": True}
    running = release(inventory, **on)
    adapters = render_var("vllm_lora_adapters", inventory, **({"vllm_lora_adapters": LOCAL_ADAPTERS}
                                                               if inventory == "local" else {}))
    extra = {"name": "gamma", "source": "controller", "path": "/srv/adapters/gamma"}
    declared = release(inventory, vllm_lora_adapters=[*adapters, extra],
                       vllm_manifests=manifests({**DIGESTS, "adapter/gamma": "c" * 64}), **on)
    assert declared["id"] != running["id"]
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "live", plan
    assert plan["why"] == [f"release {running['id']} -> {declared['id']} only adds gamma: applied live, no restart"]
    assert plan["reload_adapters"] == []


def test_changed_adapter_files_are_reloaded_live() -> None:
    on = {"vllm_allow_runtime_lora_updating": True}
    running = release(**on)
    declared = release(vllm_manifests=manifests({**DIGESTS, "adapter/beta": "e" * 64}), **on)
    plan = filters.vllm_plan(facts(declared, running))
    assert (plan["service"], plan["reload_adapters"]) == ("live", ["beta"])
    assert "changes the files of beta" in plan["why"][0]


def test_adapter_only_change_without_runtime_updating_restarts() -> None:
    running = release()
    declared = release(vllm_lora_adapters=LOCAL_ADAPTERS[:1])
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart"
    assert plan["why"] == [f"release {running['id']} -> {declared['id']} only removes beta, and runtime LoRA "
                           "updating is off (vllm_allow_runtime_lora_updating)"]
    assert plan["reload_adapters"] == []


def test_turning_runtime_updating_on_restarts() -> None:
    """The running process has no load/unload endpoints: the adapters cannot be applied live."""
    running = release()
    declared = release(vllm_allow_runtime_lora_updating=True, vllm_lora_adapters=LOCAL_ADAPTERS[:1])
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart"
    assert "turns runtime LoRA updating on" in plan["why"][0]


@pytest.mark.parametrize(("override", "words"), [
    ({"vllm_max_model_len": 1024}, "the engine flags"),
    ({"vllm_environment": {"VLLM_CPU_KVCACHE_SPACE": "2"}}, "vllm_environment"),
    ({"vllm_python": "/usr/bin/python3.12"}, "the software (vLLM venv)"),
    ({"vllm_port": 8001}, "the API port"),
])
def test_a_changed_setting_restarts_even_with_runtime_updating(override: dict[str, Any], words: str) -> None:
    on = {"vllm_allow_runtime_lora_updating": True}
    running = release(**on)
    declared = release(**on, **override)
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart", plan
    assert plan["why"][0].startswith(f"release {running['id']} -> {declared['id']} changes ")
    assert words in plan["why"][0], plan["why"]


def test_a_new_unit_template_is_a_new_release_and_restarts() -> None:
    """A new version of this collection's unit templates: its digest is in the record and the
    identity, so it is never applied live under a running process."""
    on = {"vllm_allow_runtime_lora_updating": True}
    running = release(**on)
    running["record"]["units"] = {**running["record"]["units"], "vllm.service.j2": "0" * 64}
    plan = filters.vllm_plan(facts(release(**on), {"id": "0123456789ab", "record": running["record"]}))
    assert plan["service"] == "restart"
    assert "the unit templates" in plan["why"][0]


def test_a_release_made_by_an_older_version_restarts() -> None:
    """A record without the fields this version added (middleware, units) differs in them."""
    running = release(vllm_allow_runtime_lora_updating=True)
    for field in ("middleware", "units"):
        del running["record"][field]
    plan = filters.vllm_plan(facts(release(vllm_allow_runtime_lora_updating=True),
                                   {"id": "0123456789ab", "record": running["record"]}))
    assert plan["service"] == "restart"
    assert "the shipped middlewares, the unit templates" in plan["why"][0]


def test_secrets_stale_files_drift_and_force_each_restart_and_say_so() -> None:
    declared = release()
    cases = {
        "env_changed": (True, "the environment file changes (vllm_api_key, the hub token or vllm_environment)"),
        "stale": ("/etc/vllm/vllm.env", "/etc/vllm/vllm.env changed after the service started"),
        "units_changed": (["/etc/systemd/system/vllm.service"],
                          f"/etc/systemd/system/vllm.service differs from release {declared['id']}'s"),
        "venv_built": (True, f"this run rebuilt the venv the service runs ({declared['record']['venv']})"),
        "force": (True, "a restart was asked for (vllm_force_restart)"),
    }
    for key, (value, words) in cases.items():
        plan = filters.vllm_plan(facts(declared, declared, **{key: value}))
        assert plan["service"] == "restart", key
        assert plan["why"][0].startswith(words), (key, plan["why"])


def test_secrets_change_with_a_live_adapter_change_restarts() -> None:
    """The API key is read at start-up: an adapter-only change that also rotates it is not live."""
    on = {"vllm_allow_runtime_lora_updating": True}
    plan = filters.vllm_plan(facts(release(vllm_lora_adapters=LOCAL_ADAPTERS[:1], **on), release(**on),
                                   env_changed=True))
    assert (plan["service"], plan["reload_adapters"]) == ("restart", [])


def test_units_rewritten_by_a_new_release_are_not_drift() -> None:
    """A new release's unit differs from the live one by design (its --lora-modules): only the
    release change decides, so an adapter-only change stays live."""
    on = {"vllm_allow_runtime_lora_updating": True}
    plan = filters.vllm_plan(facts(release(vllm_lora_adapters=LOCAL_ADAPTERS[:1], **on), release(**on),
                                   units_changed=["/etc/systemd/system/vllm.service"]))
    assert plan["service"] == "live"


def test_deferred_restart_says_the_play_restarts_it() -> None:
    """rolling_restart.yml prepares with vllm_restart_deferred and reads vllm_plan.service."""
    declared = release()
    plan = filters.vllm_plan(facts(declared, declared, force=True, deferred=True))
    assert (plan["service"], plan["deferred"]) == ("restart", True)
    assert plan["why"][-1] == "deferred: the play restarts the host once it is drained"
    rolling = (REPO / "playbooks" / "rolling_restart.yml").read_text()
    assert "(vllm_plan | default({})).service | default('nothing') in ['restart', 'start']" in rolling
    # A host that did not run (new, stopped, failed) is started by the play too, drained then put back.
    started = filters.vllm_plan(facts(declared, declared, state="failed", deferred=True))
    assert started["service"] == "start"
    assert started["why"][-1] == "deferred: the play starts the host once it is drained"
    service = (REPO / "roles" / "vllm" / "tasks" / "service.yml").read_text()
    assert "state: \"{{ omit if vllm_restart_deferred and vllm_plan.service == 'start' else 'started' }}\"" in service


def test_a_tag_subset_plans_as_the_whole_run() -> None:
    """--tags service skips install.yml: vllm_venv_complete is undefined, which service.yml
    reads as "the venv was not built" (default(true)); the release id needs no skipped stage
    (the manifests are tagged always), so the plan is the whole run's."""
    declared = release()
    service = (REPO / "roles" / "vllm" / "tasks" / "service.yml").read_text()
    assert "'venv_built': not (vllm_venv_complete.stat.exists | default(true))" in service
    artifacts = (REPO / "roles" / "vllm" / "tasks" / "artifacts.yml").read_text()
    assert "register: vllm_manifests\n" in artifacts
    manifest_task = artifacts.split("register: vllm_manifests\n", 1)[1].split("\n- name:", 1)[0]
    assert "tags: [always]" in manifest_task
    whole = filters.vllm_plan(facts(declared, declared, venv_built=False))
    subset = filters.vllm_plan({k: v for k, v in facts(declared, declared).items() if k != "venv_built"})
    assert whole == subset
    assert whole["service"] == "nothing"


def test_the_plan_reports_the_gpu_gate_kernel() -> None:
    declared = release("beelink")
    assert declared["record"]["argv"][declared["record"]["argv"].index("--quantization") + 1] == "awq_marlin"
    plan = filters.vllm_plan(facts(declared, declared, kernel="awq_marlin"))
    assert plan["kernel"] == "awq_marlin"


def test_the_plan_reports_what_access_was_approved_never_the_key() -> None:
    """The access summary service.yml passes, rendered from its own expression with a key set:
    a yes/no for the key, never the key (the plan is printed and goes into the report)."""
    service = (REPO / "roles" / "vllm" / "tasks" / "service.yml").read_text()
    expression = service.split("'access': ", 1)[1].split("} | inference.vllm_lora.vllm_plan", 1)[0]
    key = "sk-plan-test-1234567890"
    access = render_var(expression, "local", vllm_api_key=key, vllm_listen_host="0.0.0.0")
    assert access == {"listen": "0.0.0.0:8000", "api_key": True, "unauthenticated_network": False,
                      "runtime_lora_updating": False, "trust_remote_code": False, "allowed_origins": []}
    plan = filters.vllm_plan(facts(release(), release(), access=access))
    assert plan["access"] == access and key not in repr(plan)


# --- found by review: content the release record did not carry -------------------------------------

HUB_COMMIT_1, HUB_COMMIT_2 = "1" * 40, "2" * 40
ON = {"vllm_allow_runtime_lora_updating": True}


@pytest.mark.parametrize(("before", "after"), [
    # A controller model with other files.
    ({"vllm_manifests": manifests(DIGESTS)},
     {"vllm_manifests": manifests({**DIGESTS, "model/tiny-qwen2": "n" * 64})}),
    # A hub model at a new commit (before: the same release id; the download replaced the
    # folder under the running process and nothing restarted it).
    ({"vllm_model": {"name": "tiny-qwen2", "source": "hf", "repo_id": "acme/tiny", "revision": HUB_COMMIT_1}},
     {"vllm_model": {"name": "tiny-qwen2", "source": "hf", "repo_id": "acme/tiny", "revision": HUB_COMMIT_2}}),
    # A model adopted in place whose files changed there (the Beelink's folder under /home).
    ({"vllm_model": {"name": "tiny-qwen2", "source": "host", "path": "/home/op/models/tiny"},
      "vllm_adopted": {"digests": {"model/tiny-qwen2": "h" * 64}}},
     {"vllm_model": {"name": "tiny-qwen2", "source": "host", "path": "/home/op/models/tiny"},
      "vllm_adopted": {"digests": {"model/tiny-qwen2": "k" * 64}}}),
])
def test_a_new_base_model_restarts_even_with_runtime_updating(before: dict[str, Any], after: dict[str, Any]) -> None:
    running, declared = release(**ON, **before), release(**ON, **after)
    assert declared["id"] != running["id"]
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart", plan
    assert "the base model's files" in plan["why"][0]


def test_a_hub_adapter_at_a_new_commit_is_reloaded_live_from_its_new_folder() -> None:
    hub = {"name": "gamma", "source": "hf", "repo_id": "acme/gamma"}
    running = release(vllm_lora_adapters=[*LOCAL_ADAPTERS, {**hub, "revision": HUB_COMMIT_1}], **ON)
    declared = release(vllm_lora_adapters=[*LOCAL_ADAPTERS, {**hub, "revision": HUB_COMMIT_2}], **ON)
    plan = filters.vllm_plan(facts(declared, running))
    assert (plan["service"], plan["reload_adapters"]) == ("live", ["gamma"]), plan


def test_an_adapter_served_from_another_folder_is_reloaded() -> None:
    """The same content id but another folder (a release made before adapters were stored by
    content): the running process keeps the folder it loaded, which prune may remove later."""
    running = release(**ON)
    moved = copy.deepcopy(running["record"])
    moved["argv"] = [word.replace("/adapters/beta@", "/adapters/beta-old@") for word in moved["argv"]]
    assert moved["argv"] != running["record"]["argv"]
    plan = filters.vllm_plan(facts(release(**ON), {"id": "0123456789ab", "record": moved}))
    assert (plan["service"], plan["reload_adapters"]) == ("live", ["beta"]), plan


def test_an_adopted_adapter_changed_in_place_is_reloaded() -> None:
    host_adapter = {"name": "gamma", "source": "host", "path": "/home/op/adapters/gamma"}
    adapters = [*LOCAL_ADAPTERS, host_adapter]
    running = release(vllm_lora_adapters=adapters, vllm_adopted={"digests": {"adapter/gamma": "1" * 64}}, **ON)
    declared = release(vllm_lora_adapters=adapters, vllm_adopted={"digests": {"adapter/gamma": "2" * 64}}, **ON)
    plan = filters.vllm_plan(facts(declared, running))
    assert (plan["service"], plan["reload_adapters"]) == ("live", ["gamma"]), plan


def test_adding_an_adopted_adapter_restarts_the_guard_must_know_its_folder() -> None:
    """A runtime load is refused outside the folders the running access guard was started with."""
    running = release(**ON)
    declared = release(vllm_lora_adapters=[*LOCAL_ADAPTERS,
                                           {"name": "gamma", "source": "host", "path": "/home/op/adapters/gamma"}], **ON)
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart" and "the unit's settings" in plan["why"][0], plan


@pytest.mark.parametrize("override", [{"vllm_allowed_origins": ["https://app.example"]},
                                      {"vllm_user": "inference"}, {"vllm_data_dir": "/data/vllm"}])
def test_unit_settings_with_an_adapter_change_restart(override: dict[str, Any]) -> None:
    """Before, a CORS, user or folder change that came with an adapter change was applied live:
    the unit was rewritten under a process that never read it, and no later run restarted it."""
    running = release(**ON)
    declared = release(vllm_lora_adapters=LOCAL_ADAPTERS[:1], **ON, **override)
    plan = filters.vllm_plan(facts(declared, running))
    assert plan["service"] == "restart", plan


def test_a_live_change_needs_a_serving_process() -> None:
    """systemd restarting a crashing process (activating): the live load would fail; restart."""
    running = release(**ON)
    declared = release(vllm_lora_adapters=LOCAL_ADAPTERS[:1], **ON)
    plan = filters.vllm_plan(facts(declared, running, state="activating"))
    assert plan["service"] == "restart" and "needs a serving process" in plan["why"][0], plan

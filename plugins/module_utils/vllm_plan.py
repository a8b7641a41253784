"""The plan: what one run of the vllm role does to the service, and why.

Computed once per host (roles/vllm/tasks/service.yml, "Plan what this run does
to the service") from facts read before anything the service reads changes,
and returned as the one fact ``vllm_plan``. The tasks after it, and the plays
(rolling_restart.yml), only carry it out:

- ``start``: the service does not run (a first install, or a stopped or failed
  unit): it is started on the declared release;
- ``restart``: it runs, and something it read at start-up changes (or a restart
  was asked for); with vllm_restart_deferred the play restarts it once drained;
- ``live``: only the adapter set changes, on a host whose running release and
  declaration both allow runtime LoRA updating: loaded and unloaded live;
- ``nothing``: the declared release runs, and nothing it reads changed.

``why`` says it in words, one reason each, for the report and the run's output.
Plain Python with no Ansible import: the decisions are unit-tested on release
records the role's own variables render from the shipped inventories
(tests/unit/test_vllm_plan.py, through Ansible's Templar).
"""

from __future__ import annotations

from typing import Any

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_argv import lora_modules

# systemd ActiveState values of a unit whose process runs (or is being started
# again by systemd itself, Restart=always): a change needs a restart.
RUNNING_STATES = ("active", "activating", "reloading", "deactivating")

# What must stay the same for a change to be only the adapter set (applied live,
# or allowed by playbooks/adapters.yml): the fields of the release record that
# vars/main.yml passes as __vllm_engine_identity.
IDENTITY_FIELDS = ("software_id", "engine_argv", "environment", "sandbox", "listener", "middleware", "units",
                   "model", "unit_settings")

_IDENTITY_WORDS = {
    "software_id": "the software (vLLM venv)",
    "engine_argv": "the engine flags",
    "environment": "vllm_environment",
    "sandbox": "the unit's sandbox (adopted folders or devices)",
    "listener": "the API port",
    "middleware": "the shipped middlewares",
    "units": "the unit templates",
    "model": "the base model's files",
    "unit_settings": "the unit's settings (service name, user, config folder, CORS origins, adapter folders)",
}


def identity_changes(running: dict[str, Any] | None, identity: dict[str, Any]) -> list[str]:
    """The fields of `identity` whose value in the running release's record differs;
    a field the record lacks differs (a release made by an older version)."""
    missing = object()
    return [key for key, value in identity.items() if (running or {}).get(key, missing) != value]


def changed_adapters(names: list[str], old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Adapters served before and now whose content id (digest, hub commit) differs."""
    return [n for n in names if f"adapter/{n}" in old and old.get(f"adapter/{n}") != new.get(f"adapter/{n}")]


def adapter_paths(argv: list[Any]) -> dict[str, str]:
    """{adapter name: the folder --lora-modules serves it from} of a release's argv."""
    return dict(lora_modules(argv or []))


def _adapter_change(running: dict[str, Any], record: dict[str, Any]) -> tuple[str, list[str]]:
    """A one-line account of an adapter-set change, and the adapters to reload: served before
    and now, with other content or from another folder (a process keeps what it loaded)."""
    before = list(running.get("adapters") or [])
    after = list(record.get("adapters") or [])
    old_paths, new_paths = adapter_paths(running.get("argv") or []), adapter_paths(record.get("argv") or [])
    changed = set(changed_adapters(after, running.get("artifacts") or {}, record.get("artifacts") or {}))
    changed |= {n for n in after if n in old_paths and n in new_paths and old_paths[n] != new_paths[n]}
    reload = [n for n in after if n in changed and n in before]
    parts = []
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    if added:
        parts.append("adds " + ", ".join(added))
    if removed:
        parts.append("removes " + ", ".join(removed))
    if reload:
        parts.append("changes the files of " + ", ".join(reload))
    return ("; ".join(parts) or "changes the adapter order"), reload


def plan(facts: dict[str, Any]) -> dict[str, Any]:
    """The plan for one host. `facts` (service.yml gathers them):

    release_id, release_record: the declared release; engine_identity: its fields
    that must stay the same for a live change; running_release_id,
    running_release: the release `current` points at ("" and {} when none);
    service_state: systemd's ActiveState; runtime_updating: the declared
    vllm_allow_runtime_lora_updating; env_changed: the environment file
    changes; units_changed: live unit files that differ from the release's;
    stale: a file changed after the service started ("" when none); venv_built:
    this run built the venv; force: vllm_force_restart; deferred:
    vllm_restart_deferred; kernel: the quantization kernel the GPU gate chose; access: what
    preflight_access.yml approved (listener, whether an API key is set, the opt-outs; never a secret).
    """
    release_id = str(facts["release_id"])
    record = facts.get("release_record") or {}
    running_id = str(facts.get("running_release_id") or "")
    running = facts.get("running_release") or {}
    state = str(facts.get("service_state") or "inactive")
    why: list[str] = []
    reload: list[str] = []

    if state not in RUNNING_STATES:
        action = "start"
        why.append(f"no release runs yet: release {release_id} is installed and started" if not running_id
                   else f"the service is {state}: it is started on release {release_id}")
        if facts.get("deferred"):
            why.append("deferred: the play starts the host once it is drained")
    else:
        restart: list[str] = []
        live = ""
        if facts.get("force"):
            restart.append("a restart was asked for (vllm_force_restart)")
        if facts.get("stale"):
            restart.append(f"{facts['stale']} changed after the service started (a run stopped before its restart)")
        if facts.get("env_changed"):
            restart.append("the environment file changes (vllm_api_key, the hub token or vllm_environment)")
        if facts.get("venv_built") and running.get("software_id") == record.get("software_id"):
            restart.append(f"this run rebuilt the venv the service runs ({record.get('venv', '?')})")
        if release_id != running_id:
            changes = identity_changes(running, facts.get("engine_identity") or {})
            runtime_before = bool(running.get("runtime_lora_updating"))
            runtime_now = bool(facts.get("runtime_updating"))
            if not running:
                restart.append(f"the running service has no release record: release {release_id} replaces it")
            elif runtime_before != runtime_now or changes:
                if runtime_before != runtime_now:
                    restart.append(f"release {running_id} -> {release_id} turns runtime LoRA updating "
                                   + ("on" if runtime_now else "off") + " (vllm_allow_runtime_lora_updating)")
                if changes:
                    restart.append(f"release {running_id} -> {release_id} changes "
                                   + ", ".join(_IDENTITY_WORDS.get(c, c) for c in changes))
            else:
                account, reload = _adapter_change(running, record)
                if runtime_now and state == "active":
                    live = f"release {running_id} -> {release_id} only {account}: applied live, no restart"
                elif runtime_now:
                    restart.append(f"release {running_id} -> {release_id} only {account}, but the service is "
                                   f"{state} (restarting by itself): a live change needs a serving process")
                else:
                    restart.append(f"release {running_id} -> {release_id} only {account}, and runtime LoRA "
                                   "updating is off (vllm_allow_runtime_lora_updating)")
        else:
            restart.extend(f"{path} differs from release {release_id}'s (changed on the host)"
                           for path in facts.get("units_changed") or [])
        if restart:
            action, why, reload = "restart", restart, []
            if facts.get("deferred"):
                why.append("deferred: the play restarts the host once it is drained")
        elif live:
            action, why = "live", [live]
        else:
            action = "nothing"
            why.append(f"release {release_id} runs and nothing it reads changed")
    return {
        "service": action,
        "why": why,
        "release": release_id,
        "running_release": running_id,
        "service_state": state,
        "reload_adapters": reload,
        "deferred": bool(facts.get("deferred")),
        "kernel": facts.get("kernel") or "",
        "access": dict(facts.get("access") or {}),
    }

"""Filters that turn the one declaration of model, adapters and engine settings
into what the service runs: the `vllm serve` argv and its systemd ExecStart line.

Kept here, in plain typed Python, so the flags are unit-tested without a host.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

# The rules on names and LoRA engine settings live in module_utils (the adapter
# check module applies them too); this filter only names the variables.
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_rules import (
    NAME_PATTERN,
    name_findings,
    setting_findings,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_argv import split_lora_modules
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_metrics import in_flight
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_plan import identity_changes, plan

LORA_DTYPES = ("auto", "float16", "bfloat16")


def vllm_lora_modules(adapters: list[dict[str, Any]], base_model_name: str) -> list[str]:
    """One JSON value per adapter for `--lora-modules` (all after ONE flag:
    a second `--lora-modules` would replace the first list)."""
    return [
        json.dumps(
            {"name": adapter["name"], "path": adapter["path"], "base_model_name": base_model_name},
            separators=(",", ":"),
        )
        for adapter in adapters
    ]


def stored_by_content(path: str, content_id: str) -> str:
    """The folder the role stores a placed adapter in: one per name AND content (a controller
    directory's digest, a hub commit id), so a later release never rewrites an earlier one's files
    and a rollback serves, byte for byte, what that release served."""
    return f"{path.rstrip('/')}@{content_id[:16]}"


def vllm_adapter_targets(adapters: list[dict[str, Any]], adapter_dir: str,
                         digests: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Where each adapter lives on the host: adopted in place (source host); else under
    adapter_dir, stored by content: a hub adapter by its pinned commit, a controller adapter by
    its directory digest (`digests`, vllm_digests of this run's manifests; without it, as
    before the manifests are read, the folder named after the adapter alone)."""
    targets = []
    for adapter in adapters:
        name, source = str(adapter["name"]), adapter.get("source", "controller")
        base = f"{adapter_dir.rstrip('/')}/{name}"
        if source == "host":
            path = str(adapter["path"])
        elif source == "hf":
            path = stored_by_content(base, str(adapter.get("revision", "")))
        else:
            digest = (digests or {}).get(f"adapter/{name}")
            path = stored_by_content(base, digest) if digest else base
        targets.append({"name": name, "path": path})
    return targets


def vllm_artifacts(
    model: dict[str, Any], model_path: str, adapters: list[dict[str, Any]], adapter_dir: str
) -> list[dict[str, Any]]:
    """Model and adapters as one list of things to place on the host.

    dest is where vLLM reads it; src the controller path (source controller);
    for source host, dest is the given path itself (adopted in place).
    """
    targets = {entry["name"]: entry["path"] for entry in vllm_adapter_targets(adapters, adapter_dir)}
    items = [("model", model, model_path)] + [("adapter", a, targets[str(a["name"])]) for a in adapters]
    result: list[dict[str, Any]] = []
    for kind, item, dest in items:
        source = item.get("source", "controller")
        entry: dict[str, Any] = {"kind": kind, "name": str(item["name"]), "source": source, "dest": dest}
        if kind == "adapter" and item.get("allow_pickle"):
            entry["allow_pickle"] = True  # only when set: records and plans stay as they were
        if source == "controller":
            entry["src"] = str(item["path"]).rstrip("/")
        elif source == "host":
            entry["path"] = dest
            entry["checksums"] = dict(item.get("checksums") or {})
        else:
            entry["repo_id"] = str(item.get("repo_id", ""))
            entry["revision"] = str(item.get("revision", ""))
        result.append(entry)
    return result


def vllm_with_manifests(manifest_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join each looped artifact with the file manifest vllm_manifest returned; an adapter's
    folder is the one for its content (stored_by_content)."""
    joined = []
    for result in manifest_results:
        artifact = {**result["item"], "files": result["files"]}
        if artifact["kind"] == "adapter":
            artifact["dest"] = stored_by_content(artifact["dest"], str(result["digest"]))
        joined.append(artifact)
    return joined


def vllm_digests(manifest_results: list[dict[str, Any]]) -> dict[str, str]:
    """{"kind/name": directory digest} from vllm_manifest's looped results, for reports."""
    return {f"{r['item']['kind']}/{r['item']['name']}": str(r["digest"]) for r in manifest_results if "digest" in r}


def vllm_content_ids(manifest_results: list[dict[str, Any]], adopted: dict[str, str] | None,
                     hub_artifacts: list[dict[str, Any]]) -> dict[str, str]:
    """{"kind/name": content id} of everything a release serves: a controller directory's
    manifest digest, an adopted folder's digest (hashed in place), a hub artifact's pinned
    commit ("hf:<commit>"). In the release record: a change of any is a new release."""
    ids = vllm_digests(manifest_results)
    ids.update(adopted or {})
    ids.update({f"{a['kind']}/{a['name']}": f"hf:{a['revision']}" for a in hub_artifacts})
    return ids


def vllm_pick_path(artifact: dict[str, Any], key: str) -> dict[str, Any]:
    """{name, path, allow_pickle} of an artifact for vllm_adapter_check, with path taken
    from `key` (src on the controller, dest on the host)."""
    return {"name": str(artifact["name"]), "path": str(artifact[key]),
            "allow_pickle": bool(artifact.get("allow_pickle", False))}


def vllm_serve_args(settings: dict[str, Any]) -> list[str]:
    """The argv after `vllm serve`, from the role's settings dict.

    Keys: model_path, served_names, host, port, max_model_len, dtype,
    gpu_memory_utilization, tensor_parallel_size, quantization, device,
    adapters [{name, path}], max_loras, max_lora_rank, lora_dtype,
    max_cpu_loras, middleware [import paths], extra_args.
    """
    served_names: list[str] = list(settings["served_names"])
    args: list[str] = [str(settings["model_path"])]
    args += ["--served-model-name", *served_names]
    args += ["--host", str(settings["host"]), "--port", str(settings["port"])]
    if "allowed_origins" in settings:
        # vLLM's CORS default is every origin ("*"); the list is JSON on its command line.
        args += ["--allowed-origins", json.dumps(list(settings["allowed_origins"] or []), separators=(",", ":"))]
    args += ["--max-model-len", str(settings["max_model_len"])]
    args += ["--dtype", str(settings["dtype"])]
    if settings.get("device", "cuda") == "cuda":
        args += ["--gpu-memory-utilization", str(settings["gpu_memory_utilization"])]
        args += ["--tensor-parallel-size", str(settings["tensor_parallel_size"])]
    quantization = str(settings.get("quantization") or "none")
    if quantization not in ("auto", "none"):
        args += ["--quantization", quantization]
    adapters: list[dict[str, Any]] = list(settings.get("adapters") or [])
    if adapters or settings.get("enable_lora"):
        args += ["--enable-lora"]
        args += ["--max-loras", str(settings["max_loras"])]
        args += ["--max-lora-rank", str(settings["max_lora_rank"])]
        args += ["--lora-dtype", str(settings["lora_dtype"])]
        if int(settings.get("max_cpu_loras") or 0) > 0:
            args += ["--max-cpu-loras", str(settings["max_cpu_loras"])]
        if adapters:
            args += ["--lora-modules", *vllm_lora_modules(adapters, served_names[0])]
    for middleware in settings.get("middleware") or []:
        args += ["--middleware", str(middleware)]
    args += [str(arg) for arg in settings.get("extra_args") or []]
    return args


def _listen_ip(host: str) -> str:
    """The address a listen host names, or "" when it is not an IP address."""
    bare = str(host)
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    if bare == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return ""


def vllm_listen_stream(host: str, port: int | str) -> str:
    """ListenStream= of the API port's socket unit: systemd takes addresses, not names."""
    address = _listen_ip(host)
    if not address:
        raise ValueError(f"vllm_listen_host={host!r} is not an IP address")
    return f"[{address}]:{int(port)}" if ":" in address else f"{address}:{int(port)}"


def vllm_check_url(host: str, port: int | str) -> str:
    """http://ADDRESS:PORT at which this host reaches its own API port: the listen address, or
    loopback when it listens on every address. The one place that decides it: the vllm role's
    checks and the balancer role's in-flight count (no balancer) both read it."""
    bare = str(host)
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    address = _listen_ip(bare) or bare
    if address in ("", "0.0.0.0", "::"):
        address = "127.0.0.1"
    return f"http://[{address}]:{int(port)}" if ":" in address else f"http://{address}:{int(port)}"


def vllm_identity_changes(running: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The fields of `identity` (what must stay the same for an adapter-only change) whose value in
    the running release's record differs (module_utils/vllm_plan.py)."""
    return identity_changes(running, identity)


def vllm_plan(facts: dict[str, Any]) -> dict[str, Any]:
    """What this run does to the service (start / restart / live / nothing) and why
    (module_utils/vllm_plan.py)."""
    return plan(facts)


def vllm_in_flight(metrics: str | None) -> float:
    """Running + waiting requests in vLLM's /metrics text (module_utils/vllm_metrics.py)."""
    return in_flight(metrics)


def _seconds(value: Any) -> float | None:
    """A number of seconds, or None for what is not one (a skipped task's missing field, '', None)."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def vllm_out_of_service(now: float, balancer: bool, restart_seconds: Any = "", drained: Any = None,
                        put_back: Any = None, out_at: Any = None) -> float:
    """Seconds a host was out of service during its restart (vllm_balancer's ready.yml), to 0.1 s.

    Behind a balancer: from HAProxy's switch out (the drain call's switched_monotonic) to its switch
    back (the ready call's), one clock on the balancer, so neither call's round trip counts (the host
    served then). Without one: restart_seconds, the vllm role's restart-to-answer time on the host.
    Either missing (check mode, a drain this play did not do, the balancer's clock restarted): the
    controller's span from drain.yml's mark (out_at, epoch seconds) to now."""
    if balancer:
        out = _seconds((drained or {}).get("switched_monotonic"))
        back = _seconds((put_back or {}).get("switched_monotonic"))
        if out is not None and back is not None and back >= out:
            return round(back - out, 1)
    else:
        direct = _seconds(restart_seconds)
        if direct is not None:
            return round(direct, 1)
    since = _seconds(out_at)
    return round(float(now) - (float(now) if since is None else since), 1)


def vllm_without_lora_modules(argv: list[str]) -> list[str]:
    """The argv without the values of --lora-modules: what must match for an
    adapter change to be applied live instead of with a restart (module_utils/vllm_argv.py)."""
    return split_lora_modules(argv)[0]


def vllm_systemd_quote(word: str) -> str:
    """Quote one argv word for a systemd ExecStart= line.

    systemd expands `%` specifiers and `$VAR` even inside quotes, so both are
    doubled; words with spaces, quotes or backslashes are double-quoted with
    C-style escapes, which systemd undoes (systemd.syntax(7)).
    """
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", escaped):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def vllm_systemd_env(assignment: str) -> str:
    """Quote one KEY=value for Environment=: `%` is a specifier there, `$` is not."""
    escaped = str(assignment).replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def vllm_systemd_exec(argv: list[str]) -> str:
    """A whole argv as one ExecStart= value."""
    return " ".join(vllm_systemd_quote(str(word)) for word in argv)


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    """{flag: [values]} of a `vllm serve` argv; the model path is the flag 'model'."""
    flags: dict[str, list[str]] = {}
    current = "model"
    for word in [str(word) for word in argv]:
        if word.startswith("--"):
            current = word.split("=", 1)[0]
            flags.setdefault(current, [])
            if "=" in word:
                flags[current].append(word.split("=", 1)[1])
        else:
            flags.setdefault(current, []).append(word)
    return flags


def vllm_argv_changes(old: list[str], new: list[str]) -> list[str]:
    """What differs between two argvs, one 'flag old -> new' each, for messages."""
    before, after = _flag_values(old), _flag_values(new)
    return [
        f"{flag} {' '.join(before.get(flag, [])) or '(unset)'} -> {' '.join(after.get(flag, [])) or '(unset)'}"
        if flag in before and flag in after else f"{flag} {'added' if flag in after else 'removed'}"
        for flag in sorted(set(before) | set(after)) if before.get(flag) != after.get(flag)
    ]


# What ProtectHome= hides (systemd.exec(5)); PrivateTmp= replaces /tmp and /var/tmp.
HOME_ROOTS = ("/home", "/root", "/run/user")
# The unit's hardening, seen working with the vLLM CPU build (README: each setting left open).
SANDBOX_COMMON = (
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    # vLLM's engine listens on more than the API port (torch.distributed's TCPStore
    # on every interface, gloo and ZMQ): in a network namespace of its own they
    # reach nobody. The API port comes in through the proxy socket unit.
    "PrivateNetwork=yes",
    "ProtectProc=invisible",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallErrorNumber=EPERM",
    # Here, not in the unit's template: before systemd 250 (and 249.x without the
    # stable fix, systemd#21548) the service's umask also made the directories
    # systemd creates for bind mounts 0700, which the probe must see too.
    "UMask=0077",
)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def vllm_unit_sandbox(read_only_paths: list[str], device: str = "cpu", gpu_device_allow: list[str] | None = None) -> list[str]:
    """The unit's sandbox as `Key=Value` lines: rendered into the unit AND passed
    as `systemd-run -p` properties to the probe that checks, before the unit
    changes, that the service can read every adopted file.

    Directories adopted in place (source: host) are bound read-only into the
    sandbox, wherever they are. Only when one lies under /home, /root or
    /run/user does ProtectHome= become `tmpfs` (empty home directories, the
    bound ones inside) instead of `yes`, which would hide it whatever is bound.
    """
    paths = sorted({str(path).rstrip("/") or "/" for path in read_only_paths})
    lines = list(SANDBOX_COMMON)
    lines.insert(lines.index("PrivateTmp=yes"),
                 "ProtectHome=tmpfs" if any(_under(path, HOME_ROOTS) for path in paths) else "ProtectHome=yes")
    between = _dirs_between_home_and(paths)
    if between:
        # Inside the empty /home, systemd creates the folders leading to a bound
        # one; with UMask=0077 (systemd < 250) they would be 0700 root and hide it.
        lines.append("TemporaryFileSystem=" + " ".join(vllm_systemd_path(path) + ":mode=0755" for path in between))
    if paths:
        lines.append("BindReadOnlyPaths=" + " ".join(vllm_systemd_path(path) for path in paths))
    if device == "cuda":
        # The GPU: only NVIDIA's device nodes.
        lines.append("DevicePolicy=closed")
        lines += [f"DeviceAllow={node} rw" for node in gpu_device_allow or []]
    else:
        lines += ["PrivateDevices=yes", "DevicePolicy=closed"]
    return lines


def _dirs_between_home_and(paths: list[str]) -> list[str]:
    """Folders strictly between /home (/root, /run/user) and each adopted folder under it,
    except those inside an adopted folder (they exist there already)."""
    found: set[str] = set()
    for path in paths:
        root = next((root for root in HOME_ROOTS if path != root and _under(path, (root,))), None)
        if root is None:
            continue
        parent = path.rsplit("/", 1)[0]
        while parent != root and len(parent) > len(root):
            found.add(parent)
            parent = parent.rsplit("/", 1)[0]
    return sorted(p for p in found if not _under(p, tuple(paths)))


def vllm_systemd_path(path: str) -> str:
    """One path for a space-separated path list (BindReadOnlyPaths=): C-style
    quoted when needed, ':' escaped (it separates source and destination)."""
    escaped = path.replace("%", "%%").replace("\\", "\\\\").replace(":", "\\:")
    if re.fullmatch(r"[A-Za-z0-9_@%+=,./\\:-]+", escaped):
        return escaped
    return '"' + escaped.replace('"', '\\"') + '"'


# Bound into the sandbox as a whole, these would expose far more than a model,
# or (temporary directories) hold files any local user may plant or remove.
UNADOPTABLE = ("/", "/home", "/root", "/run", "/run/user", "/tmp", "/var/tmp", "/dev", "/dev/shm", "/proc", "/sys",
               "/etc", "/usr", "/var", "/boot")


def _adopted_path_errors(where: str, path: str) -> list[str]:
    """A folder adopted in place (source: host) is bound read-only into the unit's sandbox."""
    if not path.startswith("/"):
        return []
    normal = path.rstrip("/") or "/"
    if "/./" in normal + "/" or "/../" in normal + "/" or "//" in normal:
        return [f"{where}={path!r}: write the folder's plain absolute path (no '.', '..' or '//'): it is bound"
                " into the service's sandbox as written."]
    if "%" in normal or ":" in normal or any(char.isspace() and char != " " for char in normal):
        return [f"{where}={path!r}: '%', ':' and control characters cannot be passed to systemd's path"
                " settings verbatim; rename or move the folder."]
    if normal in UNADOPTABLE or _under(normal, ("/tmp", "/var/tmp", "/dev/shm", "/proc", "/sys")):
        return [f"{where}={path!r}: adopting this folder in place would expose all of it to the service, or it is a"
                " temporary or virtual folder. Fix: point at the model's own folder (e.g. /home/<user>/models/<name>,"
                " /srv/..., /mnt/...), or use source: controller."]
    return []


def vllm_declaration_errors(declaration: dict[str, Any]) -> list[str]:
    """Problems in the declaration that argument_specs cannot express.

    Each message names the variable, the value and the fix. Empty list: fine.
    """
    errors: list[str] = []
    model = declaration.get("model") or {}
    served = list(declaration.get("served_names") or [])
    adapters = list(declaration.get("adapters") or [])
    source = model.get("source")
    if source in ("controller", "host") and not str(model.get("path") or "").startswith("/"):
        errors.append(
            f"vllm_model.path={model.get('path')!r}: source '{source}' needs an absolute path to the model directory."
        )
    if source == "host":
        errors += _adopted_path_errors("vllm_model.path", str(model.get("path") or ""))
    if source == "hf":
        if not model.get("repo_id"):
            errors.append("vllm_model.repo_id is empty: source 'hf' needs the repository id, e.g. Qwen/Qwen2.5-7B-Instruct-AWQ.")
        if not re.fullmatch(r"[0-9a-f]{40}", str(model.get("revision") or "")):
            errors.append(
                f"vllm_model.revision={model.get('revision')!r}: source 'hf' needs a pinned 40-hex commit id, "
                "not a branch or tag, so every host serves the same weights."
            )
    if not NAME_PATTERN.fullmatch(str(model.get("name") or "")):
        errors.append(
            f"vllm_model.name={model.get('name')!r}: use letters, digits, '.', '_' or '-' (it becomes a directory name)."
        )
    errors += [f"vllm_lora_adapters[{index}].name={name!r}: {why}. Fix: {fix}."
               for index, name, why, fix in name_findings([a.get("name") for a in adapters], served)]
    for index, adapter in enumerate(adapters):
        where = f"vllm_lora_adapters[{index}]"
        adapter_source = adapter.get("source", "controller")
        if adapter_source in ("controller", "host") and not str(adapter.get("path") or "").startswith("/"):
            errors.append(f"{where}.path={adapter.get('path')!r}: needs an absolute path to the adapter directory.")
        if adapter_source == "host":
            errors += _adopted_path_errors(f"{where}.path", str(adapter.get("path") or ""))
        if adapter_source == "hf" and not re.fullmatch(r"[0-9a-f]{40}", str(adapter.get("revision") or "")):
            errors.append(f"{where}.revision={adapter.get('revision')!r}: source 'hf' needs a pinned 40-hex commit id.")
    errors += [f"{variable}={value!r}: {why}. Fix: {fix}." for variable, value, why, fix in setting_findings(
        int(declaration.get("max_lora_rank") or 0), int(declaration.get("max_loras", 1)),
        int(declaration.get("max_cpu_loras") or 0))]
    listen_host = declaration.get("listen_host")
    if listen_host is not None and not _listen_ip(str(listen_host)):
        errors.append(
            f"vllm_listen_host={listen_host!r} is not an IP address: the API port is a systemd socket, which binds"
            " addresses, not names. Fix: 127.0.0.1 (this host only), the host's LAN address, or 0.0.0.0 / '::' (all)."
        )
    keep = int(declaration.get("keep_releases", 3))
    if keep < 2:
        errors.append(
            f"vllm_keep_releases={keep}: keep at least 2, so a failed release has one to return to "
            "(the current one always stays)."
        )
    for name in served:
        if not re.fullmatch(r"[A-Za-z0-9/][A-Za-z0-9._/-]{0,255}", str(name)):
            errors.append(f"vllm_served_model_names: {name!r} is not a safe model name (letters, digits, '.', '_', '-', '/').")
    if len(set(served)) != len(served):
        errors.append(f"vllm_served_model_names={served} lists a name twice.")
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_serve_args": vllm_serve_args,
            "vllm_lora_modules": vllm_lora_modules,
            "vllm_adapter_targets": vllm_adapter_targets,
            "vllm_artifacts": vllm_artifacts,
            "vllm_with_manifests": vllm_with_manifests,
            "vllm_digests": vllm_digests,
            "vllm_content_ids": vllm_content_ids,
            "vllm_pick_path": vllm_pick_path,
            "vllm_systemd_exec": vllm_systemd_exec,
            "vllm_systemd_env": vllm_systemd_env,
            "vllm_without_lora_modules": vllm_without_lora_modules,
            "vllm_declaration_errors": vllm_declaration_errors,
            "vllm_unit_sandbox": vllm_unit_sandbox,
            "vllm_argv_changes": vllm_argv_changes,
            "vllm_listen_stream": vllm_listen_stream,
            "vllm_check_url": vllm_check_url,
            "vllm_in_flight": vllm_in_flight,
            "vllm_out_of_service": vllm_out_of_service,
            "vllm_identity_changes": vllm_identity_changes,
            "vllm_plan": vllm_plan,
        }

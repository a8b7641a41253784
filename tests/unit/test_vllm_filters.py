"""The unit's flags and the declaration checks, from the role's filter plugin."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from tests.unit.loader import REPO, load

filters = load("plugins/filter/vllm.py", "vllm_filters")

BEELINK = {
    "model_path": "/home/beelink/models/Qwen2.5-7B-Instruct-AWQ",
    "served_names": ["/home/beelink/models/Qwen2.5-7B-Instruct-AWQ", "qwen2.5-7b-awq"],
    "host": "0.0.0.0", "port": 8000, "max_model_len": 4096, "dtype": "auto", "device": "cuda",
    "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1, "quantization": "awq_marlin",
    "adapters": [{"name": "sql", "path": "/srv/vllm/adapters/sql"}, {"name": "chat", "path": "/srv/vllm/adapters/chat"}],
    "max_loras": 4, "max_lora_rank": 16, "lora_dtype": "auto", "max_cpu_loras": 0,
    "middleware": ["vllm_lora_name_compat.LoraNameMiddleware"], "extra_args": [],
}


def test_beelink_flags() -> None:
    args = filters.vllm_serve_args(BEELINK)
    assert args[0] == BEELINK["model_path"]
    joined = " ".join(args)
    for flag in ["--enable-lora", "--max-loras 4", "--max-lora-rank 16", "--lora-dtype auto",
                 "--gpu-memory-utilization 0.9", "--tensor-parallel-size 1", "--quantization awq_marlin",
                 "--max-model-len 4096", "--port 8000"]:
        assert flag in joined
    assert "--trust-remote-code" not in args and "--max-cpu-loras" not in args
    # Both served names after ONE flag; every adapter after ONE --lora-modules.
    assert args[args.index("--served-model-name") + 1: args.index("--served-model-name") + 3] == BEELINK["served_names"]
    assert args.count("--lora-modules") == 1
    modules = [json.loads(a) for a in args[args.index("--lora-modules") + 1: args.index("--middleware")]]
    assert modules == [
        {"name": "sql", "path": "/srv/vllm/adapters/sql", "base_model_name": BEELINK["served_names"][0]},
        {"name": "chat", "path": "/srv/vllm/adapters/chat", "base_model_name": BEELINK["served_names"][0]},
    ]


def test_no_adapters_no_lora_flags_and_cpu_drops_gpu_flags() -> None:
    args = filters.vllm_serve_args({**BEELINK, "adapters": [], "device": "cpu", "quantization": "none",
                                    "max_cpu_loras": 8})
    for flag in ["--enable-lora", "--lora-modules", "--max-loras", "--gpu-memory-utilization",
                 "--quantization", "--max-cpu-loras"]:
        assert flag not in args


def test_max_cpu_loras_only_when_set() -> None:
    args = filters.vllm_serve_args({**BEELINK, "max_cpu_loras": 8})
    assert args[args.index("--max-cpu-loras") + 1] == "8"


@pytest.mark.parametrize("word", ['{"name":"a","path":"/x y"}', "100%", "$HOME", 'back\\slash', "plain-word"])
def test_systemd_quoting_round_trips(word: str) -> None:
    quoted = filters.vllm_systemd_quote(word)
    # systemd undoes %% and $$ and then C-style escapes inside double quotes, as a POSIX shell does for \" and \\.
    unescaped = shlex.split(quoted.replace("%%", "%").replace("$$", "$"))
    assert unescaped == [word]


def test_systemd_exec_doubles_specifiers() -> None:
    assert filters.vllm_systemd_exec(["a%b", "$X"]) == "a%%b \"$$X\""


def declaration(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model": {"name": "qwen", "source": "controller", "path": "/data/qwen"},
        "served_names": ["qwen"], "adapters": [{"name": "sql", "source": "controller", "path": "/data/sql"}],
        "max_lora_rank": 16, "max_loras": 4, "max_cpu_loras": 0,
    }
    base.update(over)
    return base


def test_a_good_declaration_has_no_errors() -> None:
    assert filters.vllm_declaration_errors(declaration()) == []


@pytest.mark.parametrize("over, needle", [
    ({"max_lora_rank": 24}, "vllm_max_lora_rank=24: vLLM 0.11.0 accepts only one of 8, 16, 32"),
    ({"max_cpu_loras": 2}, "vllm_max_cpu_loras=2: must be >= max_loras 4"),
    ({"adapters": [{"name": "qwen", "path": "/a"}]}, "vllm_lora_adapters[0].name='qwen': equals a served model name"),
    ({"adapters": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
     "vllm_lora_adapters[1].name='a': declared more than once"),
    ({"adapters": [{"name": "../etc", "path": "/a"}]}, "vllm_lora_adapters[0].name='../etc'"),
    ({"adapters": [{"name": "", "path": "/a"}]}, "vllm_lora_adapters[0].name=''"),
    ({"adapters": [{"name": "a", "path": "relative/dir"}]}, "vllm_lora_adapters[0].path='relative/dir'"),
    ({"model": {"name": "q", "source": "hf", "repo_id": "Qwen/Q", "revision": "main"}}, "vllm_model.revision='main'"),
    ({"model": {"name": "q", "source": "host", "path": "models/q"}}, "vllm_model.path='models/q'"),
])
def test_declaration_errors_name_variable_and_value(over: dict[str, object], needle: str) -> None:
    errors = filters.vllm_declaration_errors(declaration(**over))
    assert any(needle in error for error in errors), errors


@pytest.mark.parametrize("over, needle", [
    ({"adapters": [{"name": "alpha\n", "source": "controller", "path": "/data/alpha"}]},
     "vllm_lora_adapters[0].name='alpha\\n'"),
    ({"model": {"name": "tiny\n", "source": "controller", "path": "/data/tiny"}}, "vllm_model.name='tiny\\n'"),
    ({"served_names": ["tiny\n"]}, "vllm_served_model_names: 'tiny\\n'"),
])
def test_names_with_a_trailing_newline_are_refused(over: dict[str, object], needle: str) -> None:
    """`$` also matches before a final newline: such a name would split the unit's ExecStart."""
    errors = filters.vllm_declaration_errors(declaration(**over))
    assert any(needle in error for error in errors), errors


def test_artifacts_and_adapter_targets() -> None:
    items = filters.vllm_artifacts(
        {"name": "m", "source": "host", "path": "/models/m"}, "/models/m",
        [{"name": "a", "source": "controller", "path": "/ctl/a/"}, {"name": "b", "source": "host", "path": "/opt/b"}],
        "/srv/vllm/adapters",
    )
    assert items == [
        {"kind": "model", "name": "m", "source": "host", "dest": "/models/m", "path": "/models/m", "checksums": {}},
        {"kind": "adapter", "name": "a", "source": "controller", "dest": "/srv/vllm/adapters/a", "src": "/ctl/a"},
        {"kind": "adapter", "name": "b", "source": "host", "dest": "/opt/b", "path": "/opt/b", "checksums": {}},
    ]


def test_placed_adapters_are_stored_by_content_and_the_argv_names_those_folders() -> None:
    """One folder per adapter name AND content: a controller adapter by its manifest digest (the
    same folder for the copy and for --lora-modules), a hub adapter by its pinned commit; an
    adopted one stays where it is. Before, alpha's one folder was rewritten in place, so a
    rollback to an earlier release served the new files."""
    digest_a, digest_a2 = "a" * 64, "c" * 64
    commit = "0123456789abcdef0123456789abcdef01234567"
    adapters = [{"name": "a", "source": "controller", "path": "/ctl/a"},
                {"name": "h", "source": "hf", "repo_id": "org/h", "revision": commit},
                {"name": "b", "source": "host", "path": "/opt/b"}]
    targets = filters.vllm_adapter_targets(adapters, "/srv/vllm/adapters/", {"adapter/a": digest_a})
    assert targets == [{"name": "a", "path": "/srv/vllm/adapters/a@aaaaaaaaaaaaaaaa"},
                       {"name": "h", "path": "/srv/vllm/adapters/h@0123456789abcdef"},
                       {"name": "b", "path": "/opt/b"}]
    # New content, new folder; the earlier one is not touched (prune removes it with its last release).
    moved = filters.vllm_adapter_targets(adapters, "/srv/vllm/adapters", {"adapter/a": digest_a2})
    assert moved[0]["path"] == "/srv/vllm/adapters/a@cccccccccccccccc" and moved[1:] == targets[1:]
    # The copy goes where the argv points.
    (artifact,) = [a for a in filters.vllm_artifacts({"name": "m", "source": "host", "path": "/m"}, "/m",
                                                     adapters[:1], "/srv/vllm/adapters") if a["kind"] == "adapter"]
    joined = filters.vllm_with_manifests([{"item": artifact, "files": {}, "digest": digest_a},
                                          {"item": {"kind": "model", "name": "m", "dest": "/srv/vllm/models/m"},
                                           "files": {}, "digest": "d" * 64}])
    assert joined[0]["dest"] == targets[0]["path"]
    assert joined[1]["dest"] == "/srv/vllm/models/m"  # models are not (yet) stored by content
    assert filters.vllm_digests([{"item": artifact, "digest": digest_a}]) == {"adapter/a": digest_a}


# --- the unit's sandbox (rendered into the unit and given to the read probe) ---------------------

def test_sandbox_without_adopted_folders_hides_home_entirely() -> None:
    lines = filters.vllm_unit_sandbox([], "cpu", [])
    assert "ProtectHome=yes" in lines and "PrivateTmp=yes" in lines and "ProtectSystem=strict" in lines
    assert not [line for line in lines if line.startswith("BindReadOnlyPaths=")]
    assert lines[-2:] == ["PrivateDevices=yes", "DevicePolicy=closed"]


@pytest.mark.parametrize("path, protect_home", [
    ("/home/beelink/models/Qwen2.5-7B-Instruct-AWQ", "tmpfs"),
    ("/root/models/q", "tmpfs"),
    ("/run/user/1000/q", "tmpfs"),
    ("/mnt/models/q", "yes"),
    ("/data/q", "yes"),
    ("/homework/q", "yes"),
])
def test_sandbox_binds_adopted_folders_read_only(path: str, protect_home: str) -> None:
    lines = filters.vllm_unit_sandbox([path + "/", "/srv/other"], "cpu", [])
    assert f"ProtectHome={protect_home}" in lines
    assert f"BindReadOnlyPaths={' '.join(sorted([path, '/srv/other']))}" in lines
    # Every other directive stays as it is without adopted folders.
    assert [line for line in lines if not line.startswith(("ProtectHome=", "BindReadOnlyPaths=", "TemporaryFileSystem="))] == \
        [line for line in filters.vllm_unit_sandbox([], "cpu", []) if not line.startswith("ProtectHome=")]


def test_sandbox_gpu_devices_only() -> None:
    lines = filters.vllm_unit_sandbox([], "cuda", ["/dev/nvidiactl", "char-nvidia-frontend"])
    assert "PrivateDevices=yes" not in lines
    assert lines[-3:] == ["DevicePolicy=closed", "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=char-nvidia-frontend rw"]


def test_default_gpu_devices_leave_out_the_uvm_profiling_node() -> None:
    """/dev/nvidia-uvm-tools is CUDA's profiling interface (CUPTI), not needed to serve."""
    defaults = yaml.safe_load((REPO / "roles/vllm/defaults/main.yml").read_text())
    allowed = defaults["vllm_gpu_device_allow"]
    assert "/dev/nvidiactl" in allowed and "/dev/nvidia-uvm" in allowed
    assert not [node for node in allowed if "nvidia-uvm-tools" in node]
    lines = filters.vllm_unit_sandbox([], "cuda", allowed)
    assert "DeviceAllow=/dev/nvidia-uvm rw" in lines
    assert not [line for line in lines if "nvidia-uvm-tools" in line]


@pytest.mark.parametrize("path, quoted", [
    ("/mnt/my models/q", '"/mnt/my models/q"'),
    ("/mnt/a:b", "/mnt/a\\:b"),
    ("/mnt/100%", "/mnt/100%%"),
])
def test_sandbox_paths_are_quoted_for_systemd(path: str, quoted: str) -> None:
    assert filters.vllm_systemd_path(path) == quoted


def test_argv_changes_name_the_flag() -> None:
    old = ["/m", "--max-loras", "4", "--middleware", "a", "--middleware", "b", "--x=1"]
    new = ["/m2", "--max-loras", "3", "--middleware", "a", "--y"]
    assert filters.vllm_argv_changes(old, new) == [
        "--max-loras 4 -> 3", "--middleware a b -> a", "--x removed", "--y added", "model /m -> /m2"]
    assert filters.vllm_argv_changes(old, old) == []


@pytest.mark.parametrize("path", ["/", "/home", "/home/", "/tmp/m", "/var/tmp/m", "/dev/shm/m", "/home/a/../b",
                                  "/home/a//b", "/srv/100%", "/srv/a:b", "/proc/1"])
def test_adopted_folders_that_would_expose_too_much_or_cannot_be_bound_are_refused(path: str) -> None:
    model = {"name": "m", "source": "host", "path": path}
    errors = filters.vllm_declaration_errors({"model": model, "served_names": ["m"], "adapters": [
        {"name": "a", "source": "host", "path": path}], "max_lora_rank": 16, "max_loras": 1, "max_cpu_loras": 0})
    assert [e for e in errors if e.startswith("vllm_model.path=")] and \
        [e for e in errors if e.startswith("vllm_lora_adapters[0].path=")], errors


@pytest.mark.parametrize("path", ["/home/beelink/models/Qwen2.5-7B-Instruct-AWQ", "/mnt/my models/q", "/data/q/"])
def test_ordinary_adopted_folders_pass(path: str) -> None:
    assert filters.vllm_declaration_errors({"model": {"name": "m", "source": "host", "path": path},
                                            "served_names": ["m"], "adapters": [], "max_lora_rank": 16,
                                            "max_loras": 1, "max_cpu_loras": 0}) == []


def test_keep_releases_leaves_one_to_return_to() -> None:
    base = {"model": {"name": "m", "source": "controller", "path": "/m"}, "served_names": ["m"], "adapters": [],
            "max_lora_rank": 16, "max_loras": 1, "max_cpu_loras": 0}
    assert filters.vllm_declaration_errors({**base, "keep_releases": 2}) == []
    assert [e for e in filters.vllm_declaration_errors({**base, "keep_releases": 1}) if "vllm_keep_releases=1" in e]


def test_folders_leading_to_an_adopted_one_under_home_are_0755_tmpfs() -> None:
    """systemd < 250 created them with the service's UMask (0700 root): the bound folder was unreachable
    (seen on Debian 11's systemd 247; systemd#21548)."""
    lines = filters.vllm_unit_sandbox(["/home/beelink/models/Qwen", "/home/beelink/models/Qwen/sub",
                                       "/home/beelink/lora/sql", "/root/m", "/mnt/x/y"], "cpu", [])
    assert "TemporaryFileSystem=/home/beelink:mode=0755 /home/beelink/lora:mode=0755 /home/beelink/models:mode=0755" \
        in lines
    assert "UMask=0077" in lines
    assert not [line for line in filters.vllm_unit_sandbox(["/mnt/x/y"], "cpu", []) if "TemporaryFileSystem" in line]


# --- the API port: a socket unit on vllm_listen_host, vLLM in its own network namespace ----------

@pytest.mark.parametrize("host, port, stream", [
    ("127.0.0.1", 8000, "127.0.0.1:8000"), ("localhost", "8000", "127.0.0.1:8000"), ("0.0.0.0", 80, "0.0.0.0:80"),
    ("::", 8000, "[::]:8000"), ("[::1]", 8000, "[::1]:8000"), ("192.168.1.20", 8001, "192.168.1.20:8001"),
])
def test_listen_stream_is_an_address(host: str, port: object, stream: str) -> None:
    assert filters.vllm_listen_stream(host, port) == stream


@pytest.mark.parametrize("host", ["beelink.lan", "", "127.0.0.1\n", "0.0.0.0:8000"])
def test_a_listen_host_that_is_no_address_is_refused_by_name(host: str) -> None:
    with pytest.raises(ValueError):
        filters.vllm_listen_stream(host, 8000)
    errors = filters.vllm_declaration_errors(declaration(listen_host=host))
    assert any(error.startswith(f"vllm_listen_host={host!r} is not an IP address") for error in errors), errors
    assert filters.vllm_declaration_errors(declaration(listen_host="::")) == []


def test_the_engine_listens_in_its_private_network_and_cors_is_closed() -> None:
    """vLLM's internal listeners (TCPStore on every interface, gloo, ZMQ) must not reach the host's network."""
    for device in ("cpu", "cuda"):
        assert "PrivateNetwork=yes" in filters.vllm_unit_sandbox([], device, ["/dev/nvidiactl"])
    settings = {"model_path": "/m", "served_names": ["m"], "host": "127.0.0.1", "port": 8000, "max_model_len": 512,
                "dtype": "auto", "device": "cpu", "allowed_origins": []}
    argv = filters.vllm_serve_args(settings)
    assert argv[argv.index("--allowed-origins") + 1] == "[]"
    argv = filters.vllm_serve_args({**settings, "allowed_origins": ["https://chat.example.org"]})
    assert json.loads(argv[argv.index("--allowed-origins") + 1]) == ["https://chat.example.org"]


@pytest.mark.parametrize(("host", "port", "url"), [
    ("127.0.0.1", 8000, "http://127.0.0.1:8000"),
    ("0.0.0.0", 8001, "http://127.0.0.1:8001"),
    ("::", "8002", "http://127.0.0.1:8002"),
    ("[::]", 8000, "http://127.0.0.1:8000"),
    ("0:0:0:0:0:0:0:0", 8000, "http://127.0.0.1:8000"),
    ("", 8000, "http://127.0.0.1:8000"),
    ("localhost", 8000, "http://127.0.0.1:8000"),
    ("192.168.1.20", 9000, "http://192.168.1.20:9000"),
    ("::1", 8000, "http://[::1]:8000"),
    ("[fe80::1]", 8000, "http://[fe80::1]:8000"),
])
def test_check_url_is_where_the_host_reaches_its_api_port(host: str, port: object, url: str) -> None:
    assert filters.vllm_check_url(host, port) == url


def _balancer_metrics_url(**inventory: object) -> str:
    """The balancer role's default for vllm_balancer_metrics_url, rendered by ansible-core."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    defaults = DataLoader().load_from_file(str(REPO / "roles/vllm_balancer/defaults/main.yml"), trusted_as_template=True)
    return str(Templar(loader=DataLoader(), variables=dict(inventory)).template(defaults["vllm_balancer_metrics_url"]))


def test_without_a_balancer_the_in_flight_count_reads_the_port_vllm_serves() -> None:
    """Before: http://127.0.0.1:8000 whatever the host declared. A host on another port or on one LAN
    address answered nothing there, and a host that does not answer counts as idle: the restart cut
    its requests in flight."""
    assert _balancer_metrics_url() == "http://127.0.0.1:8000/metrics"
    assert _balancer_metrics_url(vllm_port=8123) == "http://127.0.0.1:8123/metrics"
    assert _balancer_metrics_url(vllm_port=9000, vllm_listen_host="10.0.0.5") == "http://10.0.0.5:9000/metrics"
    assert _balancer_metrics_url(vllm_port=9000, vllm_listen_host="0.0.0.0") == "http://127.0.0.1:9000/metrics"


def test_a_name_equal_to_a_served_model_gets_the_adapter_not_the_base() -> None:
    """vLLM 0.11 looks adapters up first (serving_engine._maybe_get_adapters): the declaration check
    once said the opposite of the adapter check."""
    (error,) = filters.vllm_declaration_errors(declaration(adapters=[{"name": "qwen", "path": "/a"}]))
    assert "would get the adapter instead of the base model" in error and "base model;" not in error


adapter_rules = load("plugins/module_utils/vllm_adapters.py",
                     "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_adapters")
plan_rules = load("plugins/module_utils/vllm_plan.py",
                  "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_plan")


@pytest.mark.parametrize("over", [
    {"max_lora_rank": 24}, {"max_cpu_loras": 2}, {"max_loras": 0},
    {"adapters": [{"name": "qwen", "path": "/a"}]},
    {"adapters": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
    {"adapters": [{"name": "../etc", "path": "/a"}]},
])
def test_the_declaration_check_and_the_adapter_check_say_the_same(over: dict[str, object]) -> None:
    """One rule, one home (module_utils/vllm_adapters.py): each reason the declaration check gives is,
    word for word, one the adapter check module gives for the same input."""
    decl = declaration(**over)
    adapters = list(decl["adapters"])  # type: ignore[arg-type]
    module_errors = adapter_rules.check_names([a["name"] for a in adapters], decl["served_names"])  # type: ignore[index]
    module_errors += adapter_rules.check_engine(decl["max_lora_rank"], decl["max_loras"], decl["max_cpu_loras"],  # type: ignore[arg-type]
                                                len(adapters), [])[0]
    errors = filters.vllm_declaration_errors(decl)
    assert errors and module_errors
    reasons = [error.split(": ", 1)[1] for error in errors]
    assert all(any(reason.split(". Fix: ")[0] in other for other in module_errors) for reason in reasons), \
        (errors, module_errors)


def test_identity_changes_name_each_field_that_differs_or_is_missing() -> None:
    identity = {"software_id": "a1", "engine_argv": ["--x"], "middleware": {"m.py": "d1"}}
    assert filters.vllm_identity_changes({"software_id": "a1", "engine_argv": ["--x"], "middleware": {"m.py": "d1"},
                                          "adapters": ["other"]}, identity) == []
    assert filters.vllm_identity_changes({"software_id": "a1", "engine_argv": ["--y"]}, identity) == \
        ["engine_argv", "middleware"]  # a release made before releases carried their middlewares
    assert filters.vllm_identity_changes({}, identity) == list(identity)


def test_the_live_change_and_adapters_yml_read_one_list_of_what_must_stay() -> None:
    """Before, adapters.yml's scope check compared five fields and the live change seven: a changed
    middleware passed adapters.yml's check, then restarted every host. Now the plan (service.yml)
    and adapters.yml's check read __vllm_engine_identity, and it lists the plan's fields."""
    derived = yaml.safe_load((REPO / "roles/vllm/vars/main.yml").read_text())
    assert set(derived["__vllm_engine_identity"]) == set(plan_rules.IDENTITY_FIELDS)
    service = (REPO / "roles/vllm/tasks/service.yml").read_text()
    assert "'engine_identity': __vllm_engine_identity" in service
    preflight = (REPO / "roles/vllm/tasks/preflight.yml").read_text()
    assert "vllm_identity_changes(__vllm_engine_identity\n" in preflight
    # The model's content is known only once artifacts.yml ran: the preflight compares the rest.
    assert "rejectattr('key', 'equalto', 'model')" in preflight
    for field in set(derived["__vllm_engine_identity"]) - {"model"}:
        assert f"'{field}' in __vllm_changes" in preflight, field
    # Each field is part of the release record too: a change to it is a new release.
    record = derived["__vllm_release_record"]
    for field in set(derived["__vllm_engine_identity"]) - {"engine_argv", "model", "unit_settings"}:
        assert derived["__vllm_engine_identity"][field] == record[field], field
    assert record["unit_settings"] == "{{ __vllm_engine_identity.unit_settings }}"
    assert record["model"] == "{{ __vllm_engine_identity.model }}"
    assert "__vllm_content_ids['model/' ~ vllm_model.name]" in derived["__vllm_engine_identity"]["model"]
    assert record["artifacts"] == "{{ __vllm_content_ids }}"


# --- out of service (vllm_balancer's ready.yml) --------------------------------------------------------
# The drain and ready calls' returns as vllm_haproxy_server gives them (switched_monotonic: the balancer's
# CLOCK_MONOTONIC); a skipped task's result has no such field.
DRAINED = {"changed": True, "status_before": "UP", "sessions_at_drain": 1, "switched_monotonic": 5021.25}
PUT_BACK = {"changed": True, "status_before": "MAINT", "switched_monotonic": 5035.5}
SKIPPED = {"changed": False, "skipped": True, "skip_reason": "Conditional result was False"}


def test_behind_a_balancer_out_of_service_is_haproxy_s_switch_out_to_its_switch_back() -> None:
    # The controller's span (out_at to now: 20 s) also counts both calls' round trips: not used.
    assert filters.vllm_out_of_service(1000.0, True, "", DRAINED, PUT_BACK, 980.0) == 14.2
    # A restart time of the vllm role does not replace the balancer's view (the drain came before it).
    assert filters.vllm_out_of_service(1000.0, True, 12.0, DRAINED, PUT_BACK, 980.0) == 14.2


@pytest.mark.parametrize(("drained", "put_back"), [
    (SKIPPED, PUT_BACK),  # no drain in this play
    (DRAINED, SKIPPED),
    ({}, {}),  # check mode: neither call returns the field
    (DRAINED, {**PUT_BACK, "switched_monotonic": 10.0}),  # the balancer rebooted in between
    ({**DRAINED, "switched_monotonic": ""}, PUT_BACK),
])
def test_without_both_switches_the_controller_s_span_is_used(drained: dict[str, object],
                                                             put_back: dict[str, object]) -> None:
    assert filters.vllm_out_of_service(1000.0, True, "", drained, put_back, 980.25) == 19.8
    assert filters.vllm_out_of_service(1000.0, True, "", drained, put_back, "") == 0.0


def test_without_a_balancer_out_of_service_is_the_restart_timed_on_the_host() -> None:
    assert filters.vllm_out_of_service(1000.0, False, 12.34, SKIPPED, SKIPPED, 980.0) == 12.3
    assert filters.vllm_out_of_service(1000.0, False, "12.34", SKIPPED, SKIPPED, 980.0) == 12.3
    # No restart of the vllm role's own in this play: the controller's span.
    assert filters.vllm_out_of_service(1000.0, False, "", SKIPPED, SKIPPED, 980.0) == 20.0

"""Unit tests for plugins/module_utils/vllm_adapters.py and library/vllm_adapter_check.py.

The adapters are the tiny Qwen2 fixtures (tests/fixtures/tinyqwen.py): every
broken one must be rejected with a message that names the adapter, the field
and the fix, and with no other error; the good ones must pass with none.
Extra adapters for rules the fixtures do not cover are made here from the good
ones. The module runs in-process as Ansible would run it.

``test_vllm_loader_agrees`` (marker ``vllm``) runs vLLM 0.11.0's own adapter
loader on the same files, so a difference between this checker and vLLM shows
up as a failing test rather than a failed deployment.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np
from numpy.typing import NDArray
import pytest
from safetensors.numpy import save_file

from tests.fixtures import tinyqwen as tq
from tests.unit.modules import run_main

ROOT = Path(__file__).resolve().parents[2]
UTILS_PATH = ROOT / "plugins" / "module_utils" / "vllm_adapters.py"
MODULE_PATH = ROOT / "plugins" / "modules" / "vllm_adapter_check.py"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_load("ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files", ROOT / "plugins" / "module_utils" / "vllm_files.py")  # imported by vllm_adapters
va = _load("ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_adapters", UTILS_PATH)  # what the module imports
mod = _load("vllm_adapter_check", MODULE_PATH)
# The check's concerns, each its own module_util (imported by vllm_adapters by FQCN).
PKG = "ansible_collections.inference.vllm_lora.plugins.module_utils"
st = importlib.import_module(f"{PKG}.vllm_safetensors")
peft = importlib.import_module(f"{PKG}.vllm_peft_config")

SERVED = ["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tq.Fixtures:
    return tq.make_all(tmp_path_factory.mktemp("tinyqwen"))


def good(tiny: tq.Fixtures) -> list[dict[str, str]]:
    return [{"name": name, "path": str(path)} for name, path in tiny.adapters.items()]


def check(tiny: tq.Fixtures, adapters: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """check_all with the fixtures' base model and the settings they are made for."""
    kwargs.setdefault("base_model_names", [tiny.base_model_name])
    kwargs.setdefault("served_model_names", SERVED)
    kwargs.setdefault("max_lora_rank", tq.MAX_LORA_RANK)
    kwargs.setdefault("max_loras", 4)
    result: dict[str, Any] = va.check_all(adapters, str(tiny.model / "config.json"), **kwargs)
    return result


def one(tiny: tq.Fixtures, name: str, path: Path, **kwargs: Any) -> dict[str, Any]:
    return check(tiny, [{"name": name, "path": str(path)}], **kwargs)


def assert_well_formed(name: str, messages: list[str]) -> None:
    """Every message names the adapter first and ends with a fix."""
    for message in messages:
        assert message.startswith(f"adapter {name!r}: "), message
        assert ". Fix: " in message and message.endswith("."), message
        assert "\n" not in message, message


def variant(root: Path, name: str, *, config: Optional[dict[str, Any]] = None,
            drop: tuple[str, ...] = (), tensors: Optional[dict[str, NDArray[np.float32]]] = None,
            **adapter: Any) -> Path:
    """A new adapter: tinyqwen's make_adapter, optionally with its tensors replaced."""
    adapter.setdefault("seed", 7)
    path = tq.make_adapter(root / name, config_overrides=config, drop_config_keys=drop,
                           weights=tensors is None, **adapter)
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def lora_pair(layer: int, module: str, rank: int, fan_in: int, fan_out: int) -> dict[str, NDArray[np.float32]]:
    """Shapes that matter, values that do not (lora_B not zero: an all-zero one is refused)."""
    return {tq.lora_key(layer, module, "lora_A"): np.zeros((rank, fan_in), np.float32),
            tq.lora_key(layer, module, "lora_B"): np.full((fan_out, rank), 0.01, np.float32)}


# --- the fixtures -----------------------------------------------------------
def test_good_adapters_pass_with_no_error_and_no_warning(tiny: tq.Fixtures) -> None:
    result = check(tiny, good(tiny))
    assert result["errors"] == []
    assert result["warnings"] == []
    assert result["ranks"] == {"alpha": 8, "beta": 16, "gamma": 8}
    assert result["max_lora_rank_effective"] == 16
    assert [a["weights"] for a in result["adapters"]] == ["safetensors"] * 3


# name -> (errors expected, substrings of the one naming the defect: field = value, why, fix)
BROKEN: dict[str, tuple[int, tuple[str, ...]]] = {
    "rank_too_high": (1, ("adapter_config.json r = 64: ",
                          "LoRA rank 64 is greater than max_lora_rank 16",
                          "Fix: set --max-lora-rank (vllm_max_lora_rank) to 64 or more, or retrain with r <= 16")),
    "dora": (1, ("adapter_config.json use_dora = true: ", "vLLM does not yet support DoRA.",
                 "Fix: retrain as plain LoRA (use_dora false)")),
    "modules_to_save": (1, ('adapter_config.json modules_to_save = ["lm_head"]: ',
                            "vLLM only supports modules_to_save being None.",
                            "Fix: retrain with modules_to_save null")),
    "embed_tokens": (1, ('adapter_config.json target_modules = ["embed_tokens", "q_proj", "v_proj"]: ',
                         "embed_tokens: the base model has no LoRA support for this module",
                         "Fix: retrain targeting only q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")),
    # two shape errors per module (lora_A in, lora_B out) + the base model's name
    "other_base": (5, ("adapter_model.safetensors q_proj lora_A shape = [8, 128] (2 modules, ",
                       "the base model needs [r, 64] (hidden_size 64)",
                       "The size of tensor a ... must match",
                       "Fix: use an adapter trained on this base model")),
    "foreign_base_name": (1, ('adapter_config.json base_model_name_or_path = "Qwen/Qwen2.5-7B-Instruct": ',
                              "trained on another base model than the one served (tinyqwen/Qwen2-tiny)",
                              "Fix: use an adapter trained on the served base model")),
    "no_weights": (1, ("adapter_model.safetensors = (missing): ", "doesn't contain tensors",
                       "Fix: copy adapter_model.safetensors")),
    "no_rank": (1, ("adapter_config.json r = (missing): ",
                    "Missing required configuration fields: {'r'}", "Fix: add r to adapter_config.json")),
    "bias_all": (1, ('adapter_config.json bias = "all": ',
                     "Adapter bias cannot be used without bias_enabled.", 'Fix: retrain with bias "none"')),
    "unknown_target": (1, ('adapter_config.json target_modules = ["c_attn"]: ',
                           "c_attn: the base model has no LoRA support for this module",
                           "Fix: retrain targeting only q_proj")),
    "pickle_only": (1, ("adapter_model.bin = (present, no safetensors): a pickle",
                        "torch.load(weights_only=True)", "Fix: convert it to safetensors: python -c ",
                        "torch.load('adapter_model.bin', weights_only=True)",
                        "set allow_pickle: true on this adapter in vllm_lora_adapters")),
    "nan_weights": (1, (f"adapter_model.safetensors {tq.lora_key(0, 'q_proj', 'lora_B')} = 3 NaN of 512 values: ",
                        "serves garbage", "Fix: retrain or re-export the adapter; the file is corrupt")),
    "inf_weights": (1, (f"adapter_model.safetensors {tq.lora_key(1, 'v_proj', 'lora_A')} = 1 Inf of 512 values: ",
                        "Fix: retrain or re-export the adapter")),
    "zero_b": (1, ("adapter_model.safetensors lora_B values = all zero (4 tensors, e.g. ",
                   "an untrained adapter", "it changes nothing", "Fix: train the adapter")),
}


def test_every_broken_fixture_is_covered(tiny: tq.Fixtures) -> None:
    """A new broken fixture must get an expectation here."""
    assert set(BROKEN) == set(tiny.broken)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_fixture_is_rejected_naming_adapter_field_and_fix(tiny: tq.Fixtures, name: str) -> None:
    count, parts = BROKEN[name]
    result = one(tiny, name, tiny.broken[name].path)
    errors = result["errors"]
    assert len(errors) == count, "\n".join(errors)
    assert_well_formed(name, errors)
    assert any(all(p in e for p in parts) for e in errors), "\n".join(errors)
    assert result["warnings"] == []


def test_other_base_is_rejected_by_shapes_even_when_names_are_only_warned(tiny: tq.Fixtures) -> None:
    result = one(tiny, "other_base", tiny.broken["other_base"].path, base_model_mismatch="warn")
    assert len(result["errors"]) == 4
    assert {e.split(" = ")[0] for e in result["errors"]} == {
        f"adapter 'other_base': adapter_model.safetensors {m} {w} shape"
        for m in ("q_proj", "v_proj") for w in ("lora_A", "lora_B")}
    assert any("needs [32, r] (num_key_value_heads 2 * head_dim 16)" in e for e in result["errors"])
    assert len(result["warnings"]) == 1 and "Qwen2-tiny-h128" in result["warnings"][0]


def test_all_fixtures_together_report_every_broken_one(tiny: tq.Fixtures) -> None:
    adapters = good(tiny) + [{"name": n, "path": str(b.path)} for n, b in tiny.broken.items()]
    result = check(tiny, adapters, max_loras=len(adapters))
    assert len(result["errors"]) == sum(count for count, _ in BROKEN.values())
    assert {e.split("'")[1] for e in result["errors"]} == set(tiny.broken)


# --- ranks and engine settings ----------------------------------------------
@pytest.mark.parametrize(("names", "effective"), [
    (["alpha"], 8), (["alpha", "gamma"], 8), (["alpha", "beta"], 16), ([], 16),
])
def test_max_lora_rank_zero_derives_the_smallest_allowed_value(
        tiny: tq.Fixtures, names: list[str], effective: int) -> None:
    adapters = [{"name": n, "path": str(tiny.adapters[n])} for n in names]
    result = check(tiny, adapters, max_lora_rank=0)
    assert result["errors"] == []
    assert result["max_lora_rank_effective"] == effective


def test_derived_max_lora_rank_fits_a_rank_64_adapter(tiny: tq.Fixtures) -> None:
    adapters = good(tiny) + [{"name": "big", "path": str(tiny.broken["rank_too_high"].path)}]
    result = check(tiny, adapters, max_lora_rank=0)
    assert result["errors"] == []
    assert result["max_lora_rank_effective"] == 64
    assert result["ranks"]["big"] == 64


def test_derived_max_lora_rank_above_512_is_an_error(tiny: tq.Fixtures, tmp_path: Path) -> None:
    path = variant(tmp_path, "huge", rank=600, target_modules=("q_proj",))
    result = one(tiny, "huge", path, max_lora_rank=0)
    assert result["max_lora_rank_effective"] is None
    assert any(e.startswith("adapter 'huge': rank = 600: above vLLM's largest max_lora_rank 512")
               for e in result["errors"]), result["errors"]
    assert any(e.startswith("vLLM setting --max-lora-rank (vllm_max_lora_rank) = 0: derived from the "
                            "adapters, but rank 600") for e in result["errors"]), result["errors"]


def test_explicit_max_lora_rank_below_an_adapter_is_an_error(tiny: tq.Fixtures) -> None:
    result = check(tiny, good(tiny), max_lora_rank=8)
    assert result["errors"] == [
        "adapter 'beta': adapter_config.json r = 16: LoRA rank 16 is greater than max_lora_rank 8 "
        "(vLLM refuses it). Fix: set --max-lora-rank (vllm_max_lora_rank) to 16 or more, "
        "or retrain with r <= 8."]
    assert result["max_lora_rank_effective"] == 8


@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128, 256, 320, 512])
def test_allowed_max_lora_ranks_pass(tiny: tq.Fixtures, rank: int) -> None:
    result = check(tiny, good(tiny)[:1], max_lora_rank=rank)  # alpha, rank 8
    assert result["errors"] == [] and result["max_lora_rank_effective"] == rank


@pytest.mark.parametrize(("rank", "fix"), [(24, 32), (4, 16), (1024, 512), (-1, 16)])
def test_max_lora_rank_outside_vllms_list_is_an_error(tiny: tq.Fixtures, rank: int, fix: int) -> None:
    result = check(tiny, good(tiny), max_lora_rank=rank)
    engine = [e for e in result["errors"] if e.startswith("vLLM setting")]
    assert engine == [
        f"vLLM setting --max-lora-rank (vllm_max_lora_rank) = {rank}: vLLM 0.11.0 accepts only one of "
        f"8, 16, 32, 64, 128, 256, 320, 512 and does not start. Fix: set it to {fix}."]


@pytest.mark.parametrize(("max_loras", "max_cpu_loras", "ok"), [
    (4, 0, True), (4, 4, True), (4, 8, True), (4, 3, False), (1, 0, True), (0, 0, False),
])
def test_max_cpu_loras_must_not_be_below_max_loras(
        tiny: tq.Fixtures, max_loras: int, max_cpu_loras: int, ok: bool) -> None:
    result = check(tiny, good(tiny)[:1], max_loras=max_loras, max_cpu_loras=max_cpu_loras)
    assert (result["errors"] == []) is ok, result["errors"]
    if max_cpu_loras and not ok:
        assert result["errors"] == [
            "vLLM setting --max-cpu-loras (vllm_max_cpu_loras) = 3: must be >= max_loras 4 "
            "(vLLM: \"max_cpu_loras (3) must be >= max_loras (4)\", it does not start). "
            "Fix: set it to 4 or more, or 0 to use vLLM's default (= max_loras)."]


def test_more_adapters_than_max_loras_is_only_a_warning(tiny: tq.Fixtures) -> None:
    result = check(tiny, good(tiny), max_loras=2)
    assert result["errors"] == []
    assert result["warnings"] == [
        "vLLM setting --max-loras (vllm_max_loras) = 2: 3 adapters are declared: at most 2 can be used "
        "in one batch, requests for others wait; and only 2 stay in CPU memory (--max-cpu-loras), others "
        "are re-read from disk when used. Fix: raise it to 3 if they are used at the same time "
        "(more GPU memory)."]
    assert check(tiny, good(tiny), max_loras=3)["warnings"] == []


def test_rank_from_rank_pattern_counts(tiny: tq.Fixtures, tmp_path: Path) -> None:
    """Same scaling (alpha/r = 2) for every module, but a rank above max-lora-rank."""
    path = variant(tmp_path, "patterned", config={"rank_pattern": {"q_proj": 32},
                                                  "alpha_pattern": {"q_proj": 64}})
    result = one(tiny, "patterned", path)
    assert result["ranks"] == {"patterned": 32}
    assert len(result["errors"]) == 1, result["errors"]
    assert result["errors"][0].startswith(
        "adapter 'patterned': adapter_config.json rank_pattern = {\"q_proj\": 32}: LoRA rank 32 is greater "
        "than max_lora_rank 16 (vLLM 0.11.0 checks only r at load, then fails when it activates")
    assert one(tiny, "patterned", path, max_lora_rank=0)["max_lora_rank_effective"] == 32


def test_rank_from_tensor_shapes_counts(tiny: tq.Fixtures, tmp_path: Path) -> None:
    """r says 8 but the tensors have rank 32: vLLM passes its r check and fails later."""
    path = variant(tmp_path, "liar", rank=32, config={"r": 8, "lora_alpha": 16})
    result = one(tiny, "liar", path)
    assert result["ranks"] == {"liar": 32}
    assert result["errors"] == [
        "adapter 'liar': adapter_model.safetensors lora_A/lora_B rank = 32: LoRA rank 32 is greater than "
        "max_lora_rank 16 (r says 8; vLLM 0.11.0 checks only r at load, then fails when it activates the "
        "adapter). Fix: set --max-lora-rank (vllm_max_lora_rank) to 32 or more, or retrain with r <= 16."]


@pytest.mark.parametrize(("config", "bad"), [
    ({"rank_pattern": {"q_proj": 4}}, True),                       # alpha/4 != alpha/8
    ({"alpha_pattern": {"v_proj": 32}}, True),
    ({"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8}}, False),
    ({"rank_pattern": {"q_proj": 4}, "use_rslora": True}, True),
    ({"rank_pattern": {}, "alpha_pattern": {}}, False),
])
def test_patterns_vllm_would_scale_differently_are_errors(
        tiny: tq.Fixtures, tmp_path: Path, config: dict[str, Any], bad: bool) -> None:
    path = variant(tmp_path, "scaled", config=config)
    errors = one(tiny, "scaled", path)["errors"]
    assert_well_formed("scaled", errors)
    assert bool(errors) is bad, errors
    if bad:
        assert "adapter_config.json rank_pattern/alpha_pattern = " in errors[0]
        assert "vLLM 0.11.0 ignores both and scales every module by lora_alpha/" in errors[0]
        assert ("lora_alpha/sqrt(r) = 5.65685" if config.get("use_rslora") else "lora_alpha/r = 2") in errors[0]


# --- names --------------------------------------------------------------------
@pytest.mark.parametrize(("name", "why"), [
    ("", "an adapter needs a name"),
    ("   ", "an adapter needs a name"),
    ("../alpha", "not safe in a path or URL"),
    ("a/b", "not safe in a path or URL"),
    ("a b", "not safe in a path or URL"),
    ("-alpha", "not safe in a path or URL"),
    (".hidden", "not safe in a path or URL"),
    ("x" * 129, "not safe in a path or URL"),
    ("alpha?x=1", "not safe in a path or URL"),
    ("alpha\n", "not safe in a path or URL"),  # `$` alone accepts a trailing newline
    ("tiny\n", "not safe in a path or URL"),
    ("tiny", "equals a served model name"),
])
def test_bad_adapter_names_are_errors(tiny: tq.Fixtures, name: str, why: str) -> None:
    result = check(tiny, [{"name": name, "path": str(tiny.adapters["alpha"])}])
    assert len(result["errors"]) == 1, result["errors"]
    assert why in result["errors"][0]
    assert "name = " in result["errors"][0] and ". Fix: " in result["errors"][0]


def test_duplicate_names_are_an_error(tiny: tq.Fixtures) -> None:
    adapters = good(tiny) + [{"name": "beta", "path": str(tiny.adapters["alpha"])}]
    errors = check(tiny, adapters)["errors"]
    assert errors == [
        "adapter 'beta': name = \"beta\": declared more than once (also #2); vLLM refuses the second "
        "(\"The lora adapter 'beta' has already been loaded.\") and does not start. "
        "Fix: give every adapter its own name."]


@pytest.mark.parametrize("name", ["a", "Alpha_1.v2-x", "x" * 128, "0"])
def test_safe_names_pass(tiny: tq.Fixtures, name: str) -> None:
    assert check(tiny, [{"name": name, "path": str(tiny.adapters["alpha"])}])["errors"] == []


def test_missing_name_or_path(tiny: tq.Fixtures, tmp_path: Path) -> None:
    errors = check(tiny, [{"path": str(tiny.adapters["alpha"])}, {"name": "nopath"},
                          {"name": "gone", "path": str(tmp_path / "gone")}])["errors"]
    assert errors[0].startswith("adapter '#1': name = null: an adapter needs a name")
    assert errors[1].startswith("adapter 'nopath': path = null: an adapter needs a path")
    assert errors[2].startswith(f"adapter 'gone': path = \"{tmp_path / 'gone'}\": no such directory")
    assert len(errors) == 3


# --- base_model_name_or_path --------------------------------------------------
def test_foreign_base_name_is_an_error_by_default_and_a_warning_on_request(tiny: tq.Fixtures) -> None:
    path = tiny.broken["foreign_base_name"].path
    as_error = one(tiny, "foreign", path)
    as_warning = one(tiny, "foreign", path, base_model_mismatch="warn")
    assert len(as_error["errors"]) == 1 and as_error["warnings"] == []
    assert as_warning["errors"] == [] and as_warning["warnings"] == as_error["errors"]


@pytest.mark.parametrize("declared", [
    "tinyqwen/Qwen2-tiny", "TinyQwen/QWEN2-TINY", "/srv/models/Qwen2-tiny/", "Qwen2-tiny",
    "someone/Qwen2-tiny-AWQ", "x/qwen2-tiny-GPTQ-Int4", "unsloth/qwen2-tiny-bnb-4bit",
    "/root/.cache/huggingface/hub/models--tinyqwen--Qwen2-tiny/snapshots/0123abcd",
])
def test_base_names_compare_by_normalised_basename(tiny: tq.Fixtures, tmp_path: Path, declared: str) -> None:
    path = variant(tmp_path, "named", base_model_name_or_path=declared)
    result = one(tiny, "named", path)
    assert result["errors"] == [] and result["warnings"] == []


@pytest.mark.parametrize("declared", ["tinyqwen/Qwen2-tiny-h128", "Qwen2-tiny2", "tiny", "Qwen2"])
def test_other_base_names_do_not_match(tiny: tq.Fixtures, tmp_path: Path, declared: str) -> None:
    path = variant(tmp_path, "named", base_model_name_or_path=declared)
    assert len(one(tiny, "named", path)["errors"]) == 1


@pytest.mark.parametrize("config,drop", [({"base_model_name_or_path": ""}, ()),
                                         ({"base_model_name_or_path": None}, ()),
                                         (None, ("base_model_name_or_path",))])
def test_empty_or_missing_base_name_is_only_a_warning(
        tiny: tq.Fixtures, tmp_path: Path, config: Optional[dict[str, Any]], drop: tuple[str, ...]) -> None:
    path = variant(tmp_path, "anon", config=config, drop=drop)
    result = one(tiny, "anon", path)
    assert result["errors"] == []
    assert len(result["warnings"]) == 1
    assert result["warnings"][0].startswith("adapter 'anon': adapter_config.json base_model_name_or_path = ")
    assert "does not say which base model" in result["warnings"][0]


def test_without_accepted_names_the_base_name_is_not_checked(tiny: tq.Fixtures) -> None:
    result = one(tiny, "foreign", tiny.broken["foreign_base_name"].path, base_model_names=[])
    assert result["errors"] == [] and result["warnings"] == []


# --- config fields ------------------------------------------------------------
@pytest.mark.parametrize(("drop", "field"), [
    (("lora_alpha",), "lora_alpha"), (("target_modules",), "target_modules"),
    (("r", "lora_alpha"), "r, lora_alpha"),
])
def test_missing_required_fields(tiny: tq.Fixtures, tmp_path: Path, drop: tuple[str, ...], field: str) -> None:
    path = variant(tmp_path, "partial", drop=drop)
    errors = one(tiny, "partial", path)["errors"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"adapter 'partial': adapter_config.json {field} = (missing): "
                                "vLLM refuses it: \"Missing required configuration fields: {")


@pytest.mark.parametrize(("config", "field"), [
    ({"peft_type": "IA3"}, 'peft_type = "IA3"'),
    ({"peft_type": "LOHA"}, 'peft_type = "LOHA"'),
    ({"r": 0}, "r = 0"), ({"r": "8"}, 'r = "8"'), ({"r": 8.0}, "r = 8.0"),
    ({"lora_alpha": "16"}, 'lora_alpha = "16"'),
    ({"modules_to_save": ["score"]}, 'modules_to_save = ["score"]'),
    ({"bias": "lora_only"}, 'bias = "lora_only"'),
    ({"lora_bias": True}, "lora_bias = true"),
    ({"target_modules": []}, "target_modules = []"),
    ({"target_modules": ["q_proj", "lm_head"]}, 'target_modules = ["q_proj", "lm_head"]'),
    ({"rank_pattern": {"q_proj": "x"}}, 'rank_pattern = {"q_proj": "x"}'),
])
def test_config_values_vllm_refuses(tiny: tq.Fixtures, tmp_path: Path, config: dict[str, Any], field: str) -> None:
    path = variant(tmp_path, "cfg", config=config)
    errors = one(tiny, "cfg", path)["errors"]
    assert_well_formed("cfg", errors)
    assert any(f"adapter_config.json {field}: " in e for e in errors), errors


def test_peft_type_missing_is_a_warning(tiny: tq.Fixtures, tmp_path: Path) -> None:
    result = one(tiny, "untyped", variant(tmp_path, "untyped", drop=("peft_type",)))
    assert result["errors"] == []
    assert [w.split(": ")[1] for w in result["warnings"]] == ["adapter_config.json peft_type = (missing)"]


def test_full_module_names_and_regex_targets(tiny: tq.Fixtures, tmp_path: Path) -> None:
    full = variant(tmp_path, "full", config={"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]})
    assert one(tiny, "full", full)["errors"] == []
    regex = variant(tmp_path, "regex", config={"target_modules": r"model.*\.(q_proj|v_proj)$"})
    assert one(tiny, "regex", regex)["errors"] == []
    bad_regex = variant(tmp_path, "bad_regex", config={"target_modules": r".*\.(q_proj|c_attn)$"})
    assert "c_attn: the base model has no LoRA support" in one(tiny, "bad_regex", bad_regex)["errors"][0]
    opaque = variant(tmp_path, "opaque", config={"target_modules": "all-linear"})
    result = one(tiny, "opaque", opaque)
    assert result["errors"] == []  # the tensor names are checked instead
    assert "vLLM 0.11.0 checks the tensor names instead" in result["warnings"][0]


def test_supported_modules_by_parameter_and_unknown_architecture(tiny: tq.Fixtures) -> None:
    alpha = tiny.adapters["alpha"]  # q_proj, v_proj
    errors = one(tiny, "alpha", alpha, supported_modules=["q_proj", "k_proj"])["errors"]
    assert len(errors) == 1 and "v_proj: the base model has no LoRA support" in errors[0]
    config = json.loads((tiny.model / "config.json").read_text())
    config["architectures"] = ["SomethingElseForCausalLM"]
    result = va.check_all([{"name": "u", "path": str(tiny.broken["unknown_target"].path)}], config)
    assert result["errors"] == []
    assert "no list of LoRA-capable modules is known" in result["warnings"][0]


# --- weights ------------------------------------------------------------------
def pickled_variant(root: Path, name: str, suffix: str = "bin", **adapter: Any) -> Path:
    """An adapter whose only weights are a pickle (not a torch archive: what vLLM refuses)."""
    path = variant(root, name, **adapter)
    tensors = tq.load_safetensors(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    (path / f"adapter_model.{suffix}").write_bytes(pickle.dumps({k: v.tolist() for k, v in tensors.items()}))
    return path


@pytest.mark.parametrize("suffix", ["bin", "pt"])
def test_pickled_weights_alone_are_refused_naming_the_file_and_both_fixes(
        tiny: tq.Fixtures, tmp_path: Path, suffix: str) -> None:
    path = pickled_variant(tmp_path, "pickled", suffix)
    result = one(tiny, "pickled", path)
    assert result["adapters"][0]["weights"] == suffix
    assert result["warnings"] == []
    assert_well_formed("pickled", result["errors"])
    assert result["errors"] == [
        f"adapter 'pickled': adapter_model.{suffix} = (present, no safetensors): a pickle: its tensors cannot be "
        "checked without unpickling it, and vLLM 0.11.0 reads it with torch.load(weights_only=True), so a file "
        "that is not a torch archive stops start-up. Fix: convert it to safetensors: python -c \"import torch; "
        "from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in "
        f"torch.load('adapter_model.{suffix}', weights_only=True).items()}}, 'adapter_model.safetensors')\" "
        "in the adapter directory (or PEFT's save_pretrained(..., safe_serialization=True)); or, only if you "
        "trust the file, set allow_pickle: true on this adapter in vllm_lora_adapters."]


def test_pickled_weights_with_allow_pickle_pass_with_a_warning(tiny: tq.Fixtures, tmp_path: Path) -> None:
    path = pickled_variant(tmp_path, "pickled")
    result = check(tiny, [{"name": "pickled", "path": str(path), "allow_pickle": True}])
    assert result["errors"] == []
    assert len(result["warnings"]) == 1
    assert_well_formed("pickled", result["warnings"])
    assert result["warnings"][0].startswith(
        "adapter 'pickled': adapter_model.bin = (present, no safetensors, allow_pickle true): accepted without "
        "checking its tensors")
    assert "NaN/Inf and all-zero lora_B are not checked" in result["warnings"][0]
    # allow_pickle does not waive what the config shows
    unknown = pickled_variant(tmp_path, "pickled_c_attn", "pt", config={"target_modules": ["c_attn"]})
    errors = check(tiny, [{"name": "p", "path": str(unknown), "allow_pickle": True}])["errors"]
    assert len(errors) == 1 and "c_attn: the base model has no LoRA support" in errors[0]


def test_safetensors_beside_a_pickle_is_what_is_checked(tiny: tq.Fixtures, tmp_path: Path) -> None:
    """vLLM loads adapter_model.safetensors when both are there: the .bin is irrelevant."""
    path = tmp_path / "both"
    shutil.copytree(tiny.adapters["alpha"], path)
    (path / "adapter_model.bin").write_bytes(b"not a torch archive")
    result = one(tiny, "both", path)
    assert result["errors"] == [] and result["warnings"] == []
    assert result["adapters"][0]["weights"] == "safetensors"
    broken = tmp_path / "both_nan"
    shutil.copytree(tiny.broken["nan_weights"].path, broken)
    (broken / "adapter_model.bin").write_bytes(b"not a torch archive")
    errors = one(tiny, "both_nan", broken, )["errors"]
    assert len(errors) == 1 and "3 NaN of 512 values" in errors[0]


def test_truncated_or_corrupt_safetensors(tiny: tq.Fixtures, tmp_path: Path) -> None:
    path = tmp_path / "cut"
    shutil.copytree(tiny.adapters["alpha"], path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    errors = one(tiny, "cut", path)["errors"]
    assert len(errors) == 1 and "(truncated or corrupt copy)" in errors[0]
    weights.write_bytes(b"\xff" * 8 + data[8:])
    assert "does not fit the file size" in one(tiny, "cut", path)["errors"][0]
    weights.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    assert "header is not a JSON object" in one(tiny, "cut", path)["errors"][0]
    weights.write_bytes(b"abc")
    assert "shorter than the 8-byte header length" in one(tiny, "cut", path)["errors"][0]


class CountingReads:
    """Wraps open() in the adapter check's modules: the size of every read, per file name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: dict[str, list[int]] = {}
        real_open, reads = builtins.open, self

        class Counting:
            def __init__(self, handle: Any, name: str) -> None:
                self.handle, self.name = handle, name

            def read(self, *args: Any) -> Any:
                data = self.handle.read(*args)
                reads.sizes.setdefault(self.name, []).append(len(data))
                return data

            def __enter__(self) -> "Counting":
                return self

            def __exit__(self, *exc: Any) -> None:
                self.handle.close()

            def __getattr__(self, attr: str) -> Any:
                return getattr(self.handle, attr)

        def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            return Counting(real_open(file, *args, **kwargs), os.path.basename(str(file)))

        for module in (va, st, peft):  # every module of the check that reads a file
            monkeypatch.setattr(module, "open", counting_open, raising=False)


def test_header_only_reads_only_the_header(tiny: tq.Fixtures, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = CountingReads(monkeypatch)
    path = tiny.adapters["beta"]
    assert one(tiny, "beta", path, check_values=False)["errors"] == []
    header = 8 + int.from_bytes((path / "adapter_model.safetensors").read_bytes()[:8], "little")
    assert sum(reads.sizes["adapter_model.safetensors"]) == header
    assert header < (path / "adapter_model.safetensors").stat().st_size / 4


def test_values_are_read_once_in_chunks_no_larger_than_asked(
        tiny: tq.Fixtures, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = CountingReads(monkeypatch)
    path = tiny.adapters["beta"]
    assert one(tiny, "beta", path, chunk_bytes=1000)["errors"] == []
    weights = path / "adapter_model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    sizes = reads.sizes["adapter_model.safetensors"]
    assert sizes[:2] == [8, header - 8]
    assert sum(sizes[2:]) == weights.stat().st_size - header  # every tensor is a LoRA one, read once
    assert max(sizes[2:]) == 1000 - 1000 % 4 and all(n % 4 == 0 for n in sizes[2:])  # whole F32 elements


def test_tensor_level_defects(tiny: tq.Fixtures, tmp_path: Path) -> None:
    h, kv = tq.HIDDEN, tq.KV_HEADS * (tq.HIDDEN // tq.HEADS)
    cases: dict[str, tuple[dict[str, NDArray[np.float32]], str]] = {
        "b_missing": ({tq.lora_key(0, "q_proj", "lora_A"): np.zeros((8, h), np.float32)},
                      "adapter_model.safetensors q_proj lora_B = 1 module, e.g. model.layers.0.self_attn.q_proj: "
                      "lora_B missing"),
        "rank_differs": ({tq.lora_key(0, "q_proj", "lora_A"): np.zeros((8, h), np.float32),
                          tq.lora_key(0, "q_proj", "lora_B"): np.full((h, 4), 0.01, np.float32)},
                         "lora_A [8, 64] has rank 8 but lora_B [64, 4] rank 4"),
        "full_weight": ({**lora_pair(0, "q_proj", 8, h, h),
                         "base_model.model.model.layers.0.self_attn.q_proj.weight": np.zeros((h, h), np.float32)},
                        "adapter_model.safetensors tensor names = 1 tensor, e.g. "
                        "base_model.model.model.layers.0.self_attn.q_proj.weight: not LoRA weights"),
        "lora_bias": ({**lora_pair(0, "q_proj", 8, h, h),
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.zeros(h, np.float32)},
                      "adapter_model.safetensors bias tensors = 1 tensor"),
        "layer_beyond": ({**lora_pair(0, "q_proj", 8, h, h), **lora_pair(5, "q_proj", 8, h, h)},
                         "adapter_model.safetensors layer indices = 1 module, e.g. model.layers.5.self_attn.q_proj: "
                         "the base model has only num_hidden_layers 2"),
        "smaller": ({**lora_pair(0, "q_proj", 8, h, h), **lora_pair(0, "v_proj", 8, h, kv // 2)},
                    "v_proj lora_B shape = [16, 8] (1 module, e.g. model.layers.0.self_attn.v_proj): the base model "
                    "needs [32, r] (num_key_value_heads 2 * head_dim 16), so the adapter was trained for another "
                    "base model; vLLM zero-pads it without an error and serves wrong output"),
        "c_attn_tensor": ({**lora_pair(0, "q_proj", 8, h, h),
                           "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight":
                               np.zeros((8, h), np.float32),
                           "base_model.model.model.layers.0.self_attn.c_attn.lora_B.weight":
                               np.zeros((3 * h, 8), np.float32)},
                          "adapter_model.safetensors c_attn tensors = 1 module, e.g. model.layers.0.self_attn.c_attn: "
                          "the base model has no LoRA support for c_attn"),
    }
    for name, (tensors, expected) in cases.items():
        path = variant(tmp_path, name, tensors=tensors)
        errors = one(tiny, name, path)["errors"]
        assert_well_formed(name, errors)
        assert len(errors) == 1 and expected in errors[0], (name, errors)


# --- tensor values -------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
Q_B, V_A = tq.lora_key(0, "q_proj", "lora_B"), tq.lora_key(1, "v_proj", "lora_A")


def setter(values: dict[str, dict[int, float]]) -> Any:
    """An edit_tensors for tinyqwen: {tensor: {flat index: value}}."""
    def edit(tensors: dict[str, NDArray[np.float32]]) -> None:
        for key, at in values.items():
            flat = tensors[key].reshape(-1)
            for index, value in at.items():
                flat[index] = value
    return edit


@pytest.mark.parametrize("dtype", DTYPES)
def test_good_adapters_pass_in_every_dtype(tiny: tq.Fixtures, tmp_path: Path, dtype: str) -> None:
    path = variant(tmp_path, "good", rank=16, target_modules=tq.ATTN_MODULES + tq.MLP_MODULES, dtype=dtype)
    dtype_code = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    assert {v["dtype"] for k, v in tq.safetensors_header(path / "adapter_model.safetensors").items()
            if k != "__metadata__"} == {dtype_code}
    result = one(tiny, "good", path)
    assert result["errors"] == [] and result["warnings"] == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("values", "expected"), [
    ({Q_B: {3: float("nan")}}, f"{Q_B} = 1 NaN of 512 values: "),
    ({V_A: {0: float("inf"), 9: float("inf")}}, f"{V_A} = 2 Inf of 512 values: "),
    ({V_A: {511: -float("inf"), 7: float("nan")}}, f"{V_A} = 1 NaN and 1 Inf of 512 values: "),
    ({Q_B: {0: float("nan")}, V_A: {1: float("inf"), 2: float("inf")}},
     f"{Q_B} = 1 NaN of 512 values (and 1 more tensor: 1 NaN and 2 Inf in all): "),
], ids=["nan-lora_B", "inf-lora_A", "both-kinds", "two-tensors"])
def test_nan_or_inf_is_refused_naming_tensor_and_count(
        tiny: tq.Fixtures, tmp_path: Path, dtype: str, values: dict[str, dict[int, float]], expected: str) -> None:
    path = variant(tmp_path, "bad", dtype=dtype, edit_tensors=setter(values))
    errors = one(tiny, "bad", path)["errors"]
    assert_well_formed("bad", errors)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"adapter 'bad': adapter_model.safetensors {expected}"), errors
    assert errors[0].endswith("Fix: retrain or re-export the adapter; the file is corrupt "
                              "(copy it again if only this copy is).")


def test_f64_values_are_checked(tiny: tq.Fixtures, tmp_path: Path) -> None:
    h = tq.HIDDEN
    pair = {k: v.astype(np.float64) for k, v in lora_pair(0, "q_proj", 8, h, h).items()}
    assert one(tiny, "f64", variant(tmp_path, "f64", tensors=pair))["errors"] == []
    pair[tq.lora_key(0, "q_proj", "lora_A")][2, 3] = np.nan
    errors = one(tiny, "f64", variant(tmp_path, "f64_nan", tensors=pair))["errors"]
    assert len(errors) == 1 and "lora_A.weight = 1 NaN of 512 values" in errors[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_every_lora_b_all_zero_is_refused(tiny: tq.Fixtures, tmp_path: Path, dtype: str, zero: float) -> None:
    def edit(tensors: dict[str, NDArray[np.float32]]) -> None:
        for key, array in tensors.items():
            if ".lora_B." in key:
                array[...] = zero

    path = variant(tmp_path, "untrained", dtype=dtype, edit_tensors=edit)
    errors = one(tiny, "untrained", path)["errors"]
    assert_well_formed("untrained", errors)
    assert errors == [
        f"adapter 'untrained': adapter_model.safetensors lora_B values = all zero (4 tensors, e.g. "
        f"{tq.lora_key(0, 'q_proj', 'lora_B')}): an untrained adapter (PEFT starts lora_B at zero): vLLM 0.11.0 "
        "loads it and it changes nothing, requests for it get the base model's output. Fix: train the adapter, "
        "and export it after training (not its initial state)."]


def test_some_zero_lora_b_is_allowed(tiny: tq.Fixtures, tmp_path: Path) -> None:
    def edit(tensors: dict[str, NDArray[np.float32]]) -> None:
        for key, array in tensors.items():
            if ".lora_B." in key and key != Q_B:
                array[...] = 0.0
        tensors[Q_B][...] = -0.0
        tensors[Q_B][-1, -1] = 1e-3  # one value is enough

    assert one(tiny, "partly", variant(tmp_path, "partly", edit_tensors=edit))["errors"] == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_bytes", [1, 6, 64, 1001])
def test_chunk_boundaries_do_not_change_the_findings(
        tiny: tq.Fixtures, tmp_path: Path, dtype: str, chunk_bytes: int) -> None:
    """Chunks of whole elements (an odd size is rounded down); values on both sides of a boundary count."""
    size = 2 if dtype != "float32" else 4
    boundary = max(size, chunk_bytes - chunk_bytes % size) // size  # first element of the second chunk
    nan = setter({Q_B: {boundary - 1: float("nan"), boundary: float("nan"), 300: float("inf")}})
    errors = one(tiny, "cut", variant(tmp_path, "cut", dtype=dtype, edit_tensors=nan), chunk_bytes=chunk_bytes)["errors"]
    assert len(errors) == 1 and f"{Q_B} = 2 NaN and 1 Inf of 512 values" in errors[0], errors

    def late_non_zero(tensors: dict[str, NDArray[np.float32]]) -> None:
        for key, array in tensors.items():
            if ".lora_B." in key:
                array[...] = -0.0
        tensors[Q_B].reshape(-1)[boundary] = 0.5  # only in the second chunk

    path = variant(tmp_path, "late", dtype=dtype, edit_tensors=late_non_zero)
    assert one(tiny, "late", path, chunk_bytes=chunk_bytes)["errors"] == []


def test_other_dtypes_are_skipped_with_a_warning(tiny: tq.Fixtures, tmp_path: Path) -> None:
    h = tq.HIDDEN
    pair = {k: np.zeros(v.shape, np.int8) for k, v in lora_pair(0, "q_proj", 8, h, h).items()}
    result = one(tiny, "int8", variant(tmp_path, "int8", tensors=pair))
    assert result["errors"] == []  # all-zero lora_B, but unread: not refused
    assert_well_formed("int8", result["warnings"])
    assert result["warnings"] == [
        "adapter 'int8': adapter_model.safetensors tensor dtypes = [\"I8\"]: the values of 2 tensors, e.g. "
        f"{tq.lora_key(0, 'q_proj', 'lora_A')} are not checked for NaN/Inf or all-zero lora_B (only F16, BF16, "
        "F32, F64 are read). Fix: save the adapter as float16, bfloat16 or float32 to have them checked."]


def test_tensor_data_length_must_fit_shape_and_dtype(tiny: tq.Fixtures, tmp_path: Path) -> None:
    path = variant(tmp_path, "short", tensors={})
    header = {"__metadata__": {"format": "pt"},
              Q_B.replace("lora_B", "lora_A"): {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
              Q_B: {"dtype": "F32", "shape": [64, 8], "data_offsets": [2048, 2050]}}
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\1" * 2050)
    errors = one(tiny, "short", path)["errors"]
    assert any(f"adapter_model.safetensors = (unreadable): tensor {Q_B}: 2 bytes of data, but shape [64, 8] "
               "of F32 needs 2048" in e for e in errors), errors


@pytest.mark.parametrize(("code", "numpy_dtype"), [("F16", np.float16), ("F32", np.float32), ("F64", np.float64),
                                                  ("BF16", None)])
def test_counts_agree_with_numpy_on_random_bit_patterns(code: str, numpy_dtype: Any) -> None:
    """Random bits hold every kind of value: normal, subnormal, +-0, +-Inf, NaN payloads."""
    layout = st.FLOAT_LAYOUTS[code]
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=layout.size * 20_000, dtype=np.uint8)
    for index, mask in layout.exponent:  # every 5th: exponent all ones (numpy says what they are)
        raw.reshape(-1, layout.size)[::5, index] |= mask
    data = raw.tobytes()
    values = (np.frombuffer(data, numpy_dtype) if numpy_dtype is not None
              else (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32))
    assert st.count_non_finite(data, layout) == (int(np.isnan(values).sum()), int(np.isinf(values).sum()))
    assert int(np.isnan(values).sum()) > 1000
    zeros = bytes(layout.size * 50)
    signed = bytearray(zeros)
    signed[layout.size - 1::layout.size * 3] = b"\x80" * len(signed[layout.size - 1::layout.size * 3])
    assert not st.has_non_zero(zeros, layout) and not st.has_non_zero(bytes(signed), layout)
    for position in range(layout.size):  # any bit but the sign bit makes a value non-zero
        one_bit = bytearray(signed)
        one_bit[layout.size * 7 + position] |= 0x01 if position < layout.size - 1 else 0x40
        assert st.has_non_zero(bytes(one_bit), layout), position
    tiny_value = bytearray(zeros)
    tiny_value[layout.size * 4] = 0x80  # the lowest byte's top bit: a mantissa (or exponent) bit, not the sign
    assert st.has_non_zero(bytes(tiny_value), layout)


# --- checksums and base config ------------------------------------------------
def manifest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_checksums_match_mismatch_and_missing(tiny: tq.Fixtures, tmp_path: Path) -> None:
    path = tmp_path / "sums"
    shutil.copytree(tiny.adapters["alpha"], path)
    sums = manifest(path)
    assert one(tiny, "sums", path, checksums={"sums": sums})["errors"] == []
    as_records = {rel: {"sha256": sha, "size": 1} for rel, sha in sums.items()}  # vllm_manifest's form
    assert one(tiny, "sums", path, checksums={"sums": as_records})["errors"] == []
    assert one(tiny, "sums", path, checksums={"other": {"x": "0" * 64}})["errors"] == []
    config = path / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_dropout": 0.05', '"lora_dropout": 0.1'))
    errors = one(tiny, "sums", path, checksums={"sums": sums})["errors"]
    actual = hashlib.sha256(config.read_bytes()).hexdigest()
    assert errors == [
        f"adapter 'sums': file adapter_config.json sha256 = {actual}: the checksum manifest expects "
        f"{sums['adapter_config.json']} (changed, truncated or corrupt copy). Fix: copy the adapter again "
        "from its source, or update the manifest if the change is intended."]
    errors = one(tiny, "sums", path, checksums={"sums": {"extra/file.txt": "a" * 64, "../x": "a" * 64,
                                                          "adapter_config.json": "nothex"}})["errors"]
    assert len(errors) == 3
    assert "checksums path = \"../x\": not a path inside the adapter directory" in errors[0]
    assert "checksums adapter_config.json = \"nothex\": not a sha256 hex digest" in errors[1]
    assert "file extra/file.txt = (missing)" in errors[2]
    errors = one(tiny, "sums", path, checksums={"sums": "abc"})["errors"]
    assert errors == ["adapter 'sums': checksums = \"abc\": not a manifest. "
                      "Fix: give {relative path: sha256} for the adapter's files."]


def test_base_config_forms_and_head_dim(tiny: tq.Fixtures, tmp_path: Path) -> None:
    config = json.loads((tiny.model / "config.json").read_text())
    adapters = good(tiny)
    for source in (config, str(tiny.model), str(tiny.model / "config.json")):
        assert va.check_all(adapters, source, max_lora_rank=16, max_loras=3)["errors"] == []
    # An explicit head_dim wins over hidden_size / heads: the k/v shapes no longer fit.
    errors = va.check_all(adapters, {**config, "head_dim": 8}, max_lora_rank=16, max_loras=3)["errors"]
    assert any("needs [16, r] (num_key_value_heads 2 * head_dim 8)" in e for e in errors), errors
    broken = {k: v for k, v in config.items() if k != "hidden_size"}
    errors = va.check_all(adapters, broken, max_lora_rank=16, max_loras=3)["errors"]
    assert errors == ["base model config.json: hidden_size = null is not a positive integer. "
                      "Fix: point base_model_config at the served model's config.json."]
    errors = va.check_all(adapters, str(tmp_path / "none.json"), max_lora_rank=16, max_loras=3)["errors"]
    assert errors[0].startswith(f"base model config {tmp_path / 'none.json'}: No such file or directory")


# --- code constraints ---------------------------------------------------------
@pytest.mark.parametrize("path", [UTILS_PATH, MODULE_PATH, *(UTILS_PATH.parent / f"{name}.py" for name in (
    "vllm_files", "vllm_lora_report", "vllm_lora_rules", "vllm_safetensors", "vllm_peft_config", "vllm_lora_shapes"))])
def test_code_is_python_3_9_and_standard_library_only(path: Path) -> None:
    tree = ast.parse(path.read_text(), feature_version=(3, 9))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    # The collection's own module_utils, each checked here too (standard library only itself).
    siblings = {f"ansible_collections.inference.vllm_lora.plugins.module_utils.{name}"
                for name in ("vllm_files", "vllm_adapters", "vllm_lora_report", "vllm_lora_rules",
                             "vllm_safetensors", "vllm_peft_config", "vllm_lora_shapes")}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.module not in siblings}
    allowed = set(sys.stdlib_module_names) | ({"ansible"} if path == MODULE_PATH else set())
    assert imported <= allowed, imported - allowed
    assert "from __future__ import annotations" in path.read_text()


# --- the Ansible module -------------------------------------------------------
def run_module(args: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """Run main() as Ansible would; returns (exit code, result JSON)."""
    return run_main(mod.main, args, capsys)


def module_args(tiny: tq.Fixtures, adapters: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    args = {"adapters": adapters, "base_model_config": str(tiny.model / "config.json"),
            "base_model_names": [tiny.base_model_name], "served_model_names": SERVED,
            "max_lora_rank": 16, "max_loras": 4}
    args.update(overrides)
    return args


def warning_texts(result: dict[str, Any]) -> list[str]:
    """ansible-core 2.19 modules send warnings as WarningSummary objects (strings before)."""
    texts = []
    for warning in result.get("warnings", []):
        if isinstance(warning, dict):
            warning = (warning.get("event") or warning).get("msg")
        assert isinstance(warning, str), result["warnings"]
        texts.append(warning)
    return texts


def test_module_passes_good_adapters(tiny: tq.Fixtures, capsys: pytest.CaptureFixture[str]) -> None:
    adapters = [{**a, "source": "controller"} for a in good(tiny)]  # extra keys are ignored
    rc, result = run_module(module_args(tiny, adapters), capsys)
    assert rc == 0, result.get("msg")
    assert result["changed"] is False
    assert result["ranks"] == {"alpha": 8, "beta": 16, "gamma": 8}
    assert result["max_lora_rank_effective"] == 16
    assert "warnings" not in result


def test_module_derives_rank_and_shows_warnings(tiny: tq.Fixtures, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((tiny.model / "config.json").read_text())
    rc, result = run_module(module_args(tiny, good(tiny), max_lora_rank=0, max_loras=1,
                                        base_model_config=config, _ansible_check_mode=True), capsys)
    assert rc == 0, result.get("msg")
    assert result["changed"] is False and result["max_lora_rank_effective"] == 16
    assert any(w.startswith("vLLM setting --max-loras (vllm_max_loras) = 1: 3 adapters are declared")
               for w in warning_texts(result)), result.get("warnings")


def test_module_fails_with_every_error_one_per_line(tiny: tq.Fixtures, capsys: pytest.CaptureFixture[str]) -> None:
    adapters = good(tiny) + [{"name": n, "path": str(b.path)} for n, b in sorted(tiny.broken.items())]
    rc, result = run_module(module_args(tiny, adapters, max_cpu_loras=2), capsys)
    assert rc == 1
    assert result["changed"] is False
    lines = result["msg"].split("\n")
    assert lines == result["errors"]
    assert len(lines) == sum(count for count, _ in BROKEN.values()) + 1
    assert lines[-1].startswith("vLLM setting --max-cpu-loras (vllm_max_cpu_loras) = 2: must be >= max_loras 4")
    assert {line.split("'")[1] for line in lines[:-1]} == set(tiny.broken)
    assert result["ranks"]["rank_too_high"] == 64
    assert any(w.startswith("vLLM setting --max-loras") for w in warning_texts(result))


def test_module_base_name_warn_mode_passes(tiny: tq.Fixtures, capsys: pytest.CaptureFixture[str]) -> None:
    adapters = [{"name": "foreign", "path": str(tiny.broken["foreign_base_name"].path)}]
    rc, result = run_module(module_args(tiny, adapters, base_model_mismatch="warn"), capsys)
    assert rc == 0, result.get("msg")
    assert any("base_model_name_or_path = \"Qwen/Qwen2.5-7B-Instruct\"" in w for w in warning_texts(result))
    rc, result = run_module(module_args(tiny, adapters), capsys)
    assert rc == 1 and "base_model_name_or_path" in result["msg"]


def test_module_rejects_bad_options(tiny: tq.Fixtures, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result = run_module(module_args(tiny, good(tiny), base_model_mismatch="ignore"), capsys)
    assert rc == 1 and "base_model_mismatch" in result["msg"]
    rc, result = run_module(module_args(tiny, good(tiny), base_model_config=42), capsys)
    assert rc == 1 and "base_model_config must be a path to config.json or a dict" in result["msg"]


def test_allow_pickle_travels_from_the_declaration_to_the_module(
        tiny: tq.Fixtures, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vllm_lora_adapters -> vllm_artifacts -> vllm_pick_path (as preflight.yml maps them) -> the module."""
    filters = _load("vllm_filters_for_adapter_check", ROOT / "plugins" / "filter" / "vllm.py")
    path = str(pickled_variant(tmp_path, "pickled"))
    model = {"name": "tiny", "source": "controller", "path": str(tiny.model)}
    for declared, rc in (({}, 1), ({"allow_pickle": False}, 1), ({"allow_pickle": True}, 0)):
        adapters = [{"name": "pickled", "source": "controller", "path": path, **declared}]
        artifacts = filters.vllm_artifacts(model, "/srv/models/tiny", adapters, "/srv/adapters")
        picked = [filters.vllm_pick_path(a, "src") for a in artifacts if a["kind"] == "adapter"]
        assert picked == [{"name": "pickled", "path": path, "allow_pickle": bool(declared.get("allow_pickle"))}]
        code, result = run_module(module_args(tiny, picked), capsys)
        assert code == rc, (declared, result.get("msg"))
        if rc == 0:
            assert any("allow_pickle true): accepted without checking its tensors" in w
                       for w in warning_texts(result)), result.get("warnings")
        else:
            assert "set allow_pickle: true on this adapter" in result["msg"]
    host = filters.vllm_artifacts(model, "/m", [{"name": "h", "source": "host", "path": path,
                                                 "allow_pickle": True}], "/a")[1]
    assert filters.vllm_pick_path(host, "dest")["allow_pickle"] is True


# --- vLLM itself ----------------------------------------------------------------
VLLM_LOADER = textwrap.dedent('''
    """vLLM 0.11.0's _load_adapter steps for Qwen2 (worker_manager.py), without an engine."""
    import json, sys
    from vllm.config.lora import LoRAConfig
    from vllm.lora.models import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    EXPECTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoRAConfig(max_lora_rank=int(sys.argv[1]), max_loras=1)
    out = {}
    for name, path in json.loads(sys.argv[2]).items():
        try:
            helper = PEFTHelper.from_local_dir(path, 2048)
            helper.validate_legal(config)
            LoRAModel.from_local_checkpoint(path, EXPECTED, helper, lora_model_id=1, device="cpu",
                                            embedding_modules={}, embedding_padding_modules=[])
            out[name] = None
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(out))
''')


def vllm_python() -> Optional[Path]:
    from tests.vllm_cpu.server import venv_path, venv_ready
    return venv_path() / "bin" / "python" if venv_ready() else None


@pytest.mark.vllm
def test_vllm_loader_agrees(tiny: tq.Fixtures, tmp_path: Path) -> None:
    """Where vLLM's loader refuses, the checker refuses; where it accepts, the checker is stricter on purpose."""
    python = vllm_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM 0.11.0 CPU venv is not ready")
        pytest.skip("vLLM 0.11.0 CPU venv is not ready")
    h = tq.HIDDEN
    extra = {
        "liar": variant(tmp_path, "liar", rank=32, config={"r": 8, "lora_alpha": 16}),
        "smaller": variant(tmp_path, "smaller", tensors={**lora_pair(0, "q_proj", 8, h, h),
                                                         **lora_pair(0, "v_proj", 8, h, 16)}),
        "scaled": variant(tmp_path, "scaled", config={"rank_pattern": {"q_proj": 4}}),
        "unused_target": variant(tmp_path, "unused_target", tensors=lora_pair(0, "q_proj", 8, h, h),
                                 config={"target_modules": ["q_proj", "c_attn"]}),
    }
    paths = {**{n: str(p) for n, p in tiny.adapters.items()},
             **{n: str(b.path) for n, b in tiny.broken.items()}, **{n: str(p) for n, p in extra.items()}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR", HOME=str(tmp_path))
    run = subprocess.run([str(python), "-c", VLLM_LOADER, str(tq.MAX_LORA_RANK), json.dumps(paths)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, run.stderr[-3000:]
    vllm: dict[str, Optional[str]] = json.loads(line[len("RESULT "):])
    ours = {name: one(tiny, name, Path(path))["errors"] for name, path in paths.items()}

    refused_by_vllm = {n for n, e in vllm.items() if e}
    refused_by_us = {n for n, e in ours.items() if e}
    assert refused_by_vllm <= refused_by_us
    # vLLM's loader accepts these; the checker refuses them (see the report in the module's docstring):
    assert refused_by_us - refused_by_vllm == {
        "foreign_base_name",  # name not checked by vLLM: served with wrong output if shapes fit
        "other_base",         # shapes not checked at load: fails when activated
        "liar",               # only r is compared with max_lora_rank: fails when activated
        "smaller",            # zero-padded at activation: wrong output, no error
        "scaled",             # rank_pattern ignored: scaled alpha/r, not as trained
        "unused_target",      # target_modules not checked for safetensors; only tensor names
        "nan_weights",        # loaded and served: garbage output
        "inf_weights",        # the same
        "zero_b",             # loaded and served: the base model's output
    }
    assert set(tiny.adapters) & refused_by_us == set()
    for name, phrase in {"rank_too_high": "LoRA rank 64 is greater than max_lora_rank 16.",
                         "dora": "vLLM does not yet support DoRA.",
                         "modules_to_save": "vLLM only supports modules_to_save being None.",
                         "bias_all": "Adapter bias cannot be used without bias_enabled.",
                         "no_rank": "Missing required configuration fields: {'r'}",
                         "no_weights": "doesn't contain tensors"}.items():
        assert phrase in (vllm[name] or ""), vllm[name]
        assert phrase.rstrip(".") in " ".join(ours[name]), ours[name]
    for name in ("embed_tokens", "unknown_target"):
        assert "expected target modules in" in (vllm[name] or ""), vllm[name]

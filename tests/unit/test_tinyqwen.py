"""The tiny Qwen2 fixtures are what they claim to be, without starting vLLM.

Names and shapes are checked against transformers' Qwen2 layout written out
here independently; a numpy forward pass checks that the good adapters really
change greedy output (so contract tests comparing texts can fail for the right
reason); each broken adapter is checked to have its defect and no other.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.fixtures import tinyqwen as tq

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> tq.Fixtures:
    return tq.make_all(tmp_path_factory.mktemp("tinyqwen"))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# --- the model ----------------------------------------------------------------
def test_model_config_is_qwen2_as_specified(fx: tq.Fixtures) -> None:
    config = read_json(fx.model / "config.json")
    tokenizer = Tokenizer.from_file(str(fx.model / "tokenizer.json"))
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) \
        == (64, 2, 4, 2, 128, 512)
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] >= 2048
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def expected_qwen2_shapes() -> dict[str, list[int]]:
    """transformers' Qwen2ForCausalLM state dict for the config above (tied: no lm_head)."""
    shapes = {"model.embed_tokens.weight": [512, 64], "model.norm.weight": [64]}
    for n in range(2):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": [64], p + "post_attention_layernorm.weight": [64],
            p + "self_attn.q_proj.weight": [64, 64], p + "self_attn.q_proj.bias": [64],
            p + "self_attn.k_proj.weight": [32, 64], p + "self_attn.k_proj.bias": [32],
            p + "self_attn.v_proj.weight": [32, 64], p + "self_attn.v_proj.bias": [32],
            p + "self_attn.o_proj.weight": [64, 64],
            p + "mlp.gate_proj.weight": [128, 64], p + "mlp.up_proj.weight": [128, 64],
            p + "mlp.down_proj.weight": [64, 128],
        }
    return shapes


def test_model_weights_have_transformers_names_shapes_and_bf16(fx: tq.Fixtures) -> None:
    header = tq.safetensors_header(fx.model / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert {name: info["shape"] for name, info in header.items()} == expected_qwen2_shapes()
    assert {info["dtype"] for info in header.values()} == {"BF16"}
    weights = tq.load_safetensors(fx.model / "model.safetensors")
    assert all(np.isfinite(w).all() for w in weights.values())
    assert np.abs(weights["model.layers.0.self_attn.q_proj.weight"]).max() > 0


def test_bf16_rounding_is_round_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 1.00390625, 1.01171875, 3.0e-3], np.float32)
    bits = tq.to_bf16_bits(values)
    # 1 + 2**-8 is halfway between bf16 neighbours 1 and 1 + 2**-7: rounds to even (1.0)
    assert tq.bf16_bits_to_f32(bits)[:4].tolist() == [1.0, -2.5, 1.0, 1.015625]
    assert abs(tq.bf16_bits_to_f32(bits)[4] - 3.0e-3) < 3.0e-3 * 2 ** -8


def test_tokenizer_has_qwen_special_tokens_and_chat_template(fx: tq.Fixtures) -> None:
    tokenizer = Tokenizer.from_file(str(fx.model / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512
    ids = [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert None not in ids and max(ids) < 512
    tconfig = read_json(fx.model / "tokenizer_config.json")
    assert tconfig["eos_token"] == "<|im_end|>"
    assert {int(k): v["content"] for k, v in tconfig["added_tokens_decoder"].items()} == dict(
        zip(ids, ("<|endoftext|>", "<|im_start|>", "<|im_end|>")))
    rendered = jinja2.Environment().from_string(tconfig["chat_template"]).render(
        messages=PROMPT, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    encoded = tokenizer.encode(rendered).ids
    assert encoded.count(ids[1]) == 3 and encoded.count(ids[2]) == 2
    text = "Deployments run on machines, one host at a time: ünïcödé too."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    generation = read_json(fx.model / "generation_config.json")
    assert ids[2] in generation["eos_token_id"]
    assert read_json(fx.model / "vocab.json") == read_json(fx.model / "tokenizer.json")["model"]["vocab"]


# --- a numpy Qwen2 forward pass, for "adapters change the output" --------------
def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    out: np.ndarray = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
    return out


def merged_weights(model: Path, adapter: Path | None) -> dict[str, np.ndarray]:
    """Base weights with W += (alpha / r) * B @ A merged in, as PEFT's merge does."""
    weights = tq.load_safetensors(model / "model.safetensors")
    if adapter is not None:
        config = read_json(adapter / "adapter_config.json")
        lora = tq.load_safetensors(adapter / "adapter_model.safetensors")
        for key, a in lora.items():
            if key.endswith(".lora_A.weight"):
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                weights[target] = weights[target] + config["lora_alpha"] / config["r"] * (b @ a)
    return weights


def greedy(model: Path, adapter: Path | None, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with Qwen2's math (RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head)."""
    config = read_json(model / "config.json")
    w = merged_weights(model, adapter)
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps = hidden // heads, config["rms_norm_eps"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    tokens = list(prompt_ids)
    for _ in range(steps):
        n = len(tokens)
        angles = np.arange(n)[:, None] * inv_freq[None]
        cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))

        def rope(t: np.ndarray) -> np.ndarray:
            rotated = np.concatenate([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1)
            out: np.ndarray = t * cos + rotated * sin
            return out

        x = w["model.embed_tokens.weight"][tokens]
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            q, k, v = (h @ w[p + f"self_attn.{m}_proj.weight"].T + w[p + f"self_attn.{m}_proj.bias"]
                       for m in "qkv")
            q = rope(q.reshape(n, heads, head_dim).transpose(1, 0, 2))
            k = np.repeat(rope(k.reshape(n, kv_heads, head_dim).transpose(1, 0, 2)), heads // kv_heads, 0)
            v = np.repeat(v.reshape(n, kv_heads, head_dim).transpose(1, 0, 2), heads // kv_heads, 0)
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim) + np.triu(np.full((n, n), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            x = x + (probs @ v).transpose(1, 0, 2).reshape(n, hidden) @ w[p + "self_attn.o_proj.weight"].T
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        logits = _rms(x[-1], w["model.norm.weight"], eps) @ w["model.embed_tokens.weight"].T
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt_ids):]


def test_good_adapters_change_greedy_output(fx: tq.Fixtures) -> None:
    tokenizer = Tokenizer.from_file(str(fx.model / "tokenizer.json"))
    template = read_json(fx.model / "tokenizer_config.json")["chat_template"]
    prompt = jinja2.Environment().from_string(template).render(messages=PROMPT, add_generation_prompt=True)
    ids = tokenizer.encode(prompt).ids
    outputs = {name: greedy(fx.model, path, ids, 8)
               for name, path in {"base": None, **fx.adapters}.items()}
    assert len({tuple(out) for out in outputs.values()}) == len(outputs), outputs
    # readable text that does not stop at <|im_end|>: the quiet tokens never win
    eos = tokenizer.token_to_id("<|im_end|>")
    for name, out in outputs.items():
        assert eos not in out, name
        assert tokenizer.decode(out).isprintable(), (name, tokenizer.decode(out))


# --- adapters -------------------------------------------------------------------
def lora_shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
            "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    r = config["r"]
    out = {}
    for layer in range(2):
        for module in config["target_modules"]:
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = dims[module]
            out[f"{key}.lora_A.weight"] = [r, fan_in]
            out[f"{key}.lora_B.weight"] = [fan_out, r]
    return out


@pytest.mark.parametrize("name", sorted(tq.GOOD_ADAPTERS))
def test_good_adapter_is_peft_lora_for_the_base(fx: tq.Fixtures, name: str) -> None:
    path = fx.adapters[name]
    config = read_json(path / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == fx.base_model_name == tq.BASE_MODEL_NAME
    assert (config["bias"], config["use_dora"], config["modules_to_save"], config["fan_in_fan_out"]) \
        == ("none", False, None, False)
    assert 0 < config["r"] <= tq.MAX_LORA_RANK and config["lora_alpha"] > 0
    header = tq.safetensors_header(path / "adapter_model.safetensors")
    header.pop("__metadata__")
    assert {k: v["shape"] for k, v in header.items()} == lora_shapes(config)
    tensors = tq.load_safetensors(path / "adapter_model.safetensors")
    assert all(np.abs(t).max() > 0 for t in tensors.values()), "lora_B must not be zero"


def test_good_adapters_differ_and_one_targets_the_mlp(fx: tq.Fixtures) -> None:
    configs = {name: read_json(path / "adapter_config.json") for name, path in fx.adapters.items()}
    assert {"alpha", "beta"} <= set(configs)
    assert any({"gate_proj", "up_proj", "down_proj"} & set(c["target_modules"]) for c in configs.values())
    digests = {hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).digest()
               for p in fx.adapters.values()}
    assert len(digests) == len(fx.adapters)


def adapter_problems(path: Path, base_model_name: str = tq.BASE_MODEL_NAME) -> set[str]:
    """What a deployer's validation should find wrong with an adapter directory."""
    problems: set[str] = set()
    config = read_json(path / "adapter_config.json")
    if "r" not in config:
        problems.add("missing_r")
    elif config["r"] > tq.MAX_LORA_RANK:
        problems.add("rank")
    if config.get("use_dora"):
        problems.add("dora")
    if config.get("modules_to_save") is not None:
        problems.add("modules_to_save")
    if config.get("bias", "none") != "none":
        problems.add("bias")
    if config.get("base_model_name_or_path") != base_model_name:
        problems.add("base_name")
    targets = set(config.get("target_modules", []))
    if targets & {"embed_tokens", "lm_head"}:
        problems.add("embedding")
    if targets - {"embed_tokens", "lm_head"} - set(tq.BASE_SHAPE.module_dims()):
        problems.add("unknown_target")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        problems.add("pickle" if (path / "adapter_model.bin").is_file() else "no_weights")
        return problems
    if "r" in config and not targets - set(tq.BASE_SHAPE.module_dims()):
        header = tq.safetensors_header(weights)
        expected = lora_shapes(config)
        if any(header.get(k, {}).get("shape") != v for k, v in expected.items()):
            problems.add("shape")
    tensors = {k: v for k, v in tq.load_safetensors(weights).items() if ".lora_" in k}
    if not all(np.isfinite(t).all() for t in tensors.values()):
        problems.add("non_finite")
    if not any(np.any(t != 0) for k, t in tensors.items() if ".lora_B." in k):
        problems.add("zero_b")
    return problems


BROKEN_DEFECTS = {
    "rank_too_high": {"rank"}, "dora": {"dora"}, "modules_to_save": {"modules_to_save"},
    "embed_tokens": {"embedding"}, "other_base": {"shape", "base_name"},
    "foreign_base_name": {"base_name"}, "no_weights": {"no_weights"}, "no_rank": {"missing_r"},
    "bias_all": {"bias"}, "unknown_target": {"unknown_target"},
    "pickle_only": {"pickle"}, "nan_weights": {"non_finite"}, "inf_weights": {"non_finite"}, "zero_b": {"zero_b"},
}


def test_every_broken_adapter_is_checked(fx: tq.Fixtures) -> None:
    assert set(fx.broken) == set(BROKEN_DEFECTS)
    for name in ("rank_too_high", "dora", "modules_to_save", "embed_tokens", "other_base",
                 "no_weights", "no_rank", "bias_all"):
        assert name in fx.broken, f"the brief asks for a {name} adapter"


@pytest.mark.parametrize("name", sorted(tq.GOOD_ADAPTERS))
def test_good_adapters_have_no_problem(fx: tq.Fixtures, name: str) -> None:
    assert adapter_problems(fx.adapters[name]) == set()


@pytest.mark.parametrize("name", sorted(BROKEN_DEFECTS))
def test_broken_adapter_has_exactly_its_defect(fx: tq.Fixtures, name: str) -> None:
    broken = fx.broken[name]
    assert broken.path.is_dir() and broken.reason
    assert adapter_problems(broken.path) == BROKEN_DEFECTS[name]


def test_broken_details(fx: tq.Fixtures) -> None:
    """The defects as the brief words them, read from the files."""
    assert read_json(fx.broken["rank_too_high"].path / "adapter_config.json")["r"] == 64
    assert read_json(fx.broken["dora"].path / "adapter_config.json")["use_dora"] is True
    assert read_json(fx.broken["bias_all"].path / "adapter_config.json")["bias"] == "all"
    other = tq.load_safetensors(fx.broken["other_base"].path / "adapter_model.safetensors")
    assert other["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[1] == 128
    embed = tq.safetensors_header(fx.broken["embed_tokens"].path / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in embed
    raw = (fx.broken["pickle_only"].path / "adapter_model.bin").read_bytes()
    assert not raw.startswith(b"PK")  # not a zip, so not a torch archive
    assert set(pickle.loads(raw)) == set(lora_shapes(read_json(fx.broken["pickle_only"].path / "adapter_config.json")))
    nan = tq.load_safetensors(fx.broken["nan_weights"].path / "adapter_model.safetensors")
    assert {k: int(np.isnan(v).sum()) for k, v in nan.items() if np.isnan(v).any()} == {
        tq.lora_key(0, "q_proj", "lora_B"): 3}
    inf = tq.load_safetensors(fx.broken["inf_weights"].path / "adapter_model.safetensors")
    assert {k: int(np.isposinf(v).sum()) for k, v in inf.items() if not np.isfinite(v).all()} == {
        tq.lora_key(1, "v_proj", "lora_A"): 1}
    zero = tq.load_safetensors(fx.broken["zero_b"].path / "adapter_model.safetensors")
    lora_b = [v for k, v in zero.items() if ".lora_B." in k]
    assert len(lora_b) == 4 and all((v == 0).all() for v in lora_b)
    assert any(np.signbit(v).any() for v in lora_b), "some -0.0, which is zero too"


# --- files ----------------------------------------------------------------------
@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_modes_are_0644_and_0755_even_under_umask_077(tmp_path: Path, strict_umask: None) -> None:
    tq.make_all(tmp_path / "fx")
    paths = list((tmp_path / "fx").rglob("*"))
    assert len(paths) > 30
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_generation_is_deterministic_across_processes(tmp_path: Path, fx: tq.Fixtures) -> None:
    """Same bytes from the CLI in a fresh process (another hash seed) as from make_all."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.tinyqwen", str(tmp_path / "cli")],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)},
    )
    listing = json.loads(out.stdout)
    assert Path(listing["model"]) == tmp_path / "cli" / "model"
    assert set(listing["adapters"]) == set(fx.adapters)
    assert {n: b["reason"] for n, b in listing["broken"].items()} == {n: b.reason for n, b in fx.broken.items()}
    root = fx.model.parent
    assert tree_digest(tmp_path / "cli") == tree_digest(root)

"""Static checks of PEFT LoRA adapters against a base model and vLLM 0.11.0's rules: one adapter
(check_adapter) and all of them with the engine settings (check_all). Each concern is its own
module_util: the safetensors file (vllm_safetensors), the configs (vllm_peft_config), the tensor
names and shapes (vllm_lora_shapes), vLLM's rules (vllm_lora_rules), the report (vllm_lora_report).

Reads ``adapter_config.json``, ``adapter_model.safetensors`` (its header, then the
LoRA tensors' values in bounded chunks, for NaN/Inf and an all-zero lora_B) and
the base model's ``config.json``, so it is fast and safe on the controller
before anything on a host changes. A pickled ``adapter_model.bin``/``.pt`` is
never unpickled. Standard library only, Python 3.9+: this runs on the
controller and on the target hosts.

Every problem is one line that names the adapter, the field, its value, why it
is wrong and the fix. Errors are what vLLM 0.11.0 refuses (at start-up, at a
run-time load, or at the first request) or what would make it serve wrong
output without an error; warnings are worth a look but do not block.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Union

from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files import sha256_file
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_report import (
    AdapterCheckError,
    AdapterReport,
    problem,
    show,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_rules import (
    ALLOWED_MAX_LORA_RANKS,
    SUPPORTED_LORA_MODULES,
    check_engine,
    check_names,
    smallest_rank_that_fits,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_safetensors import (
    DATA_CHUNK_BYTES,
    FLOAT_LAYOUTS,
    TensorValues,
    read_safetensors_index,
    scan_lora_tensors,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_peft_config import (
    BaseModel,
    CONFIG_FILE,
    PICKLE_FILES,
    SAFETENSORS_FILE,
    _check_config,
    _is_int,
    load_base_model,
    normalise_model_name,
)
from ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_lora_shapes import (
    _check_tensors,
    _examples,
    parse_tensor_name,
)


def _check_checksums(report: AdapterReport, path: str, manifest: Any) -> None:
    if not isinstance(manifest, Mapping):
        report.problems.append(problem(report.name, "checksums", show(manifest), "not a manifest",
                                       "give {relative path: sha256} for the adapter's files"))
        return
    for rel in sorted(manifest, key=str):
        entry = manifest[rel]
        want = entry.get("sha256") if isinstance(entry, Mapping) else entry
        norm = os.path.normpath(rel) if isinstance(rel, str) else ""
        if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            report.problems.append(problem(report.name, "checksums path", show(rel),
                                           "not a path inside the adapter directory",
                                           "use paths relative to the adapter directory"))
            continue
        if not isinstance(want, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", want):
            report.problems.append(problem(report.name, f"checksums {rel}", show(entry),
                                           "not a sha256 hex digest", "give the file's sha256 (64 hex digits)"))
            continue
        target = os.path.join(path, norm)
        if not os.path.isfile(target):
            report.problems.append(problem(report.name, f"file {rel}", "(missing)",
                                           "listed in the checksum manifest but not in the adapter directory",
                                           "copy the complete adapter again"))
            continue
        got = sha256_file(target)
        if got != want.lower():
            report.problems.append(problem(
                report.name, f"file {rel} sha256", got,
                f"the checksum manifest expects {want.lower()} (changed, truncated or corrupt copy)",
                "copy the adapter again from its source, or update the manifest if the change is intended"))


def _check_pickle(report: AdapterReport, pickled: str, allow_pickle: bool) -> None:
    """A .bin/.pt without safetensors: vLLM torch.load()s it; only safetensors can be checked."""
    convert = (f"python -c \"import torch; from safetensors.torch import save_file; "
               f"save_file({{k: v.contiguous() for k, v in torch.load('{pickled}', weights_only=True).items()}}, "
               f"'{SAFETENSORS_FILE}')\" in the adapter directory (or PEFT's "
               "save_pretrained(..., safe_serialization=True))")
    if allow_pickle:
        report.warnings.append(problem(
            report.name, pickled, "(present, no safetensors, allow_pickle true)",
            "accepted without checking its tensors (a pickle cannot be read without unpickling it): shapes, "
            "NaN/Inf and all-zero lora_B are not checked, and vLLM 0.11.0 stops at start-up if it is not a "
            "torch archive", f"convert it to safetensors: {convert}"))
        return
    report.problems.append(problem(
        report.name, pickled, "(present, no safetensors)",
        "a pickle: its tensors cannot be checked without unpickling it, and vLLM 0.11.0 reads it with "
        "torch.load(weights_only=True), so a file that is not a torch archive stops start-up",
        f"convert it to safetensors: {convert}; or, only if you trust the file, set allow_pickle: true "
        "on this adapter in vllm_lora_adapters"))


def _bad_values(nan: int, inf: int) -> str:
    return " and ".join(f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "Inf")) if count)


def _check_values(report: AdapterReport, scanned: Mapping[str, TensorValues], skipped: Mapping[str, str]) -> None:
    """NaN/Inf in any LoRA tensor; every lora_B all zeros (an untrained adapter)."""
    name, where = report.name, SAFETENSORS_FILE
    bad = [(tensor, v) for tensor, v in scanned.items() if v.nan or v.inf]
    if bad:
        tensor, first = bad[0]
        more = "" if len(bad) == 1 else (
            f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}: "
            f"{_bad_values(sum(v.nan for _tensor, v in bad), sum(v.inf for _tensor, v in bad))} in all)")
        report.problems.append(problem(
            name, f"{where} {tensor}", f"{_bad_values(first.nan, first.inf)} of {first.elements} values{more}",
            "vLLM 0.11.0 loads NaN/Inf weights without an error and serves garbage for this adapter",
            "retrain or re-export the adapter; the file is corrupt (copy it again if only this copy is)"))
    lora_b = sorted(t for t in scanned if parse_tensor_name(t)[1] == "lora_B")
    unread_b = [t for t in skipped if parse_tensor_name(t)[1] == "lora_B"]
    if lora_b and not unread_b and not any(scanned[t].non_zero for t in lora_b):
        report.problems.append(problem(
            name, f"{where} lora_B values", f"all zero ({_examples(lora_b)})",
            "an untrained adapter (PEFT starts lora_B at zero): vLLM 0.11.0 loads it and it changes nothing, "
            "requests for it get the base model's output",
            "train the adapter, and export it after training (not its initial state)"))
    if skipped:
        report.warnings.append(problem(
            name, f"{where} tensor dtypes", show(sorted(set(skipped.values()))),
            f"the values of {_examples(sorted(skipped))} are not checked for NaN/Inf or all-zero lora_B "
            f"(only {', '.join(FLOAT_LAYOUTS)} are read)",
            "save the adapter as float16, bfloat16 or float32 to have them checked"))


def check_adapter(name: str, path: str, base: Optional[BaseModel] = None, *,
                  supported_modules: Optional[Sequence[str]] = None,
                  max_lora_rank: Optional[int] = None,
                  base_model_names: Sequence[str] = (),
                  base_model_mismatch: str = "error",
                  checksums: Optional[Mapping[str, Any]] = None,
                  allow_pickle: bool = False,
                  check_values: bool = True,
                  chunk_bytes: int = DATA_CHUNK_BYTES) -> AdapterReport:
    """Every rule for one adapter directory (not its name: see :func:`check_names`).

    ``supported_modules`` None: by ``base.architecture`` from
    :data:`SUPPORTED_LORA_MODULES` (unknown architecture: a warning, no module
    check). ``max_lora_rank`` None or 0: the rank is not compared. Empty
    ``base_model_names``: ``base_model_name_or_path`` is not compared.
    ``allow_pickle``: a .bin/.pt without safetensors is accepted (a warning).
    ``check_values`` False: the safetensors header only (for benchmarks), else
    the LoRA tensors' values too, read ``chunk_bytes`` at a time.
    """
    report = AdapterReport(name=name, path=path)
    if supported_modules is None and base is not None:
        supported_modules = SUPPORTED_LORA_MODULES.get(base.architecture or "")
        if supported_modules is None:
            report.warnings.append(problem(
                name, "base model architectures", show(base.architecture),
                "no list of LoRA-capable modules is known for this architecture, so target modules "
                "are not checked", "pass supported_modules"))
    if not os.path.isdir(path):
        report.problems.append(problem(name, "path", show(path), "no such directory",
                                       "point the adapter's path at its directory (with adapter_config.json)"))
        return report
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError as exc:
        report.problems.append(problem(name, CONFIG_FILE, "(unreadable)", f"{exc.strerror or exc}: vLLM "
                                       "cannot load an adapter without it (\"No adapter found\")",
                                       "copy the complete adapter directory"))
        config = None
    except ValueError as exc:
        report.problems.append(problem(name, CONFIG_FILE, "(not JSON)", str(exc),
                                       "copy the adapter again; the file is corrupt"))
        config = None
    if config is not None and not isinstance(config, dict):
        report.problems.append(problem(name, CONFIG_FILE, show(config), "not a JSON object",
                                       "copy the adapter again; the file is corrupt"))
        config = None

    weights: Optional[str] = None
    shapes: Optional[Dict[str, List[int]]] = None
    safetensors = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(safetensors):
        weights = "safetensors"  # vLLM prefers it to a .bin/.pt beside it
        try:
            entries = read_safetensors_index(safetensors)
            shapes = {tensor: entry.shape for tensor, entry in entries.items()}
            if check_values:
                _check_values(report, *scan_lora_tensors(safetensors, entries, chunk_bytes))
        except (OSError, AdapterCheckError) as exc:
            report.problems.append(problem(name, SAFETENSORS_FILE, "(unreadable)", str(exc),
                                           "copy the adapter again from its source"))
    else:
        pickled = next((f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))), None)
        if pickled:
            weights = pickled.rsplit(".", 1)[1]
            _check_pickle(report, pickled, allow_pickle)
        else:
            report.problems.append(problem(
                name, SAFETENSORS_FILE, "(missing)",
                f"no weights file (vLLM: \"{path} doesn't contain tensors\")",
                f"copy {SAFETENSORS_FILE} (or adapter_model.bin/.pt) into the adapter directory"))
    report.weights = weights

    ranks: List[int] = []
    reported: Set[str] = set()
    if config is not None:
        ranks, reported = _check_config(report, config, supported_modules, weights)
        _check_base_name(report, config, base_model_names, base_model_mismatch)
    if shapes is not None:
        ranks.extend(_check_tensors(report, shapes, config or {}, base, supported_modules, reported))
    if ranks:
        report.rank = max(ranks)
        if max_lora_rank:
            _check_rank(report, config or {}, max_lora_rank, ranks)
    if checksums:
        _check_checksums(report, path, checksums)
    return report


def _check_rank(report: AdapterReport, config: Mapping[str, Any], max_lora_rank: int, ranks: List[int]) -> None:
    rank = max(ranks)
    if rank <= max_lora_rank:
        return
    r = config.get("r")
    pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), Mapping) else {}
    if _is_int(r) and r == rank:
        where, value = f"{CONFIG_FILE} r", str(r)
        why = f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank} (vLLM refuses it)"
    elif pattern and rank in pattern.values():
        where, value = f"{CONFIG_FILE} rank_pattern", show(dict(pattern))
        why = (f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank} (vLLM 0.11.0 checks only r "
               "at load, then fails when it activates the adapter)")
    else:
        where, value = f"{SAFETENSORS_FILE} lora_A/lora_B rank", str(rank)
        why = (f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}"
               + ("" if _is_int(r) and r == rank else
                  f" (r says {show(r)}; vLLM 0.11.0 checks only r at load, then fails when it "
                  "activates the adapter)"))
    fits = smallest_rank_that_fits(rank)
    fix = (f"set --max-lora-rank (vllm_max_lora_rank) to {fits} or more, or retrain with r <= {max_lora_rank}"
           if fits else f"retrain with r <= {ALLOWED_MAX_LORA_RANKS[-1]} (vLLM's largest max_lora_rank)")
    report.problems.append(problem(report.name, where, value, why, fix))


def _check_base_name(report: AdapterReport, config: Mapping[str, Any], accepted: Sequence[str],
                     mismatch: str) -> None:
    if not accepted:
        return
    value = config.get("base_model_name_or_path")
    where = f"{CONFIG_FILE} base_model_name_or_path"
    if not isinstance(value, str) or not value.strip():
        report.warnings.append(problem(
            report.name, where, show(value), "the adapter does not say which base model it was trained on, "
            "so that cannot be checked", f"set it to the base model's name (one of {', '.join(accepted)})"))
        return
    if normalise_model_name(value) in {normalise_model_name(n) for n in accepted if n}:
        return
    text = problem(
        report.name, where, show(value),
        f"the adapter was trained on another base model than the one served ({', '.join(accepted)}); "
        "vLLM 0.11.0 does not check this and serves it if the shapes happen to fit, with wrong output",
        "use an adapter trained on the served base model; if it is the same model under another name, "
        "add that name to base_model_names (or set base_model_mismatch: warn)")
    (report.warnings if mismatch == "warn" else report.problems).append(text)


def check_all(adapters: Sequence[Mapping[str, Any]],
              base_model_config: Union[str, Mapping[str, Any], None],
              *,
              base_model_names: Sequence[str] = (),
              served_model_names: Sequence[str] = (),
              max_lora_rank: Optional[int] = 0,
              max_loras: Optional[int] = 1,
              max_cpu_loras: Optional[int] = 0,
              base_model_mismatch: str = "error",
              supported_modules: Optional[Sequence[str]] = None,
              checksums: Optional[Mapping[str, Mapping[str, Any]]] = None,
              check_values: bool = True,
              chunk_bytes: int = DATA_CHUNK_BYTES) -> Dict[str, Any]:
    """Check every adapter ({name, path, allow_pickle}) and the engine settings.

    Returns ``errors`` and ``warnings`` (lists of one-line messages),
    ``max_lora_rank_effective`` (the given value, or derived when 0/None),
    ``ranks`` {name: rank or None} and ``adapters`` (each report as a dict).
    """
    if base_model_mismatch not in ("error", "warn"):
        raise ValueError(f"base_model_mismatch must be 'error' or 'warn', not {base_model_mismatch!r}")
    errors: List[str] = []
    warnings: List[str] = []
    base: Optional[BaseModel] = None
    if base_model_config is None:
        warnings.append("base model config not given: tensor shapes and target modules are not checked "
                        "against the base model")
    else:
        try:
            base = load_base_model(base_model_config)
        except AdapterCheckError as exc:
            errors.append(f"{exc}. Fix: point base_model_config at the served model's config.json.")
    names = [a.get("name") for a in adapters]
    errors.extend(check_names(names, served_model_names))
    reports: List[AdapterReport] = []
    explicit = max_lora_rank if max_lora_rank and max_lora_rank > 0 else None
    for index, adapter in enumerate(adapters):
        name = adapter.get("name") or f"#{index + 1}"
        path = adapter.get("path")
        if not isinstance(path, str) or not path:
            report = AdapterReport(name=str(name), path=str(path))
            report.problems.append(problem(str(name), "path", show(path), "an adapter needs a path",
                                           "give the adapter directory's path"))
        else:
            report = check_adapter(
                str(name), path, base, supported_modules=supported_modules, max_lora_rank=explicit,
                base_model_names=base_model_names, base_model_mismatch=base_model_mismatch,
                checksums=(checksums or {}).get(str(name)), allow_pickle=bool(adapter.get("allow_pickle")),
                check_values=check_values, chunk_bytes=chunk_bytes)
        reports.append(report)
    ranks = [r.rank for r in reports if r.rank is not None]
    engine_errors, engine_warnings, effective = check_engine(
        max_lora_rank, max_loras, max_cpu_loras, len(adapters), ranks)
    if not explicit and effective is None:
        # Derived, and some adapter is above every allowed value: name it.
        for report in reports:
            if report.rank is not None and report.rank > ALLOWED_MAX_LORA_RANKS[-1]:
                report.problems.append(problem(
                    report.name, "rank", str(report.rank),
                    f"above vLLM's largest max_lora_rank {ALLOWED_MAX_LORA_RANKS[-1]}",
                    f"retrain with r <= {ALLOWED_MAX_LORA_RANKS[-1]}"))
    for report in reports:
        errors.extend(report.problems)
        warnings.extend(report.warnings)
    errors.extend(engine_errors)
    warnings.extend(engine_warnings)
    return {
        "errors": errors,
        "warnings": warnings,
        "max_lora_rank_effective": effective,
        "ranks": {r.name: r.rank for r in reports},
        "adapters": [r.as_dict() for r in reports],
    }

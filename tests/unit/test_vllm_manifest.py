"""plugins/modules/vllm_manifest.py: the sha256 manifest of a model or
adapter directory on the controller, as artifacts.yml uses it.

Tested: every regular file is listed with its real sha256 and size (names
starting with '.' skipped at every level: .git, .cache/huggingface); a second
run hashes nothing and rewrites no cache; a changed file is hashed again,
alone; the digest (the release id depends on it) names the content, not the
location; a symlink to the directory shares the real directory's cache; and the
messages for a path that is no directory, or holds no files.

The module runs in-process as Ansible would run it, on real files in tmp_path,
with its cache in tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.unit.loader import load
from tests.unit.modules import run_main

files_util = load("plugins/module_utils/vllm_files.py", "ansible_collections.inference.vllm_lora.plugins.module_utils.vllm_files")  # what the module imports
manifest = load("plugins/modules/vllm_manifest.py")

CONTENT = {
    "config.json": b'{"model_type": "qwen2"}\n',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
}
IGNORED = {
    ".gitattributes": b"*.safetensors filter=lfs\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
    ".cache/huggingface/download/model.safetensors.metadata": b"abc\n",
    "tokenizer/.DS_Store": b"\0\0",
}


def make_dir(root: Path, content: dict[str, bytes]) -> Path:
    for rel, data in content.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "models" / "qwen", {**CONTENT, **IGNORED})


def run(capsys: pytest.CaptureFixture[str], path: Path, cache_dir: Path,
        **args: Any) -> tuple[int, dict[str, Any], int]:
    """(exit code, result, sha256 computations actually done)."""
    with mock.patch.object(files_util, "sha256_file", wraps=files_util.sha256_file) as spy:
        rc, result = run_main(manifest.main, {"path": str(path), "cache_dir": str(cache_dir), **args}, capsys)
    return rc, result, spy.call_count


def cache_files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime)}: a rewrite is a rename, so a new inode even within one clock tick."""
    if not cache_dir.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_dir.iterdir()}


def test_every_file_is_listed_with_its_sha256_and_size_dot_names_skipped(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, result, computed = run(capsys, model, tmp_path / "cache")
    assert rc == 0, result
    assert result["files"] == {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for rel, data in CONTENT.items()
    }
    assert result["bytes"] == sum(len(data) for data in CONTENT.values())
    assert result["hashed"] == computed == len(CONTENT)
    assert result["path"] == str(model) and result["changed"] is False
    assert len(cache_files(tmp_path / "cache")) == 1


def test_a_second_run_hashes_nothing_and_rewrites_no_cache(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    _, first, _ = run(capsys, model, cache)
    written = cache_files(cache)
    rc, again, computed = run(capsys, model, cache)
    assert rc == 0 and computed == 0 and again["hashed"] == 0
    assert again["files"] == first["files"] and again["digest"] == first["digest"]
    assert cache_files(cache) == written


def test_a_changed_file_is_hashed_again_alone(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    _, first, _ = run(capsys, model, cache)
    new_weights = bytes(reversed(CONTENT["model.safetensors"]))  # same size: only the mtime tells
    (model / "model.safetensors").write_bytes(new_weights)
    os.utime(model / "model.safetensors", ns=(1, 1))
    rc, result, computed = run(capsys, model, cache)
    assert rc == 0 and computed == result["hashed"] == 1
    assert result["files"]["model.safetensors"]["sha256"] == hashlib.sha256(new_weights).hexdigest()
    assert result["digest"] != first["digest"]
    # The new hash was cached: the run after hashes nothing.
    assert run(capsys, model, cache)[2] == 0


def test_the_digest_names_the_content_not_the_location(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    copy = tmp_path / "elsewhere" / "qwen-copy"
    shutil.copytree(model, copy)
    shutil.rmtree(copy / ".git")  # and what is skipped does not count
    _, here, _ = run(capsys, model, cache)
    _, there, _ = run(capsys, copy, cache)
    assert there["path"] != here["path"] and there["digest"] == here["digest"]
    (copy / "tokenizer" / "tokenizer.json").rename(copy / "tokenizer" / "tok.json")
    _, renamed, _ = run(capsys, copy, cache)
    assert renamed["bytes"] == here["bytes"] and renamed["digest"] != here["digest"]


def test_a_link_to_the_directory_reports_and_reuses_the_real_directory(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    link = tmp_path / "current-model"
    link.symlink_to(model)
    _, real, _ = run(capsys, model, cache)
    rc, via_link, computed = run(capsys, link, cache)
    assert rc == 0 and via_link["path"] == str(model) and computed == 0
    assert via_link["files"] == real["files"] and len(cache_files(cache)) == 1


def test_a_hugging_face_snapshot_lists_the_blobs_its_links_point_at(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repo = tmp_path / "hub" / "models--Qwen--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for rel, data in CONTENT.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    rc, result, _ = run(capsys, snapshot, tmp_path / "cache")
    assert rc == 0, result
    assert {rel: entry["sha256"] for rel, entry in result["files"].items()} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in CONTENT.items()}


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_path_that_is_no_directory_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "models" / "qwen"
    if kind == "file":
        path.parent.mkdir()
        path.write_text("not a directory")
    rc, result, _ = run(capsys, path, tmp_path / "cache")
    assert rc == 1 and result["failed"] is True
    assert result["msg"] == f"{path} is not a directory on the controller"


def test_a_directory_with_nothing_but_dot_files_holds_no_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = make_dir(tmp_path / "adapters" / "alpha", IGNORED)
    rc, result, _ = run(capsys, empty, tmp_path / "cache")
    assert rc == 1 and result["msg"] == f"{empty} holds no files"
    assert cache_files(tmp_path / "cache") == {}

"""Manifests are hashed once: a second pass over unchanged files hashes nothing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.unit.loader import load

files = load("plugins/module_utils/vllm_files.py")


def test_manifest_hashes_once_and_notices_changes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "sub/b.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache/x").write_text("ignored")
    manifest, cache, hashed = files.build_manifest(str(tmp_path))
    assert hashed == 2 and set(manifest) == {"a.bin", "sub/b.json"}
    assert manifest["a.bin"]["sha256"] == hashlib.sha256(b"a" * 1000).hexdigest()
    again, cache2, hashed2 = files.build_manifest(str(tmp_path), cache)
    assert hashed2 == 0 and again == manifest
    (tmp_path / "a.bin").write_bytes(b"b" * 1000)
    os.utime(tmp_path / "a.bin", ns=(1, 1))
    changed, _, hashed3 = files.build_manifest(str(tmp_path), cache2)
    assert hashed3 == 1 and changed["a.bin"]["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest()
    assert files.manifest_digest(changed) != files.manifest_digest(manifest)


def test_write_json_atomic_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "r.json"
    files.write_json_atomic(str(target), {"x": 1}, mode=0o600)
    assert files.read_json(str(target), None) == {"x": 1}
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]

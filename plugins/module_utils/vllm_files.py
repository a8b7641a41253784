"""File manifests for models and adapters: sha256 computed once, then trusted
while a file's size and mtime stay the same. Standard library only: this runs
on the controller and on the target hosts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, Optional, Tuple

CHUNK = 8 * 1024 * 1024


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def walk_files(root: str) -> Iterator[Tuple[str, os.stat_result]]:
    """(relative path, stat) of every regular file below root, sorted.

    Names starting with '.' are skipped at every level: they are VCS and
    download-tool metadata (.git, .cache/huggingface), not model files.
    """
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            info = os.stat(path)
            if os.path.isfile(path):
                yield os.path.relpath(path, root), info


def manifest_digest(files: Dict[str, Dict[str, Any]]) -> str:
    """One sha256 naming a whole directory's content (names and file hashes)."""
    lines = "".join(f"{rel}\0{files[rel]['sha256']}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_manifest(
    root: str, cache: Optional[Dict[str, Dict[str, Any]]] = None
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]], int]:
    """Manifest of ``root`` reusing ``cache`` entries whose size and mtime match.

    Returns (files {rel: {sha256, size}}, new cache {rel: {sha256, size, mtime_ns}},
    number of files actually hashed).
    """
    cache = cache or {}
    files: Dict[str, Dict[str, Any]] = {}
    new_cache: Dict[str, Dict[str, Any]] = {}
    hashed = 0
    for rel, info in walk_files(root):
        cached = cache.get(rel)
        if cached and cached.get("size") == info.st_size and cached.get("mtime_ns") == info.st_mtime_ns:
            sha = cached["sha256"]
        else:
            sha = sha256_file(os.path.join(root, rel))
            hashed += 1
        files[rel] = {"sha256": sha, "size": info.st_size}
        new_cache[rel] = {"sha256": sha, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    return files, new_cache, hashed


def read_json(path: str, default: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_json_atomic(path: str, data: Any, mode: int = 0o644) -> None:
    """Write then rename, so a reader never sees half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

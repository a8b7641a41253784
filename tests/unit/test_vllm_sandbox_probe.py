"""What the read probe says when the service cannot read an adopted file: the
sandbox or the permissions, on output recorded from a Debian 12 test host
(systemd 252, the unit's sandbox with ProtectHome=tmpfs + BindReadOnlyPaths=)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.loader import load

probe = load("plugins/modules/vllm_sandbox_probe.py")

# Recorded: /home/beelink 0750, models/M/a 0640 beelink:beelink, models/M/link -> ../../blobs/b.
SANDBOXED = [{"path": "/home/beelink/models/M/link", "error": "FileNotFoundError: No such file or directory"},
             {"path": "/home/beelink/models/M/a", "error": "PermissionError: Permission denied"}]
PLAIN = [{"path": "/home/beelink/models/M", "error": "PermissionError: Permission denied"}]


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    """The recorded layout, under tmp_path (root's view outside the sandbox)."""
    model = tmp_path / "home/beelink/models/M"
    model.mkdir(parents=True)
    (tmp_path / "home/beelink/blobs").mkdir()
    (tmp_path / "home/beelink/blobs/b").write_text("x")
    (model / "a").write_text("hi")
    (model / "link").symlink_to("../../blobs/b")
    return tmp_path


def rebase(entries: list[dict[str, str]], root: Path) -> list[dict[str, str]]:
    return [{**entry, "path": str(root) + entry["path"]} for entry in entries]


def test_a_link_out_of_the_bound_folder_is_the_sandbox_a_mode_is_the_permissions(home: Path) -> None:
    sandboxed, plain = rebase(SANDBOXED, home), rebase(PLAIN, home)
    refused = {entry["path"] for entry in plain}
    # The link resolves outside the bound folder: "no such file" in the sandbox, there for root.
    assert probe.hidden_by_sandbox(sandboxed[0], refused) is True
    # Refused outside the sandbox too (its folder is): the permissions.
    assert probe.hidden_by_sandbox(sandboxed[1], refused) is False


def test_readable_outside_the_sandbox_means_the_sandbox(home: Path) -> None:
    entry = {"path": str(home / "home/beelink/models/M/a"), "error": "PermissionError: Permission denied"}
    assert probe.hidden_by_sandbox(entry, set()) is True
    # A sibling folder's refusal is not this file's: prefixes match whole path components.
    assert probe.hidden_by_sandbox(entry, {str(home / "home/beelink/models/MM")}) is True


def test_messages_name_the_path_the_cause_and_the_fix(home: Path) -> None:
    model = str(home / "home/beelink/models/M")
    artifact = {"kind": "model", "name": "Qwen2.5-7B-Instruct-AWQ", "path": model}
    link, mode = rebase(SANDBOXED, home)
    hidden = probe.explain(link, True, artifact, "vllm", "vllm")
    assert hidden.startswith(f"model 'Qwen2.5-7B-Instruct-AWQ': {model}/link (")
    assert "a symlink to " + os.path.realpath(f"{model}/link") in hidden
    assert "the unit's sandbox hides it" in hidden and "Fix:" in hidden and "cp -rL" in hidden
    denied = probe.explain(mode, False, artifact, "vllm", "vllm")
    assert "file permissions deny it" in denied and f"setfacl -R -m u:vllm:rX {model}" in denied
    assert f"chgrp -R vllm {model}" in denied and "PermissionError: Permission denied" in denied


def test_a_failure_is_reported_against_the_folder_that_holds_it(home: Path) -> None:
    artifacts = [{"kind": "model", "name": "m", "path": str(home / "home/beelink/models/M")},
                 {"kind": "adapter", "name": "sql", "path": str(home / "home/beelink/models/M2")}]
    assert probe.owner_of(str(home / "home/beelink/models/M2/x"), artifacts)["name"] == "sql"
    assert probe.owner_of(str(home / "home/beelink/models/M/x"), artifacts)["name"] == "m"

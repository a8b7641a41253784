"""plugins/modules/vllm_service_freshness.py: is the running vLLM older than
what it reads (unit, socket unit, environment file, `current` release)?

service.yml restarts the service when ``stale`` is true, so a run killed after
a change but before its restart handler is repaired by the next run. Tested:
the start time read from systemd (recorded ``systemctl show`` outputs of
systemd 252, tests/unit/data/systemd/) agrees with systemd's own wall clock; a
stopped or unknown unit is never stale; a file changed after the start makes it
stale, a restart makes it current again; the one-second slack; the applied-live
marker; symlinks judged by their own mtime; missing paths; check mode.

Only the boundary is replaced: the `systemctl` call answers with the recorded
output and the clocks read what they read in the recording container. The
files are real files in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from tests.unit.loader import load
from tests.unit.modules import run_main

freshness = load("plugins/modules/vllm_service_freshness.py")

DATA = Path(__file__).parent / "data" / "systemd"
PREFIX = "vllm_service_freshness-"
SHOW_ARGV = ["systemctl", "show", "vllm", "-p", "MainPID,ExecMainStartTimestampMonotonic"]


class Recorded:
    """`systemctl show` and the clocks as they were in the recording container."""

    def __init__(self, recording: str, clock: str | None = None) -> None:
        self.stdout = (DATA / f"{PREFIX}{recording}.show.txt").read_text()
        self.clock: dict[str, float] = json.loads((DATA / f"{PREFIX}{clock or recording}.clock.json").read_text())
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], **_kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout=self.stdout, stderr="")

    def monotonic(self, clock_id: int) -> float:
        assert clock_id == freshness.time.CLOCK_MONOTONIC, clock_id
        return self.clock["monotonic"]

    def patches(self) -> Any:
        """Replace the module's subprocess and time with this recording."""
        fake_time = SimpleNamespace(time=lambda: self.clock["time"], clock_gettime=self.monotonic,
                                    CLOCK_MONOTONIC=freshness.time.CLOCK_MONOTONIC)
        return mock.patch.multiple(freshness, subprocess=SimpleNamespace(run=self.run), time=fake_time)


def systemd_start(recording: str) -> float:
    """The start as systemd itself prints it (ExecMainStartTimestamp, microseconds, UTC)."""
    line = (DATA / f"{PREFIX}{recording}.wallclock.txt").read_text().strip()
    stamp = line.split("=", 1)[1]
    return datetime.strptime(stamp, "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=timezone.utc).timestamp()


ENV_CHANGED = float((DATA / f"{PREFIX}env-changed.mtime.txt").read_text())


def config_files(tmp_path: Path, mtime: float) -> list[str]:
    """What service.yml passes: unit, socket unit, env file, `current` link; all last changed at mtime."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    releases = tmp_path / "opt-vllm" / "releases" / "0123456789ab"
    releases.mkdir(parents=True, exist_ok=True)
    paths = [etc / "vllm.service", etc / "vllm-proxy.socket", etc / "vllm.env"]
    for path in paths:
        path.write_text(f"{path.name}\n")
    current = tmp_path / "opt-vllm" / "current"
    current.symlink_to("releases/0123456789ab")
    paths.append(current)
    for path in [*paths, releases]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return [str(path) for path in paths]


def set_mtime(path: str | Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def run(capsys: pytest.CaptureFixture[str], recorded: Recorded, paths: list[str],
        **args: Any) -> dict[str, Any]:
    with recorded.patches():
        rc, result = run_main(freshness.main, {"service": "vllm", "paths": paths, **args}, capsys)
    assert rc == 0, result
    assert recorded.calls == [SHOW_ARGV]  # the command the recordings were made with
    assert result["changed"] is False  # read-only: service.yml decides with changed_when
    return result


@pytest.mark.parametrize("recording, wallclock", [
    ("running", "running"),
    ("env-changed", "running"),  # the same process, asked 3 s later
    ("restarted", "restarted"),
])
def test_the_start_time_agrees_with_systemds_own_wall_clock(recording: str, wallclock: str) -> None:
    recorded = Recorded(recording)
    with recorded.patches():
        started = freshness.main_start_epoch("vllm")
    assert started is not None
    assert started == pytest.approx(systemd_start(wallclock), abs=0.001)
    assert recorded.calls == [SHOW_ARGV]


@pytest.mark.parametrize("recording", ["stopped", "not-found"])
def test_a_stopped_or_unknown_service_is_never_stale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recording: str) -> None:
    recorded = Recorded(recording, "env-changed")
    with recorded.patches():
        assert freshness.main_start_epoch("vllm") is None
    # Every file changed "now": a running service would be stale; a stopped one is started, not restarted.
    paths = config_files(tmp_path, recorded.clock["time"])
    set_mtime(paths[2], recorded.clock["time"] + 10)
    recorded.calls.clear()
    result = run(capsys, recorded, paths)
    assert result["stale"] is False and result["msg"] == "the service does not run"
    assert result["newest"] == paths[2]


@pytest.mark.parametrize("recording, stale, msg", [
    # The recorded sequence: vllm started, then vllm.env rewritten (a run killed before its restart) ...
    ("env-changed", True, "{env} changed after the service started"),
    # ... and after the restart the same files are current.
    ("restarted", False, "the service is current"),
])
def test_a_file_changed_after_the_start_makes_the_service_stale_until_it_restarts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recording: str, stale: bool, msg: str) -> None:
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    set_mtime(paths[2], ENV_CHANGED)
    result = run(capsys, Recorded(recording), paths)
    assert result["stale"] is stale and result["newest"] == paths[2]
    assert result["msg"] == msg.format(env=paths[2])


@pytest.mark.parametrize("after_start, stale", [(-5.0, False), (0.5, False), (1.5, True), (60.0, True)])
def test_one_second_of_slack_between_clocks_and_file_systems(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], after_start: float, stale: bool) -> None:
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    set_mtime(paths[0], start + after_start)
    result = run(capsys, Recorded("running"), paths)
    assert result["stale"] is stale and result["newest"] == paths[0]


@pytest.mark.parametrize("marker_after_change, stale", [(2.0, False), (-2.0, True), (None, True)])
def test_a_change_applied_live_counts_as_a_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], marker_after_change: float | None, stale: bool) -> None:
    """vllm_adapters_live touches the marker after loading adapters live: a file
    older than that is served; a file newer is not (no marker: the start decides)."""
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    set_mtime(paths[2], ENV_CHANGED)
    marker = tmp_path / "var-lib-vllm-deploy" / "applied-live"
    if marker_after_change is not None:
        marker.parent.mkdir()
        marker.write_text("")
        set_mtime(marker, ENV_CHANGED + marker_after_change)
    result = run(capsys, Recorded("env-changed"), paths, applied_marker=str(marker))
    assert result["stale"] is stale and result["newest"] == paths[2]


def test_the_current_link_counts_by_its_own_mtime_not_its_targets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vllm_release activates a release by replacing the `current` symlink."""
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    current, target = paths[3], os.path.realpath(paths[3])
    # Repointed after the start, at a release directory made long before: stale.
    set_mtime(target, start - 7200)
    set_mtime(current, start + 30)
    result = run(capsys, Recorded("running"), paths)
    assert result["stale"] is True and result["newest"] == current
    # The link untouched since before the start, something inside the release changed: not the link's business.
    set_mtime(current, start - 3600)
    set_mtime(target, start + 30)
    assert run(capsys, Recorded("running"), paths)["stale"] is False


def test_paths_that_do_not_exist_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A release made before the socket units has no vllm-proxy.socket."""
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    os.unlink(paths[1])
    set_mtime(paths[0], start + 30)
    result = run(capsys, Recorded("running"), paths)
    assert result["stale"] is True and result["newest"] == paths[0]
    result = run(capsys, Recorded("running"), [paths[1], str(tmp_path / "nothing")])
    assert result["stale"] is False and result["newest"] == ""


def test_check_mode_reports_the_pending_restart_and_touches_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    set_mtime(paths[2], ENV_CHANGED)
    before = {path: os.lstat(path).st_mtime_ns for path in paths}
    result = run(capsys, Recorded("env-changed"), paths, _ansible_check_mode=True)
    assert result["stale"] is True and result["newest"] == paths[2]
    assert {path: os.lstat(path).st_mtime_ns for path in paths} == before


# --- expected content (service.yml: the unit files as rendered on the controller, by sha256) -----------

def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("recording", ["running", "stopped"])
def test_files_whose_content_is_not_the_expected_one_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recording: str) -> None:
    """In the same call as the freshness check, also when the service does not run (a first install, a
    stopped unit): a file edited by hand, a missing one and an unreadable path differ; mtimes do not count."""
    start = systemd_start("running")
    paths = config_files(tmp_path, start - 3600)
    unit, socket_unit = paths[0], paths[1]
    Path(unit).write_text("[Service]\nExecStart=/bin/true\n")
    Path(socket_unit).write_text("[Socket]\nListenStream=8000\n")
    set_mtime(unit, start - 3600)
    missing = str(tmp_path / "etc" / "vllm-proxy.service")
    expected = {unit: sha256("[Service]\nExecStart=/bin/true\n"), socket_unit: sha256("[Socket]\nListenStream=8000\n"),
                missing: sha256("[Service]\n"), str(tmp_path / "etc"): sha256("")}
    result = run(capsys, Recorded(recording, "running"), paths, expected=expected)
    assert result["differs"] == sorted([missing, str(tmp_path / "etc")])
    # One byte changed (a trailing newline removed), same size class and an old mtime: it differs.
    Path(socket_unit).write_text("[Socket]\nListenStream=8000")
    set_mtime(socket_unit, start - 3600)
    result = run(capsys, Recorded(recording, "running"), paths, expected={unit: expected[unit], socket_unit: expected[socket_unit]})
    assert result["differs"] == [socket_unit] and result["stale"] is False


def test_without_expected_content_nothing_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = config_files(tmp_path, systemd_start("running") - 3600)
    assert run(capsys, Recorded("running"), paths)["differs"] == []

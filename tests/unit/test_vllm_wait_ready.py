"""plugins/modules/vllm_wait_ready.py: one slice of the wait for vLLM's /health.

What roles/vllm/tasks/verify.yml relies on: ready once /health answers 200 while
the service's socket unit holds the API port (an answer without it is another
process's, a crash); a unit that failed, stopped or restarted since the baseline
ends the wait at once with its journal; otherwise the slice is waited out and
`elapsed` (seconds since the unit became active) grows, and the slice that
reaches the bound attaches the journal and names vllm_health_timeout. It never
changes anything, in check mode neither, unless asked to restart the unit first
(restart.yml: one call from the old process's stop to the new one's answer).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional
from unittest import mock

import pytest

from tests.unit.loader import load
from tests.unit.local_http import LocalServer, refused_url
from tests.unit.modules import run_main

wait_ready = load("plugins/modules/vllm_wait_ready.py", "vllm_wait_ready")
SOCKET = "vllm-proxy.socket"


@pytest.mark.parametrize("state", [
    {"LoadState": "loaded", "ActiveState": "active", "SubState": "listening", "Result": "success"},
    {"LoadState": "loaded", "ActiveState": "active", "SubState": "running", "Result": "success"},
    # A release made before the socket units: vLLM listens itself.
    {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead", "Result": "success"},
])
def test_the_services_own_socket_is_no_problem(state: dict[str, str]) -> None:
    assert wait_ready.socket_problem(SOCKET, state) == ""


@pytest.mark.parametrize("state", [
    # Seen on a test host when another process held 0.0.0.0:8000: the bind failed, the service ran anyway.
    {"LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "Result": "resources"},
    {"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "success"},
])
def test_an_answer_without_the_services_socket_is_someone_elses(state: dict[str, str]) -> None:
    problem = wait_ready.socket_problem(SOCKET, state)
    assert f"{SOCKET} is {state['ActiveState']}/{state['SubState']}" in problem
    assert f"result {state['Result']}" in problem and "another process holds the port" in problem


# --- the whole module, as verify.yml runs it -------------------------------------------
# /health is a real HTTP server on 127.0.0.1 (or a port nothing listens on); systemctl and
# journalctl answer with outputs recorded on systemd 252 (tests/unit/data/systemd/README.md);
# the clock is a fake one, so a slice of 15 s takes no time.

SYSTEMD = Path(__file__).resolve().parent / "data" / "systemd"
PROPERTIES = "LoadState,ActiveState,SubState,NRestarts,ActiveEnterTimestampMonotonic,Result"
# CLOCK_MONOTONIC in the recording container right after `vllm_wait_ready-loading.show.txt`.
LOADING_CLOCK = float((SYSTEMD / "vllm_wait_ready-loading.monotonic.txt").read_text())


def recorded(name: str) -> str:
    return (SYSTEMD / f"vllm_wait_ready-{name}").read_text()


class Host:
    """The module's command runner: systemctl show and journalctl, answered from recordings."""

    def __init__(self, shows: dict[str, list[str]], journals: dict[str, str],
                 restart: Optional[subprocess.CompletedProcess[str]] = None) -> None:
        self.shows = {unit: list(names) for unit, names in shows.items()}  # one per look, the last repeats
        self.journals = journals
        self.restart = restart
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], capture_output: bool, text: bool, check: bool) -> subprocess.CompletedProcess[str]:
        assert capture_output and text and not check
        self.calls.append(argv)
        if argv[:2] == ["systemctl", "restart"]:
            assert self.restart is not None, "restarted without being asked to"
            return self.restart
        if argv[:2] == ["systemctl", "show"]:
            assert argv[3:] == ["-p", PROPERTIES], argv  # the command the recordings were made with
            names = self.shows[argv[2]]
            return subprocess.CompletedProcess(argv, 0, recorded(names.pop(0) if len(names) > 1 else names[0]), "")
        assert argv[:2] == ["journalctl", "-u"] and argv[3:] == ["-n", "25", "--no-pager", "-o", "cat"], argv
        return subprocess.CompletedProcess(argv, 0, recorded(self.journals[argv[2]]), "")

    def journal_asked(self) -> list[str]:
        return [argv[2] for argv in self.calls if argv[0] == "journalctl"]


class Clock:
    """The module's `time`: one monotonic clock (systemd's CLOCK_MONOTONIC too); sleep advances it."""

    CLOCK_MONOTONIC = time.CLOCK_MONOTONIC

    def __init__(self, start: float) -> None:
        self.start, self.offset = start, 0.0  # sums of the polls (0.25) stay exact
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.start + self.offset

    def time(self) -> float:  # the epoch clock, for ready_at
        return 1_700_000_000.0 + self.offset

    def clock_gettime(self, clock: int) -> float:
        assert clock == time.CLOCK_MONOTONIC
        return self.start + self.offset

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += seconds


def wait(capsys: pytest.CaptureFixture[str], host: Host, url: str, clock: Optional[Clock] = None,
         **args: Any) -> tuple[int, dict[str, Any], Clock]:
    """main() as verify.yml calls it (one slice); (exit code, result JSON, the clock after)."""
    clock = clock or Clock(LOADING_CLOCK)
    args = {"url": url, "service": "vllm", "socket": SOCKET, "slice": 15, "bound": 900, **args}
    with mock.patch.object(wait_ready, "time", clock), \
            mock.patch.object(wait_ready, "subprocess", SimpleNamespace(run=host.run)):
        rc, result = run_main(wait_ready.main, args, capsys)
    assert result["changed"] is bool(args.get("restart")), result  # it only looks, unless it restarts
    return rc, result, clock


def health_server(status: int) -> LocalServer:
    """/health answering with status and, as vLLM's, an empty body."""
    return LocalServer(lambda request: (status, b"") if request.path == "/health" else (404, b""))


@pytest.fixture()
def health() -> Iterator[LocalServer]:
    with health_server(200) as server:
        yield server


def loading(socket: str = "socket-listening.show.txt") -> Host:
    """vllm loading (active/running, no restart), its socket unit as given."""
    return Host({"vllm": ["loading.show.txt"], SOCKET: [socket]},
                {"vllm": "restarted.journal.txt", SOCKET: "socket-port-taken.journal.txt"})


@pytest.mark.parametrize("check_mode", [False, True])
def test_ready_when_health_answers_and_the_socket_holds_the_port(
        health: LocalServer, capsys: pytest.CaptureFixture[str], check_mode: bool) -> None:
    host = loading()
    rc, result, clock = wait(capsys, host, health.url, _ansible_check_mode=check_mode)
    assert rc == 0, result
    assert (result["ready"], result["crashed"]) == (True, False)
    # The recording was taken 3 s after the start (ActiveEnterTimestampMonotonic vs the clock).
    assert result["elapsed"] == 3.0
    assert result["msg"] == "vllm ready, 3s after it started"
    assert [r.path for r in health.seen] == ["/health"] and clock.slept == []
    assert host.journal_asked() == []


def test_an_answer_while_the_socket_failed_comes_from_another_process(
        health: LocalServer, capsys: pytest.CaptureFixture[str]) -> None:
    host = loading("socket-port-taken.show.txt")
    rc, result, clock = wait(capsys, host, health.url)
    assert rc == 0
    assert (result["ready"], result["crashed"]) == (False, True)  # verify.yml stops waiting and fails
    assert result["msg"] == (
        f"vllm: the API port answered, but {SOCKET} is failed/failed (result resources): another process"
        " holds the port. Find it with `ss -ltnp`, stop it, and run the play again; its journal:\n"
        + recorded("socket-port-taken.journal.txt"))
    assert "Address already in use" in result["msg"]
    assert host.journal_asked() == [SOCKET] and clock.slept == []


@pytest.mark.parametrize("socket, asked", [
    (SOCKET, ["vllm", SOCKET]),  # a release made before the socket units: vLLM listens itself
    ("", ["vllm"]),              # no socket to check: the socket is not asked about
], ids=["socket-not-found", "no-socket"])
def test_without_the_socket_unit_the_answer_counts(
        health: LocalServer, capsys: pytest.CaptureFixture[str], socket: str, asked: list[str]) -> None:
    host = loading("socket-not-found.show.txt")
    rc, result, _ = wait(capsys, host, health.url, socket=socket)
    assert rc == 0 and result["ready"] is True and result["crashed"] is False, result
    assert [argv[2] for argv in host.calls] == asked


def test_a_restart_since_the_baseline_ends_the_wait_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    host = Host({"vllm": ["restarted.show.txt"]}, {"vllm": "restarted.journal.txt"})
    rc, result, clock = wait(capsys, host, refused_url(), restarts_baseline=0)
    assert rc == 0
    assert (result["ready"], result["crashed"]) == (False, True)
    assert result["msg"] == ("vllm stopped while loading (state active/running, result success, restarts 0->1);"
                             " last journal lines:\n" + recorded("restarted.journal.txt"))
    assert clock.slept == [] and host.journal_asked() == ["vllm"]


def test_restarts_counted_before_the_wait_are_no_crash(capsys: pytest.CaptureFixture[str]) -> None:
    """verify.yml passes the NRestarts it read before (a maintenance run without a restart of its own)."""
    host = Host({"vllm": ["restarted.show.txt"]}, {})
    rc, result, _ = wait(capsys, host, refused_url(), restarts_baseline=1, slice=1)
    assert rc == 0 and (result["ready"], result["crashed"]) == (False, False), result


@pytest.mark.parametrize("show, journal, state", [
    ("start-limit-hit", "start-limit-hit", "state failed/failed, result exit-code, restarts 0->5"),
    ("stopped", "restarted", "state inactive/dead, result success, restarts 0->0"),
])
def test_a_failed_or_stopped_unit_ends_the_wait_at_once(
        capsys: pytest.CaptureFixture[str], show: str, journal: str, state: str) -> None:
    host = Host({"vllm": [f"{show}.show.txt"]}, {"vllm": f"{journal}.journal.txt"})
    rc, result, clock = wait(capsys, host, refused_url())
    assert rc == 0 and (result["ready"], result["crashed"]) == (False, True)
    assert result["msg"] == (f"vllm stopped while loading ({state}); last journal lines:\n"
                             + recorded(f"{journal}.journal.txt"))
    assert clock.slept == []


def test_an_automatic_restart_is_waited_for_and_the_restart_is_a_crash(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Between the crash and the restart (RestartSec=10) the unit is activating with the old count."""
    host = Host({"vllm": ["auto-restart.show.txt", "auto-restart.show.txt", "restarted.show.txt"]},
                {"vllm": "restarted.journal.txt"})
    rc, result, clock = wait(capsys, host, refused_url())
    assert rc == 0 and result["crashed"] is True, result
    assert "restarts 0->1" in result["msg"]
    assert clock.slept == [0.25, 0.25]


@pytest.mark.parametrize("status", [503, None], ids=["engine-dead-503", "refused"])
def test_a_slice_without_an_answer_waits_it_out_and_names_the_last_status(
        capsys: pytest.CaptureFixture[str], status: Optional[int]) -> None:
    host = loading()
    with health_server(status or 200) as server:
        url = server.url if status else refused_url()
        rc, result, clock = wait(capsys, host, url)
    assert rc == 0
    assert (result["ready"], result["crashed"]) == (False, False)
    # Polled every 0.25 s until the slice's 15 s were over, then no later.
    assert clock.offset == 15.0 and set(clock.slept) == {0.25}
    assert len(host.calls) == 61
    assert result["elapsed"] == 18.0  # 3 s loading when the slice began, + 15
    assert result["msg"] == (f"vllm: {url}/health not ready 18s after the service started (bound 900s, "
                             f"last status {status or 'connection refused'})")
    assert host.journal_asked() == []


@pytest.mark.parametrize("bound, final", [(18, True), (19, False)])
def test_the_slice_that_reaches_the_bound_attaches_the_journal_and_names_the_setting(
        capsys: pytest.CaptureFixture[str], bound: int, final: bool) -> None:
    """verify.yml stops retrying once elapsed >= vllm_health_timeout: that answer must explain."""
    rc, result, _ = wait(capsys, loading(), refused_url(), bound=bound)
    assert rc == 0 and result["elapsed"] == 18.0 and result["ready"] is False
    hint = ". Raise vllm_health_timeout if the model needs longer to load; last journal lines:\n"
    if final:
        assert result["msg"].endswith(f"(bound {bound}s, last status connection refused)" + hint
                                      + recorded("restarted.journal.txt"))
    else:
        assert result["msg"].endswith(f"(bound {bound}s, last status connection refused)")


# --- restart: true (restart.yml), the restart and the first slice in one call --------------------

RESTARTED = subprocess.CompletedProcess(["systemctl", "restart", "vllm.service"], 0, "", "")


def test_a_restart_then_the_wait_in_one_call_times_both_on_the_host(
        health: LocalServer, capsys: pytest.CaptureFixture[str]) -> None:
    host = Host({"vllm": ["loading.show.txt"], SOCKET: ["socket-listening.show.txt"]}, {}, restart=RESTARTED)
    clock = Clock(LOADING_CLOCK)
    clock.offset = 0.5  # the epoch clock reads 1_700_000_000.5 at the answer
    rc, result, _ = wait(capsys, host, health.url, clock=clock, restart=True)
    assert rc == 0 and result["ready"] is True, result
    assert host.calls[0] == ["systemctl", "restart", "vllm.service"]  # before the first look
    assert [argv[:2] for argv in host.calls[1:]] == [["systemctl", "show"]] * 2
    assert result["ready_at"] == 1_700_000_000.5
    assert result["restarted_monotonic"] == result["ready_monotonic"] == LOADING_CLOCK + 0.5


def test_a_restart_that_answers_after_some_polls_times_the_whole_wait(capsys: pytest.CaptureFixture[str]) -> None:
    """The start-up outlasting a few polls: ready_monotonic - restarted_monotonic is the time out of service."""
    with health_server(200) as server:
        answers = iter([0, 0, 0, 200])
        host = Host({"vllm": ["loading.show.txt"], SOCKET: ["socket-listening.show.txt"]}, {}, restart=RESTARTED)
        with mock.patch.object(wait_ready, "health", lambda url: next(answers)):
            rc, result, clock = wait(capsys, host, server.url, restart=True, poll=0.1)
    assert rc == 0 and result["ready"] is True, result
    assert clock.slept == [0.1, 0.1, 0.1]
    assert round(result["ready_monotonic"] - result["restarted_monotonic"], 6) == 0.3


def test_after_its_own_restart_any_restart_count_is_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline given is ignored: systemd reset the count with this restart, so 1 is a crash."""
    host = Host({"vllm": ["restarted.show.txt"]}, {"vllm": "restarted.journal.txt"}, restart=RESTARTED)
    rc, result, clock = wait(capsys, host, refused_url(), restart=True, restarts_baseline=1)
    assert rc == 0 and (result["ready"], result["crashed"]) == (False, True), result
    assert "restarts 0->1" in result["msg"] and "restarted_monotonic" in result and "ready_at" not in result


def test_a_restart_systemctl_refuses_fails_with_its_words(capsys: pytest.CaptureFixture[str]) -> None:
    refused = subprocess.CompletedProcess(["systemctl"], 5, "", "Failed to restart vllm.service: Unit vllm.service not found.\n")
    host = Host({"vllm": ["stopped.show.txt"]}, {"vllm": "restarted.journal.txt"}, restart=refused)
    rc, result, _ = wait(capsys, host, refused_url(), restart=True)
    assert rc == 1 and result["failed"] is True
    assert result["msg"].startswith("systemctl restart vllm.service failed (5): Failed to restart vllm.service:"
                                    " Unit vllm.service not found.; last journal lines:\n")
    assert [argv[:2] for argv in host.calls] == [["systemctl", "restart"], ["journalctl", "-u"]]


def test_check_mode_does_not_restart(capsys: pytest.CaptureFixture[str]) -> None:
    host = Host({}, {})  # no restart result: a restart would fail the test
    rc, result, _ = wait(capsys, host, refused_url(), restart=True, _ansible_check_mode=True)
    assert rc == 0 and result["ready"] is False and host.calls == []

"""Unit tests for plugins/modules/vllm_haproxy_server.py.

`show stat` answers are real: recorded from HAProxy 2.6.12 (Debian 12) with
three servers (tests/unit/data/haproxy/README.md). The drain sequence runs
against a scripted runtime API that answers with those recordings (a server's
status and session count changed per step) and logs every command it gets.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.loader import load

DATA = Path(__file__).resolve().parent / "data" / "haproxy"
hs = load("plugins/modules/vllm_haproxy_server.py")


def recorded(name: str) -> str:
    return (DATA / f"show-stat-{name}.csv").read_text()


def with_server(text: str, server: str, status: str, sessions: int) -> str:
    """The recorded CSV with one server's status and scur changed (all other fields as HAProxy wrote them)."""
    lines = text.splitlines()
    header = lines[0][2:].split(",")
    out = [lines[0]]
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) > 1 and fields[1] == server:
            fields[header.index("status")] = status
            fields[header.index("scur")] = str(sessions)
        out.append(",".join(fields))
    return "\n".join(out) + "\n"


class ScriptedApi:
    """Answers `show stat` with the given texts in turn (the last one repeats); `set` commands are logged."""

    def __init__(self, stats: list[str], refuse: str = "") -> None:
        self.stats, self.refuse, self.commands = list(stats), refuse, []

    def __call__(self, command: str) -> str:
        if command == "show stat":
            return self.stats.pop(0) if len(self.stats) > 1 else self.stats[0]
        self.commands.append(command)
        return self.refuse


class Clock:
    """A monotonic clock that ticks once per reading and notes its reading after each command the API got."""

    def __init__(self, api: ScriptedApi) -> None:
        self.api, self.now = api, 100.0
        self.at: dict[str, float] = {}
        self.first: float | None = None

    def __call__(self) -> float:
        self.now += 1.0
        if self.first is None:
            self.first = self.now
        for command in self.api.commands:
            self.at.setdefault(command, self.now)
        return self.now


def test_real_show_stat_is_parsed_by_field_name() -> None:
    rows = hs.parse_stat(recorded("drain-maint"))
    servers = {r["svname"]: (r["status"], r["scur"]) for r in rows if r["pxname"] == "vllm"}
    assert servers == {"gpu1": ("UP", "0"), "gpu2": ("DRAIN", "0"), "gpu3": ("MAINT", "0"), "BACKEND": ("UP", "0")}
    busy = hs.server_row(hs.parse_stat(recorded("draining-busy")), "vllm", "gpu1")
    assert (busy["status"], busy["scur"]) == ("DRAIN", "1")


def test_an_answer_that_is_not_stats_is_refused() -> None:
    with pytest.raises(hs.HaproxyError, match="unexpected answer to 'show stat'"):
        hs.parse_stat("Permission denied\n")


@pytest.mark.parametrize(("status", "ready", "drain", "maint"), [
    ("UP", True, False, False),
    ("UP 1/2", True, False, False),  # seen right after maint -> ready
    ("DOWN", True, False, False),
    ("no check", True, False, False),
    ("DRAIN", False, True, False),
    ("MAINT", False, False, True),
    ("MAINT (via vllm/gpu1)", False, False, True),
])
def test_status_words_map_to_states(status: str, ready: bool, drain: bool, maint: bool) -> None:
    assert (hs.in_state(status, "ready"), hs.in_state(status, "drain"), hs.in_state(status, "maint")) == \
        (ready, drain, maint)


def test_unknown_server_names_the_servers_haproxy_has() -> None:
    with pytest.raises(hs.HaproxyError) as error:
        hs.server_row(hs.parse_stat(recorded("drain-maint")), "vllm", "gpu9")
    assert "no server vllm/gpu9" in str(error.value)
    assert "vllm/gpu1, vllm/gpu2, vllm/gpu3" in str(error.value)


def test_maint_with_wait_drains_waits_for_the_sessions_then_takes_the_server_out() -> None:
    base = recorded("drain-maint")
    api = ScriptedApi([
        with_server(base, "gpu1", "UP", 2),
        recorded("draining-busy"),            # gpu1 DRAIN, 1 session
        with_server(base, "gpu1", "DRAIN", 0),
    ])
    ticks = iter(range(100))
    result = hs.apply(api, "vllm", "gpu1", "maint", wait_idle=30, poll=0.2,
                      clock=lambda: float(next(ticks)), sleep=lambda _s: None)
    assert api.commands == ["set server vllm/gpu1 state drain", "set server vllm/gpu1 state maint"]
    assert result["changed"] is True and result["status_before"] == "UP" and result["sessions"] == 0
    # The session in flight when the drain began, which the wait let finish (the roll report shows it).
    assert result["sessions_at_drain"] == 1


def test_switched_is_when_haproxy_accepted_the_drain_not_when_the_wait_ended() -> None:
    """Out of service begins when HAProxy stops sending new requests (the drain), not at the maint after
    the wait; a server already out or already in switched before the call (its start)."""
    base = recorded("drain-maint")
    api = ScriptedApi([with_server(base, "gpu1", "UP", 2), recorded("draining-busy"),
                       with_server(base, "gpu1", "DRAIN", 0)])
    clock = Clock(api)
    result = hs.apply(api, "vllm", "gpu1", "maint", wait_idle=30, poll=0.2, clock=clock, sleep=lambda _s: None)
    assert result["switched_monotonic"] == clock.at["set server vllm/gpu1 state drain"]
    assert api.commands[-1] == "set server vllm/gpu1 state maint"
    assert result["switched_monotonic"] < clock.now  # the wait for the session read the clock after it
    back = ScriptedApi([recorded("drain-maint")])  # gpu3 MAINT
    clock = Clock(back)
    assert hs.apply(back, "vllm", "gpu3", "ready", wait_idle=0, poll=0.2, clock=clock)["switched_monotonic"] \
        == clock.at["set server vllm/gpu3 state ready"]
    # gpu2 is in DRAIN (taken to maint: still out since before the call), gpu3 in MAINT, gpu1 UP.
    for server, state, sent in (("gpu2", "maint", ["set server vllm/gpu2 state maint"]), ("gpu3", "maint", []),
                                ("gpu1", "ready", [])):
        already = ScriptedApi([recorded("drain-maint")])
        clock = Clock(already)
        result = hs.apply(already, "vllm", server, state, wait_idle=30, poll=0.2, clock=clock,
                          sleep=lambda _s: None)
        assert already.commands == sent and result["switched_monotonic"] == clock.first, (server, result)


def test_check_mode_returns_no_switch_time() -> None:
    api = ScriptedApi([recorded("drain-maint")])
    assert "switched_monotonic" not in hs.apply(api, "vllm", "gpu1", "maint", wait_idle=30, poll=0.2,
                                                check_mode=True)


def test_a_drain_that_does_not_end_fails_naming_the_sessions_and_leaves_the_server_drained() -> None:
    api = ScriptedApi([recorded("draining-busy")])
    ticks = iter(range(100))
    with pytest.raises(hs.HaproxyError, match=r"still has 1 session\(s\) after 5s.*left in drain state"):
        hs.apply(api, "vllm", "gpu1", "maint", wait_idle=5, poll=1,
                 clock=lambda: float(next(ticks)), sleep=lambda _s: None)
    assert api.commands == []  # it was already draining; never put in maint


def test_a_server_already_in_maintenance_is_left_alone() -> None:
    api = ScriptedApi([recorded("drain-maint")])
    result = hs.apply(api, "vllm", "gpu3", "maint", wait_idle=30, poll=0.2)
    assert api.commands == [] and result["changed"] is False


def test_ready_puts_back_only_a_server_that_is_out() -> None:
    out = ScriptedApi([recorded("drain-maint")])
    assert hs.apply(out, "vllm", "gpu3", "ready", wait_idle=0, poll=0.2)["changed"] is True
    assert out.commands == ["set server vllm/gpu3 state ready"]
    serving = ScriptedApi([recorded("just-ready")])  # gpu3 "UP 1/2"
    assert hs.apply(serving, "vllm", "gpu3", "ready", wait_idle=0, poll=0.2)["changed"] is False
    assert serving.commands == []


def test_check_mode_reports_the_change_and_sends_nothing() -> None:
    api = ScriptedApi([recorded("drain-maint")])
    result = hs.apply(api, "vllm", "gpu1", "maint", wait_idle=30, poll=0.2, check_mode=True)
    assert result["changed"] is True and api.commands == []


def test_what_haproxy_answers_to_a_command_is_an_error() -> None:
    # "No such server." is HAProxy 2.6's real answer to a set on an unknown server (exit status of socat: 0).
    api = ScriptedApi([recorded("drain-maint")], refuse="No such server.\n")
    with pytest.raises(hs.HaproxyError, match="HAProxy refused 'set server vllm/gpu1 state drain': No such server."):
        hs.apply(api, "vllm", "gpu1", "drain", wait_idle=0, poll=0.2)


@pytest.fixture
def runtime_socket() -> Iterator[tuple[str, list[str]]]:
    """A UNIX socket that behaves like HAProxy's non-interactive runtime API: one command, one answer, close."""
    received: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/admin.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    data = b""
                    while not data.endswith(b"\n"):
                        data += conn.recv(1024)
                    received.append(data.decode())
                    if data.strip() == b"show stat":
                        conn.sendall(recorded("drain-maint").encode())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield path, received
        server.close()


def test_unix_send_speaks_one_command_per_connection(runtime_socket: tuple[str, list[str]]) -> None:
    path, received = runtime_socket
    send = hs.unix_send(path)
    assert send("show stat") == recorded("drain-maint")
    assert send("set server vllm/gpu2 state ready") == ""
    assert received == ["show stat\n", "set server vllm/gpu2 state ready\n"]


VLLM_DATA = Path(__file__).resolve().parent / "data" / "vllm_0.11.0"


def test_in_flight_is_read_from_real_vllm_metrics() -> None:
    assert hs.in_flight((VLLM_DATA / "metrics_busy.txt").read_text()) == 3.0
    assert hs.in_flight((VLLM_DATA / "metrics_idle.txt").read_text()) == 0.0
    assert hs.in_flight(None) == 0.0  # vLLM does not answer: nothing can be in flight


def test_the_drain_also_waits_for_requests_that_reached_vllm_directly() -> None:
    base = recorded("drain-maint")
    api = ScriptedApi([with_server(base, "gpu1", "UP", 0)])
    addr = hs.server_row(hs.parse_stat(base), "vllm", "gpu1")["addr"]
    pages = iter(["metrics_busy.txt", "metrics_busy.txt", "metrics_idle.txt"])
    asked: list[str] = []

    def metrics(address: str) -> str:
        asked.append(address)
        return (VLLM_DATA / next(pages)).read_text()

    ticks = iter(range(100))
    result = hs.apply(api, "vllm", "gpu1", "maint", wait_idle=30, poll=0.2, metrics=metrics,
                      clock=lambda: float(next(ticks)), sleep=lambda _s: None)
    assert asked == [addr] * 3 and addr == "127.0.0.1:8001"
    assert api.commands == ["set server vllm/gpu1 state drain", "set server vllm/gpu1 state maint"]
    assert result["in_flight"] == 0.0


def test_a_drain_timeout_on_direct_requests_says_so() -> None:
    api = ScriptedApi([with_server(recorded("drain-maint"), "gpu1", "DRAIN", 0)])
    ticks = iter(range(100))
    with pytest.raises(hs.HaproxyError, match=r"still has 3 request\(s\) in vLLM \(not through HAProxy\)"):
        hs.apply(api, "vllm", "gpu1", "maint", wait_idle=3, poll=1,
                 metrics=lambda _a: (VLLM_DATA / "metrics_busy.txt").read_text(),
                 clock=lambda: float(next(ticks)), sleep=lambda _s: None)
    assert api.commands == []

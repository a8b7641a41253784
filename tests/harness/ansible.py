"""Run ansible-playbook from the tests the way an operator would, and read the recap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.MULTILINE,
)


@dataclass
class PlayResult:
    rc: int
    output: str
    recap: dict[str, dict[str, int]]

    def changed(self) -> int:
        return sum(stats["changed"] for stats in self.recap.values())

    def failed(self) -> int:
        return sum(stats["failed"] + stats["unreachable"] for stats in self.recap.values())

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def batches(self, task: str) -> list[set[str]]:
        """The hosts under each run of the task whose name ends with `task`, in order (serial batches)."""
        found = []
        for block in self.output.split("\nTASK [")[1:]:
            if block.split("]", 1)[0].endswith(task):
                found.append(set(re.findall(r"^(?:changed|ok|fatal): \[([^\]\s]+)", block, re.M)))
        return found


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed, ...}}."""
    recap: dict[str, dict[str, int]] = {}
    for match in RECAP.finditer(output):
        fields = match.groupdict()
        host = fields.pop("host")
        recap[host] = {key: int(value) for key, value in fields.items()}
    return recap


def run_playbook(
    playbook: str, inventory: Path, *, extra_args: Sequence[str] = (),
    extra_vars_files: Sequence[Path] = (), timeout: float = 1800, log: Path | None = None,
    env: dict[str, str] | None = None, project: Path | None = None,
) -> PlayResult:
    """ansible-playbook PLAYBOOK -i INVENTORY ...; output kept for assertions and logs.

    By default from this repository (its ansible.cfg, PLAYBOOK under playbooks/). With
    `project`, from that directory instead, as an operator's own project: PLAYBOOK is a path
    or a collection playbook's FQCN, and this repository's ansible.cfg is not read."""
    where = project or REPO
    target = playbook if project else str(REPO / "playbooks" / playbook)
    command = [str(BIN / "ansible-playbook"), target, "-i", str(inventory)]
    for path in extra_vars_files:
        command += ["-e", f"@{path}"]
    command += list(extra_args)
    environment = {
        key: value for key, value in os.environ.items() if not (project and key == "ANSIBLE_CONFIG")}
    if not project:
        environment["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    environment.update({"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
                        "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})})
    result = subprocess.run(
        command, cwd=where, env=environment, capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as handle:
            handle.write(f"\n$ {' '.join(command)}\n{output}\n[rc={result.returncode}]\n")
    return PlayResult(rc=result.returncode, output=output, recap=parse_recap(output))

"""The one way a generated file of this repository is written or checked.

Each generator (gen_var_docs.py, gen_dashboard.py) renders its text and hands it
here: `--check` fails, naming the script to run, when the committed file differs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str], out: Path, render: Callable[[], str], script: str, description: str | None) -> int:
    return main_many(argv, {out: render}, script, description)


def main_many(argv: list[str], outputs: dict[Path, Callable[[], str]], script: str,
              description: str | None) -> int:
    """Write (or with --check, compare) every file of `outputs` with its renderer's text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="fail when a committed file is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for out, render in outputs.items():
        text = render()
        name = out.relative_to(REPO)
        if args.check:
            if not out.exists() or out.read_text() != text:
                print(f"{name} is out of date: run scripts/{script}", file=sys.stderr)
                stale += 1
            else:
                print(f"{name} matches scripts/{script}")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 1 if stale else 0

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
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="fail when the committed file is out of date")
    args = parser.parse_args(argv)
    text = render()
    name = out.relative_to(REPO)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{name} is out of date: run scripts/{script}", file=sys.stderr)
            return 1
        print(f"{name} matches scripts/{script}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0

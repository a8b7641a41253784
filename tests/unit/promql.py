"""Small readers for the observability tests: metric and label names in a PromQL
expression, the recorded vLLM 0.11.0 /metrics, and promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "tests/unit/data/vllm_0.11.0/metrics_busy.txt"
# vLLM 0.11.0 with the role's shipped request counter (RequestsPerModel): its series come from there.
COUNTER_RECORDED = REPO / "tests/unit/data/vllm_0.11.0/metrics_requests_per_model.txt"
COUNTER_PREFIX = "vllm_deploy_model_requests_"
# Labels every scraped series gets from the role's file_sd targets and the scrape itself.
TARGET_LABELS = {"job", "instance", "host", "release", "role"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "bool", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, labels, strings, durations)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        before = text[:match.start()]
        if before and (before[-1].isdigit() or before[-1] in ".$"):  # 1e3, 0.5, $host
            continue
        if re.match(r"\s*\(", text[match.end():]) or match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    text = _STRING.sub('""', expr)
    found = set()
    for group in _MATCHERS.findall(text):
        found |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", group))
    for _, names in _GROUPING.findall(text):
        found |= {name.strip() for name in names.split(",") if name.strip()}
    return found


def recorded_series(path: Path = RECORDED) -> list[tuple[str, dict[str, str], float, str]]:
    """(name, labels, value, type of its family) for every sample line of a recorded /metrics."""
    types: dict[str, str] = {}
    series = []
    for line in path.read_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        name, raw, value = match.groups()
        labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', raw or ""))
        family = re.sub(r"_(bucket|count|sum|total|created)$", "", name)
        kind = types.get(name) or types.get(family) or types.get(name.removesuffix("_total")) or "untyped"
        series.append((name, labels, float(value), kind))
    return series


def recorded_labels(path: Path = RECORDED) -> dict[str, set[str]]:
    """Metric name -> the label names it carries, for names that have samples."""
    found: dict[str, set[str]] = {}
    for name, labels, _, _ in recorded_series(path):
        found.setdefault(name, set()).update(labels)
    return found


def counter_series() -> list[tuple[str, dict[str, str], float, str]]:
    """The shipped middleware's series, as a real vLLM 0.11.0 running it served them on /metrics."""
    return [series for series in recorded_series(COUNTER_RECORDED) if series[0].startswith(COUNTER_PREFIX)]


def counter_labels() -> dict[str, set[str]]:
    """Metric name -> label names, for the shipped middleware's series."""
    found: dict[str, set[str]] = {}
    for name, labels, _, _ in counter_series():
        found.setdefault(name, set()).update(labels)
    return found


def promtool() -> str:
    """promtool's path; the test fails (never skips) without it."""
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is not installed: run scripts/setup.sh (it installs Debian's prometheus package,"
                    " which carries promtool)")
    return path


def run_promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)

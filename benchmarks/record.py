"""What every benchmark reports: two arms, the work each one counted, and their ratio.

A ratio only means something when both arms did the same work. Each script counts what
its arms actually did (images decoded, tokens generated, requests answered, ...) and
hands both arms to :func:`compare`, which refuses the ratio, saying which count differs,
when they do not match. :func:`publish` prints the entry and, when ``make bench`` runs
the script (``MMRAD_BENCH_RECORD`` set), appends it as one JSON line for
``benchmarks/run_all.py`` to collect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

RECORD_ENV = "MMRAD_BENCH_RECORD"


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: the figure compared (``value``, in the entry's unit) and
    the work it counted doing (``work``: name → count)."""

    label: str
    value: float
    work: Mapping[str, float]


@dataclass(frozen=True)
class Entry:
    """A benchmark's result: ``ratio`` = candidate.value / baseline.value, or None with
    ``refused`` saying why (the arms' counted work differs)."""

    name: str
    unit: str
    candidate: Arm
    baseline: Arm
    ratio: float | None
    refused: str | None = None
    goal: str | None = None
    notes: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def work_mismatch(
    candidate: Arm, baseline: Arm, same: Sequence[str], tolerance: Mapping[str, float]
) -> str | None:
    """Why the arms' work differs (each count in ``same``, equal up to its relative
    ``tolerance``, default exact), or None when it matches."""
    reasons = []
    for key in same:
        if key not in candidate.work or key not in baseline.work:
            reasons.append(f"{key} not counted by both arms")
            continue
        a, b = candidate.work[key], baseline.work[key]
        allowed = tolerance.get(key, 0.0) * max(abs(a), abs(b))
        if abs(a - b) > allowed:
            reasons.append(f"{key} {a:g} vs {b:g}")
    return "; ".join(reasons) or None


def compare(
    name: str,
    unit: str,
    candidate: Arm,
    baseline: Arm,
    *,
    same: Sequence[str],
    tolerance: Mapping[str, float] | None = None,
    goal: str | None = None,
    notes: Mapping[str, object] | None = None,
) -> Entry:
    """The entry for ``candidate`` against ``baseline``; no ratio unless every count in
    ``same`` matches."""
    mismatch = work_mismatch(candidate, baseline, same, tolerance or {})
    ratio = None
    if mismatch is None and baseline.value:
        ratio = candidate.value / baseline.value
    return Entry(
        name=name,
        unit=unit,
        candidate=candidate,
        baseline=baseline,
        ratio=ratio,
        refused=f"counted work differs: {mismatch}" if mismatch else None,
        goal=goal,
        notes=dict(notes or {}),
    )


def ratio_text(ratio: float) -> str:
    """Two decimals, three below 0.1 (a step's overhead share is a few hundredths)."""
    return f"{ratio:.2f}" if abs(ratio) >= 0.1 else f"{ratio:.3f}"


def describe_work(work: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in work.items())


def format_entry(entry: Entry) -> str:
    lines = [f"[{entry.name}] {entry.unit}"]
    for role, arm in (("candidate", entry.candidate), ("baseline ", entry.baseline)):
        lines.append(f"  {role} {arm.label}: {arm.value:.4g}  (work: {describe_work(arm.work)})")
    if entry.ratio is None:
        lines.append(f"  no ratio: {entry.refused or 'the baseline measured 0'}")
    else:
        goal = f" (goal: {entry.goal})" if entry.goal else ""
        lines.append(f"  ratio {ratio_text(entry.ratio)}x{goal}")
    return "\n".join(lines)


def publish(entry: Entry) -> Entry:
    """Print ``entry``; under ``make bench`` also append it to the run's record file."""
    print(format_entry(entry), flush=True)
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as record:
            record.write(json.dumps(entry.to_json()) + "\n")
    return entry

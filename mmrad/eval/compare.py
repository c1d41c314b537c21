"""``mmrad eval compare RUN_URI...``: several evaluation runs side by side in one table.

One row per run and source data set, its unseen categories (the number general AD is
about), then its mean over sources and its mean over categories, in the report's
``det/loc`` style, with the run's throughput. Runs are read from their ``metrics.json`` (local or ``s3://``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mmrad.eval.report import TABLE_COLUMNS, _pct, markdown_row
from mmrad.storage import Storage, StorageError, join

METRICS = "metrics.json"


def read_metrics(storage: Storage, run_uri: str) -> dict[str, Any]:
    uri = join(run_uri, METRICS)
    try:
        return json.loads(storage.read_text(uri))
    except StorageError:
        raise StorageError(
            f"{run_uri}: no {METRICS} (not an evaluation run with labels?)"
        ) from None
    except ValueError as err:
        raise StorageError(f"{uri}: not valid JSON: {err}") from None


def run_label(run_uri: str) -> str:
    """The run directory's name (what ``run.name`` was)."""
    return run_uri.rstrip("/").rsplit("/", 1)[-1]


def compare_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Markdown: ``runs`` are ``(label, metrics)`` pairs."""
    header = ["Run", "Part", "Images", *(f"{c.capitalize()} det/loc" for c in TABLE_COLUMNS),
              "AUROC", "Samples/s"]  # fmt: skip
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    for label, metrics in runs:
        speed = (metrics.get("extra") or {}).get("samples_per_s")
        parts = [(source, m) for source, m in metrics.get("per_source", {}).items()]
        if "unseen" in metrics and metrics["unseen"].get("n_images"):
            parts.append(("unseen categories", metrics["unseen"]))
        if metrics.get("source_mean"):
            parts.append(("**mean over sources**", metrics["source_mean"]))
        parts.append((CATEGORY_MEAN, metrics))
        for part, m in parts:
            speed_cell = "" if part != CATEGORY_MEAN or speed is None else f"{speed:g}"
            lines.append(_row(label, part, m, speed_cell))
    return "\n".join(lines) + "\n"


CATEGORY_MEAN = "**mean over categories**"


def _row(label: str, part: str, m: Mapping[str, Any], speed: str) -> str:
    cells = [label, part, str(m.get("n_images", ""))]
    cells += [f"{_pct(m.get(f'det_{c}'))}/{_pct(m.get(f'loc_{c}'))}" for c in TABLE_COLUMNS]
    cells += [_pct(m.get("auroc")), speed]
    return markdown_row(cells)


def compare_runs(run_uris: Sequence[str], storage: Storage) -> str:
    """The comparison table of the runs at ``run_uris``, in that order."""
    if not run_uris:
        raise ValueError("compare needs at least one run")
    return compare_table([(run_label(uri), read_metrics(storage, uri)) for uri in run_uris])

"""The evaluation's error budget: predictions that failed (a dead engine, an endpoint
that refused) are not results. Above ``max_error_fraction`` of the samples the run
fails: it writes ``FAILED`` with the counts instead of ``metrics.json``, so neither a
reader nor the pipeline takes the folder for finished. Rows whose image could not be
read are the data's fault, not the prediction's (``data.on_bad_image``), and count apart."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mmrad.storage import Storage, join

FAILED = "FAILED"
STALE_ON_FAILURE = ("metrics.json", "report.md")  # an earlier run's: not these predictions
SHOWN_ERRORS = 3


class EvalFailed(RuntimeError):
    """Too many predictions failed for the run's metrics to mean anything."""


def failed_prediction(row: Mapping[str, Any]) -> bool:
    return bool(row.get("error")) and not row.get("bad_image")


def error_fraction(rows: Sequence[Mapping[str, Any]]) -> float:
    """The share of rows whose prediction failed (0 for no rows)."""
    return sum(map(failed_prediction, rows)) / len(rows) if rows else 0.0


def enforce_error_budget(
    storage: Storage,
    run_uri: str,
    rows: Sequence[Mapping[str, Any]],
    max_fraction: float,
    *,
    stale: Sequence[str] = STALE_ON_FAILURE,
    withheld: str = "metrics",
) -> None:
    """Within budget: clear an earlier run's ``FAILED``. Above it: remove the earlier
    run's results (``stale``: metrics and report), write ``FAILED`` (counts, the
    commonest errors) and raise :class:`EvalFailed` naming the counts. ``mmrad detect``
    passes its own ``stale`` files and ``withheld`` (what the message says is not
    written)."""
    marker = join(run_uri, FAILED)
    fraction = error_fraction(rows)
    if fraction <= max_fraction:
        if storage.exists(marker):
            storage.delete(marker)
        return
    errors = Counter(str(row["error"]) for row in rows if failed_prediction(row))
    failed = sum(errors.values())
    for name in stale:
        storage.delete(join(run_uri, name))
    storage.write_text(marker, json.dumps({
        "samples": len(rows), "errors": failed, "error_fraction": fraction,
        "max_error_fraction": max_fraction,
        "commonest_errors": [{"error": e, "count": n} for e, n in errors.most_common(SHOWN_ERRORS)],
    }, indent=2))  # fmt: skip
    commonest, count = errors.most_common(1)[0]
    raise EvalFailed(
        f"{run_uri}: {failed} of {len(rows)} predictions failed ({fraction:.1%} > "
        f"max_error_fraction {max_fraction:.1%}); no {withheld} written, see {marker}. "
        f"Commonest error ({count}x): {commonest[:300]}"
    )

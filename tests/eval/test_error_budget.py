"""The evaluation's error budget on local storage (no Ray): failed predictions count,
unreadable images do not; above the budget a FAILED marker replaces the metrics."""

from __future__ import annotations

import json

import pytest

from mmrad.eval.budget import EvalFailed, enforce_error_budget, error_fraction
from mmrad.storage import Storage


def rows(ok: int, failed: int, bad_images: int = 0) -> list[dict]:
    return (
        [{"id": f"ok{i}", "error": None} for i in range(ok)]
        + [{"id": f"f{i}", "error": "connection refused"} for i in range(failed)]
        + [{"id": f"b{i}", "error": "NoSuchKey", "bad_image": True} for i in range(bad_images)]
    )


def test_only_failed_predictions_count_against_the_budget():
    assert error_fraction(rows(8, 2, bad_images=10)) == pytest.approx(0.1)
    assert error_fraction([]) == 0.0


def test_within_budget_an_earlier_failure_marker_is_cleared(tmp_path):
    (tmp_path / "FAILED").write_text("{}")
    enforce_error_budget(Storage(), str(tmp_path), rows(98, 2), max_fraction=0.02)
    assert not (tmp_path / "FAILED").exists()


def test_above_budget_the_marker_replaces_the_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "predictions.parquet").write_text("kept")
    with pytest.raises(EvalFailed, match=r"3 of 10 predictions failed \(30.0% > "
                       r"max_error_fraction 2.0%\).*connection refused"):  # fmt: skip
        enforce_error_budget(Storage(), str(tmp_path), rows(7, 3), max_fraction=0.02)
    failed = json.loads((tmp_path / "FAILED").read_text())
    assert failed["errors"] == 3 and failed["samples"] == 10
    assert failed["commonest_errors"] == [{"error": "connection refused", "count": 3}]
    assert not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "predictions.parquet").read_text() == "kept"

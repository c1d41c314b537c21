"""The evaluation job end to end on real Ray Data, vLLM and S3: the SFT'd tiny model's
export on the synthetic set's test split (to S3, two predictor actors) and val split
(threshold), an unlabelled manifest with a broken image, re-rendering and comparing. An
OpenAI-compatible endpoint as target is tested in tests/serve/test_endpoint_as_target.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mmrad.config import load_config
from mmrad.data.manifest import read_manifest
from mmrad.eval.compare import compare_runs
from mmrad.eval.config import EvalJobConfig
from mmrad.eval.job import rerender_report, run_eval
from mmrad.storage import Storage, join
from mmrad.task.metrics import RATE_KEYS
from tests.conftest import TEST_BUCKET
from tests.helpers.faults import record_s3_faults, s3_faults
from tests.helpers.tracking import artifact_names, the_run_of

pytestmark = pytest.mark.integration

SMALL = [
    "sampling.max_tokens=128",
    "engine.max_model_len=2048",
    "engine.kv_cache_bytes=134217728",
    "engine.max_num_seqs=16",
    "predictors.cpus_per_actor=0.5",
    "predictors.batch_size=8",
]


def eval_config(export: str, manifest: str, storage_path: str, name: str, *overrides: str):
    base = [f"target.path={export}", f"data.manifest={manifest}",
            f"run.storage_path={storage_path}", f"run.name={name}", *SMALL]  # fmt: skip
    return load_config(EvalJobConfig, "configs/local/eval.yaml", [*base, *overrides])


def read_predictions(run_uri: str) -> list[dict]:
    data = Storage().read_bytes(join(run_uri, "predictions.parquet"))
    return pq.read_table(io.BytesIO(data)).to_pylist()


def read_json(uri: str) -> dict:
    return json.loads(Storage().read_text(uri))


def split_records(manifest: str, split: str) -> list[dict]:
    return [r for r in read_manifest(Storage(), manifest) if r["split"] == split]


@pytest.fixture(scope="module")
def test_run(sft_trained, synthetic_local_on_s3, s3_chaos):
    """The full test split (unseen categories coins and cell), images read from and
    results written to S3, with S3 answers cut mid-body and 503 SlowDowns injected into
    mmrad's reads (every prediction must still be there, none an error)."""
    job = eval_config(sft_trained.export_uri, synthetic_local_on_s3, f"s3://{TEST_BUCKET}/eval",
                      "test-split", "predictors.num_actors=2")  # fmt: skip
    with s3_faults(s3_chaos) as fired:
        result = run_eval(job)
    record_s3_faults("eval/1 S3 resets and 503 bursts", "evaluation", fired,
                     "images and results on S3",
                     "retried with backoff; every prediction made, no error row")  # fmt: skip
    return result


@pytest.fixture(scope="module")
def val_run(sft_trained, synthetic_local, tmp_path_factory):
    storage_path = str(tmp_path_factory.mktemp("eval"))
    job = eval_config(sft_trained.export_uri, synthetic_local, storage_path, "val-split",
                      "data.split=val")  # fmt: skip
    return run_eval(job)


def test_test_split_predictions_metrics_and_report_on_s3(test_run, synthetic_local):
    records = split_records(synthetic_local, "test")
    assert test_run.run_uri == f"s3://{TEST_BUCKET}/eval/test-split"
    assert test_run.samples == len(records) and test_run.errors == 0 and test_run.labelled

    rows = read_predictions(test_run.run_uri)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in records}
    assert all(r["error"] is None and r["completion"] and r["latency_ms"] > 0 for r in rows)
    assert sum(r["format_ok"] for r in rows) >= 0.8 * len(rows)  # the SFT'd model's format
    assert sum(r["decision"] is not None for r in rows) >= 0.8 * len(rows)
    scored = [r["score"] for r in rows if r["score"] is not None]
    assert len(scored) >= 0.8 * len(rows) and all(0.0 <= s <= 1.0 for s in scored)
    for row in rows:  # boxes in the original image's pixels
        width, height = by_id[row["id"]]["width"], by_id[row["id"]]["height"]
        assert all(0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
                   for x1, y1, x2, y2 in row["boxes"])  # fmt: skip
        assert len(row["labels"]) == len(row["boxes"])

    metrics = read_json(join(test_run.run_uri, "metrics.json"))
    for part in (metrics, *metrics["per_source"].values(), *metrics["per_category"].values()):
        assert set(RATE_KEYS) | {"auroc", "n_images"} <= set(part)
    assert set(metrics["per_category"]) == {"synthetic/cell", "synthetic/coins"}
    assert metrics["unseen"]["n_images"] == len(records) and metrics["seen"]["n_images"] == 0
    if len(scored) == len(rows):
        assert 0.0 <= metrics["auroc"] <= 1.0
    assert metrics["extra"]["samples"] == len(records) and metrics["extra"]["samples_per_s"] > 0
    assert "threshold" not in metrics  # only on the val split

    report = Storage().read_text(join(test_run.run_uri, "report.md"))
    assert "| synthetic |" in report and "## Seen and unseen categories" in report
    assert "| samples_per_s |" in report and "Accuracy det/loc" in report
    for name in ("per_category.png", "examples.png", "config.yaml", "run_info.json"):
        assert Storage().exists(join(test_run.run_uri, name)), name

    tracked = the_run_of(test_run.run_uri, "mmrad-eval")
    assert tracked.info.status == "FINISHED"
    logged = tracked.data.metrics
    assert logged["det_accuracy"] == metrics["det_accuracy"]
    source = metrics["per_source"]["synthetic"]
    assert logged["per_source/synthetic/loc_accuracy"] == source["loc_accuracy"]
    assert tracked.data.params["data.split"] == "test"
    assert {"report.md", "per_category.png", "predictions.parquet"} <= artifact_names(
        tracked.info.run_id
    )


def test_val_split_finds_threshold_and_runs_compare(val_run, test_run, synthetic_local):
    records = split_records(synthetic_local, "val")
    assert val_run.samples == len(records) > 0
    metrics = read_json(join(val_run.run_uri, "metrics.json"))
    threshold = metrics["threshold"]
    assert 0.0 <= threshold["score"] <= 1.0 and 0.0 <= threshold["det_f1"] <= 1.0
    assert val_run.threshold == threshold["score"]
    assert metrics["extra"]["score_threshold"] == pytest.approx(threshold["score"], abs=1e-6)
    assert metrics["seen"]["n_images"] == len(records)  # val holds training categories

    # re-rendered from predictions.parquet + manifest: the same numbers
    again = rerender_report(val_run.run_uri, Storage())
    assert {k: again[k] for k in RATE_KEYS} == {k: metrics[k] for k in RATE_KEYS}
    assert again["threshold"] == threshold

    table = compare_runs([val_run.run_uri, test_run.run_uri], Storage())
    lines = table.splitlines()
    assert lines[0].startswith("| Run | Part | Images |")
    assert any(line.startswith("| val-split | **mean over categories** |") for line in lines)
    assert any(line.startswith("| test-split | **mean over sources** |") for line in lines)
    assert any(line.startswith("| test-split | unseen categories |") for line in lines)

    from mmrad.cli import app

    result = CliRunner().invoke(app, ["eval", "compare", val_run.run_uri, test_run.run_uri])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == table.strip()


def test_unlabelled_manifest_gives_predictions_only(sft_trained, synthetic_local, tmp_path):
    """Batch inspection of new images: no labels, one image missing; the rest still run."""
    import pyarrow as pa

    records = split_records(synthetic_local, "test")[:5]
    rows = [{"id": r["id"], "category": r["category"], "image_uri": r["image_uri"],
             "reference_uri": r["reference_uri"], "width": r["width"], "height": r["height"]}
            for r in records]  # fmt: skip
    rows[2]["image_uri"] = str(tmp_path / "missing.png")
    manifest = tmp_path / "new" / "manifest.parquet"
    manifest.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), manifest)

    job = eval_config(sft_trained.export_uri, str(manifest), str(tmp_path / "runs"), "new")
    result = run_eval(job)
    assert not result.labelled and result.samples == 5 and result.errors == 1
    out = read_predictions(result.run_uri)
    assert [r["id"] for r in out] == sorted(r["id"] for r in rows)
    broken = next(r for r in out if r["id"] == rows[2]["id"])
    assert "missing.png" in broken["error"] and broken["completion"] is None
    assert broken["decision"] is None
    assert all(r["error"] is None and r["completion"] for r in out if r is not broken)
    run_dir = Path(result.run_uri)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "report.md").exists()


def test_an_unreachable_endpoint_fails_the_run_with_a_marker_instead_of_metrics(
    ray_cluster, synthetic_local, tmp_path
):
    """Every prediction fails (nothing listens on the endpoint's port): no metrics, a
    FAILED marker with the counts, and an earlier run's metrics and report removed (they
    describe other predictions). A run within its budget clears the marker."""
    from mmrad.engine.channel import free_port
    from mmrad.eval.budget import EvalFailed

    target = {"kind": "endpoint", "url": f"http://127.0.0.1:{free_port('127.0.0.1')}/v1",
              "model": "nobody", "retries": 0, "api_key_env": None}  # fmt: skip
    run_dir = tmp_path / "down"
    run_dir.mkdir()
    for stale in ("metrics.json", "report.md"):
        (run_dir / stale).write_text("an earlier run's")
    job = eval_config("unused", synthetic_local, str(tmp_path), "down",
                      f"target={json.dumps(target)}", "data.limit=4")  # fmt: skip
    with pytest.raises(EvalFailed, match=r"4 of 4 predictions failed \(100.0% > "
                       r"max_error_fraction 2.0%\); no metrics written"):  # fmt: skip
        run_eval(job)
    failed = json.loads((run_dir / "FAILED").read_text())
    assert failed["samples"] == failed["errors"] == 4 and failed["error_fraction"] == 1.0
    assert failed["commonest_errors"][0]["count"] == 4
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "report.md").exists()
    assert all(row["error"] for row in read_predictions(str(run_dir)))

    tolerant = job.model_copy(update={"max_error_fraction": 1.0})
    result = run_eval(tolerant)
    assert result.errors == 4 and (run_dir / "metrics.json").exists()
    assert not (run_dir / "FAILED").exists()

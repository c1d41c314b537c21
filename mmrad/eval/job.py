"""``mmrad eval run`` / ``python -m ray_jobs.evaluate``: benchmark evaluation on Ray Data.

Reads the manifest's split, runs batch inference (:mod:`mmrad.eval.inference`: an actor
pool of vLLM engines or OpenAI-compatible clients), and writes into the run directory
(local or ``s3://``), every file complete or not at all:

- ``predictions.parquet``: one row per record: ``id``, the first ``completion`` and all
  ``completions``, the parsed verdict (``decision``, ``boxes`` in original pixels,
  ``labels``, ``reasoning``, ``format_ok``), ``score`` (P(Yes)), ``latency_ms``, ``error``;
- with labels: ``metrics.json``, ``report.md`` and figures
  (:func:`mmrad.eval.report.write_report`), seen and unseen categories apart (seen = the
  manifest's train categories), samples/s in the report, and on the ``val`` split the
  score threshold that maximises detection F1 (``metrics.json`` ``threshold``);
- without labels (batch inspection of new images): predictions only;
- ``config.yaml`` and ``run_info.json`` (:func:`mmrad.runinfo.write_run_info`).
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmrad.data.manifest import (
    absolutize,
    manifest_uri,
    read_manifest,
    records_of_split,
    spread_subset,
)
from mmrad.data.schema import ManifestError
from mmrad.eval.budget import enforce_error_budget
from mmrad.eval.config import EndpointTarget, EvalDataConfig, EvalJobConfig, ModelTarget
from mmrad.eval.inference import (
    InferenceSpec,
    collect_rows,
    predict,
    predictors_request,
    record_dataset,
    verdicts_of,
)
from mmrad.storage import Storage, join, parent
from mmrad.task.answer import Verdict
from mmrad.task.metrics import best_f1_threshold
from mmrad.tracking.run import check_tracking, tracked
from mmrad.tracking.values import flat_metrics

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.parquet"
METRICS = "metrics.json"
LABEL_COLUMNS = ("is_anomalous", "boxes", "labels", "defect_type")
INFERENCE_COLUMNS = ("id", "image_uri", "width", "height")
UNLABELLED_DEFAULTS = {"source": "unlabelled", "category": None, "split": None,
                       "reference_uri": None}  # fmt: skip
PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("completion", pa.string()),
        ("completions", pa.list_(pa.string())),
        ("decision", pa.bool_()),
        ("boxes", pa.list_(pa.list_(pa.float64(), 4))),
        ("labels", pa.list_(pa.string())),
        ("reasoning", pa.string()),
        ("format_ok", pa.bool_()),
        ("score", pa.float64()),
        ("scores", pa.list_(pa.float64())),
        ("finish_reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("error", pa.string()),
        ("bad_image", pa.bool_()),
    ]
)


@dataclass
class EvalResult:
    run_uri: str
    samples: int
    errors: int
    samples_per_s: float
    labelled: bool
    det_f1: float | None = None
    loc_f1: float | None = None
    auroc: float | None = None
    threshold: float | None = None


# -- records ----------------------------------------------------------------------------


def read_eval_records(storage: Storage, uri: str) -> tuple[list[dict[str, Any]], bool]:
    """``(records, labelled)``. A manifest with the label columns (and every
    ``is_anomalous`` set) is read and validated as usual; one without them needs only
    ``id, image_uri, width, height`` (batch inspection of new images)."""
    target = manifest_uri(uri)
    table = _read_parquet(storage, target)
    names = set(table.column_names)
    if set(LABEL_COLUMNS) <= names and table.column("is_anomalous").null_count == 0:
        return read_manifest(storage, target), True
    missing = [name for name in INFERENCE_COLUMNS if name not in names]
    if missing:
        raise ManifestError(f"{target}: missing columns {', '.join(missing)}")
    records = [{**UNLABELLED_DEFAULTS, **row} for row in table.to_pylist()]
    for record in records:
        for name in LABEL_COLUMNS:
            record.pop(name, None)
    return absolutize(records, parent(target)), False


def _read_parquet(storage: Storage, uri: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)), use_threads=False)
    except OSError:
        raise
    except Exception as err:
        raise ManifestError(f"{uri}: not a readable Parquet manifest ({err})") from None


def select_split(records: Sequence[dict], data: EvalDataConfig) -> list[dict]:
    """The records of ``data.split``, sorted by id (see
    :func:`~mmrad.data.manifest.records_of_split`; none is a :class:`ManifestError`);
    ``data.limit`` keeps a :func:`~mmrad.data.manifest.spread_subset` of them."""
    chosen = records_of_split(records, data.split, data.manifest, "data.split")
    if data.limit:
        return spread_subset(chosen, data.limit)
    return sorted(chosen, key=lambda r: str(r["id"]))


def seen_categories(records: Sequence[Mapping[str, Any]]) -> set[str] | None:
    """``source/category`` of the training split (what a model trained on this manifest
    has seen); ``None`` when the manifest has no training split."""
    seen = {f"{r['source']}/{r['category']}" for r in records if r.get("split") == "train"}
    return seen or None


# -- the job ----------------------------------------------------------------------------


def run_eval(job: EvalJobConfig) -> EvalResult:
    """Evaluate ``job.target`` on ``job.data``; see the module docstring for outputs."""
    from mmrad.config import with_absolute_paths
    from mmrad.placement import check_or_log
    from mmrad.ray_env import init_ray
    from mmrad.runinfo import write_run_info

    job = with_absolute_paths(job)
    storage = Storage.from_config(job.storage)
    if isinstance(job.target, EndpointTarget):
        from mmrad.eval.endpoint import api_key

        api_key(job.target)  # a missing key fails here, before Ray starts
    spec = InferenceSpec.build(job.target, job.sampling, job.prompt, job.engine,
                               job.predictors, storage, job.ray)  # fmt: skip
    manifest, labelled = read_eval_records(storage, job.data.manifest)
    records = select_split(manifest, job.data)

    run_uri = join(job.run.storage_path, job.run.name)
    check_tracking(job.run)
    init_ray(job.ray)
    check_or_log(job.ray, [predictors_request(job.ray, job.predictors)])
    write_run_info(storage, run_uri, job, job.sampling.seed or 0,
                   {"contract": spec.contract.record()})  # fmt: skip
    with tracked(job.run, "eval", run_uri, job, storage, resume=False) as tracking:
        result, metrics = evaluate(job, spec, storage, run_uri, records, manifest, labelled)
        if metrics is not None:
            tracking.log_rows([{"step": 0, **flat_metrics(metrics)}])
    return result


def evaluate(
    job: EvalJobConfig,
    spec: InferenceSpec,
    storage: Storage,
    run_uri: str,
    records: list[dict[str, Any]],
    manifest: list[dict[str, Any]],
    labelled: bool,
) -> tuple[EvalResult, dict | None]:
    """Predict, write the predictions and (with labels) the report; returns the result
    and the metrics (None without labels)."""
    dataset = record_dataset(records, storage, spec.pixels, batch_size=job.predictors.batch_size,
                             placement=job.ray,
                             on_bad_image=job.data.on_bad_image,
                             fetch_threads=job.data.fetch_threads)  # fmt: skip
    start = time.perf_counter()
    rows = collect_rows(predict(dataset, spec))
    wall_s = time.perf_counter() - start

    unit = spec.contract.answer_unit
    verdicts = [first_verdict(row, spec.variant.reasoning, unit) for row in rows]
    table = predictions_table(rows, verdicts)
    storage.write_bytes(join(run_uri, PREDICTIONS), parquet_bytes(table))
    enforce_error_budget(storage, run_uri, rows, job.max_error_fraction)
    errors = sum(1 for row in rows if row.get("error"))
    result = EvalResult(run_uri, len(rows), errors, len(rows) / wall_s if wall_s else 0.0,
                        labelled)  # fmt: skip
    if not labelled:
        return result, None
    extra = run_extra(job, spec, rows, wall_s)
    metrics = render_report(storage, run_uri, verdicts, records, manifest=manifest,
                            split=job.data.split, extra=extra,
                            title=job.report.title or f"mmrad evaluation: {job.run.name}",
                            max_examples=job.report.max_examples)  # fmt: skip
    result.det_f1, result.loc_f1, result.auroc = (metrics["det_f1"], metrics["loc_f1"],
                                                  metrics["auroc"])  # fmt: skip
    result.threshold = (metrics.get("threshold") or {}).get("score")
    return result, metrics


def first_verdict(row: Mapping[str, Any], require_think: bool, answer_unit: int = 1) -> Verdict:
    """The verdict of a row's first completion (what the metrics score); no decision
    for a row that failed."""
    verdicts = verdicts_of(row, require_think=require_think, answer_unit=answer_unit)
    return verdicts[0] if verdicts else Verdict(decision=None)


def run_extra(job: EvalJobConfig, spec: InferenceSpec, rows: Sequence[Mapping], wall_s: float):
    """What the report's Run table shows beside the metrics."""
    latencies = [float(r["latency_ms"]) for r in rows if not r.get("error")]
    target = spec.target
    name = target.path if isinstance(target, ModelTarget) else f"{target.model} @ {target.url}"
    return {
        "target": name,
        "adapter": getattr(target, "adapter", None),
        "split": job.data.split,
        "samples": len(rows),
        "errors": sum(1 for r in rows if r.get("error")),
        "wall_s": round(wall_s, 2),
        "samples_per_s": round(len(rows) / wall_s, 3) if wall_s else None,
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "predictors": job.predictors.num_actors,
        "prompt": json.dumps(spec.variant.__dict__, sort_keys=True),
        "pixels": f"{spec.pixels.min_pixels}..{spec.pixels.max_pixels} px",
        "sampling": f"n={spec.sampling.n} temperature={spec.sampling.temperature:g} "
        f"max_tokens={spec.sampling.max_tokens}",
    }


# -- outputs ----------------------------------------------------------------------------


def predictions_table(rows: Sequence[Mapping[str, Any]], verdicts: Sequence[Verdict]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
    for row, verdict in zip(rows, verdicts, strict=True):
        completions = list(row.get("completions") or [])
        reasons = list(row.get("finish_reasons") or [])
        values = {
            "id": str(row["id"]),
            "source": row.get("source"),
            "category": row.get("category"),
            "split": row.get("split"),
            "completion": completions[0] if completions else None,
            "completions": completions,
            "decision": verdict.decision,
            "boxes": [list(map(float, box)) for box in verdict.boxes],
            "labels": list(verdict.labels),
            "reasoning": verdict.reasoning,
            "format_ok": verdict.format_ok if completions else None,
            "score": verdict.score,
            "scores": list(row.get("scores") or []),
            "finish_reason": reasons[0] if reasons else None,
            "latency_ms": float(row.get("latency_ms") or 0.0),
            "error": row.get("error") or None,
            "bad_image": bool(row.get("bad_image")),
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=PREDICTION_SCHEMA)


def verdicts_from_table(table: pa.Table) -> list[Verdict]:
    """The stored verdicts of ``predictions.parquet`` (no re-parsing)."""
    return [
        Verdict(decision=row["decision"], boxes=[list(b) for b in row["boxes"] or []],
                labels=list(row["labels"] or []), reasoning=row["reasoning"],
                format_ok=bool(row["format_ok"]), score=row["score"])
        for row in table.to_pylist()
    ]  # fmt: skip


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def score_threshold(verdicts: Sequence[Verdict], records: Sequence[Mapping]) -> dict | None:
    """The F1-maximising P(Yes) threshold over the images that have a score."""
    pairs = [(v.score, bool(r["is_anomalous"])) for v, r in zip(verdicts, records, strict=True)
             if v.score is not None]  # fmt: skip
    if not pairs:
        return None
    score, f1 = best_f1_threshold([s for s, _ in pairs], [label for _, label in pairs])
    return {"score": score, "det_f1": f1, "images": len(pairs)}


def render_report(
    storage: Storage,
    run_uri: str,
    verdicts: Sequence[Verdict],
    records: Sequence[Mapping[str, Any]],
    *,
    manifest: Sequence[Mapping[str, Any]],
    split: str,
    extra: Mapping[str, Any] | None,
    title: str,
    max_examples: int = 12,
) -> dict:
    """Write ``metrics.json``, ``report.md`` and figures into ``run_uri`` (local or S3):
    built in a local folder, then each file put whole. Returns the metrics."""
    from mmrad.eval.report import write_report

    threshold = score_threshold(verdicts, records) if split == "val" else None
    extra = dict(extra or {})
    if threshold:
        extra["score_threshold"] = round(threshold["score"], 6)
        extra["score_threshold_det_f1"] = round(threshold["det_f1"], 4)
    with tempfile.TemporaryDirectory(prefix="mmrad-report-") as scratch:
        metrics = write_report(Path(scratch), verdicts, records,
                               seen_categories=seen_categories(manifest),
                               load_image=image_loader(storage), title=title, extra=extra,
                               max_examples=max_examples)  # fmt: skip
        if threshold:
            metrics["threshold"] = threshold
            (Path(scratch) / METRICS).write_text(json.dumps(metrics, indent=2))
        for path in sorted(Path(scratch).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                storage.write_bytes(join(run_uri, path.name), path.read_bytes())
    return metrics


def image_loader(storage: Storage):
    def load(record: Mapping[str, Any]) -> Image.Image:
        return Image.open(io.BytesIO(storage.read_bytes(record["image_uri"]))).convert("RGB")

    return load


def rerender_report(run_uri: str, storage: Storage, manifest: str | None = None) -> dict:
    """``mmrad eval report``: the report again from ``predictions.parquet`` and the
    manifest (default: the one in the run's ``config.yaml``)."""
    import yaml

    config = yaml.safe_load(storage.read_text(join(run_uri, "config.yaml")))
    manifest = manifest or config["data"]["manifest"]
    records, labelled = read_eval_records(storage, manifest)
    if not labelled:
        raise ManifestError(f"{manifest}: has no labels; there is nothing to report")
    table = pq.read_table(io.BytesIO(storage.read_bytes(join(run_uri, PREDICTIONS))))
    by_id = {str(r["id"]): r for r in records}
    ids = table.column("id").to_pylist()
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ManifestError(f"{manifest}: {len(unknown)} predicted ids are not in it, "
                            f"e.g. {unknown[:3]}")  # fmt: skip
    extra = None
    if storage.exists(join(run_uri, METRICS)):
        extra = json.loads(storage.read_text(join(run_uri, METRICS))).get("extra")
    name = config.get("run", {}).get("name", run_uri)
    title = (config.get("report") or {}).get("title") or f"mmrad evaluation: {name}"
    return render_report(storage, run_uri, verdicts_from_table(table), [by_id[i] for i in ids],
                         manifest=records, split=config["data"]["split"], extra=extra,
                         title=title)  # fmt: skip

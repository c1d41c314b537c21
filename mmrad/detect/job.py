"""``mmrad detect`` / ``python -m ray_jobs.detect``: inspect a folder of new images.

1. In the driver, before Ray: resolve the target as evaluation does
   (:meth:`~mmrad.eval.inference.InferenceSpec.build`: the export's contract gives the
   prompt variant, pixel budget and each category's domain knowledge; an endpoint's API
   key must be set), list the files
   and their categories, find and decode each category's reference
   (:mod:`mmrad.detect.inputs`). Every user error stops here, naming what is wrong.
2. On Ray: the evaluation core's batch inference (:func:`~mmrad.eval.inference.
   record_dataset` → :func:`~mmrad.eval.inference.predict`, an actor pool of vLLM engines
   or endpoint clients), then :func:`~mmrad.detect.results.finish_batch` (verdict,
   decision, overlay PNG). The driver streams the rows with a progress bar and writes
   each overlay as it arrives, so only the PNGs still being written are held.
3. The output folder gets ``overlays/``, ``index.html`` (:mod:`~mmrad.detect.sheet`),
   ``detections.csv`` and, last, ``detections.parquet`` (:mod:`~mmrad.detect.tables`),
   each written whole, plus ``config.yaml`` and ``run_info.json``. An overlay that cannot
   be written is its row's error, counted against the budget below (a full disk fails
   the job, one odd file does not). Overlays an earlier run left for files that are gone
   are removed. When more predictions failed than ``max_error_fraction`` allows,
   evaluation's budget applies (:func:`~mmrad.eval.budget.enforce_error_budget`):
   ``FAILED`` instead of the tables and the sheet, and the job fails.

Rejected: Ray Data's ``write_parquet`` / ``write_csv`` (one file per block, named by Ray,
written by tasks on whichever node: a local output folder would be split over the
nodes' disks); a second pass over the images in the driver for the overlays (one file at
a time, on the head).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mmrad.config import with_absolute_paths
from mmrad.detect.config import DetectJobConfig
from mmrad.detect.inputs import (
    Inspection,
    check_references,
    list_input_files,
    plan_inspection,
)
from mmrad.detect.overlays import OVERLAY_FOLDER, overlay_name
from mmrad.detect.results import FinishSpec, error_fields, finish_batch
from mmrad.detect.sheet import SHEET_NAME, contact_sheet
from mmrad.detect.tables import CSV_NAME, PARQUET_NAME, csv_text, detections_table, parquet_bytes
from mmrad.eval.config import EndpointTarget, ModelTarget
from mmrad.storage import Storage, StorageUnavailable, absolute, join

log = logging.getLogger(__name__)

RESULT_FILES = (SHEET_NAME, CSV_NAME, PARQUET_NAME)
WRITE_THREADS = 8


@dataclass
class DetectResult:
    output: str
    files: int
    anomalous: int
    normal: int
    without_answer: int
    errors: int
    sheet: str
    files_per_s: float


def inference_spec(job: DetectJobConfig, storage: Storage):
    """Evaluation's inference spec for the job's target; a missing API key or model fails
    here, before Ray."""
    from mmrad.eval.inference import InferenceSpec

    if isinstance(job.target, EndpointTarget):
        from mmrad.eval.endpoint import api_key

        api_key(job.target)
    return InferenceSpec.build(job.target, job.sampling, job.prompt, job.engine,
                               job.predictors, storage, job.ray)  # fmt: skip


def plan(job: DetectJobConfig, storage: Storage, spec) -> Inspection:
    """The files, their categories and references; every input error raised here."""
    files = list_input_files(storage, job.input, category=job.category,
                             exclude=[job.output, job.reference])  # fmt: skip
    inspection = plan_inspection(storage, files, job.reference,
                                 needs_reference=spec.variant.use_reference)  # fmt: skip
    if not spec.variant.use_reference and job.reference:
        log.warning("the model's prompt shows no reference image; --reference %s is not used",
                    job.reference)  # fmt: skip
    if spec.variant.domain_knowledge:
        unknown = sorted({f.category for f in inspection.queries} - set(spec.contract.knowledge))
        if unknown:
            log.warning("the model's prompt describes each category's defect types; the "
                        "contract has none for %s: their prompts list none", unknown)  # fmt: skip
    check_references(storage, inspection.references)
    return inspection


def query_rows(inspection: Inspection) -> list[dict[str, Any]]:
    """The records the evaluation core decodes and predicts: ``width``/``height`` are
    unknown here and filled in while decoding (:func:`mmrad.data.loading.with_own_sizes`)."""
    return [
        {"id": f.uri, "image_uri": f.uri, "reference_uri": inspection.references.get(f.category),
         "category": f.category, "relative": f.relative, "width": None, "height": None}
        for f in inspection.queries
    ]  # fmt: skip


def refused_rows(inspection: Inspection) -> list[dict[str, Any]]:
    return [{**error_fields(f.uri, f.category, why), "relative": f.relative, "bad_image": True}
            for f, why in inspection.refused]  # fmt: skip


def run_detect(job: DetectJobConfig, *, progress: bool = True) -> DetectResult:
    """Run the whole job; see the module docstring."""
    from mmrad.eval.budget import enforce_error_budget
    from mmrad.eval.inference import predictors_request
    from mmrad.placement import check_or_log
    from mmrad.ray_env import init_ray
    from mmrad.runinfo import write_run_info

    job = with_absolute_paths(job)
    storage = Storage.from_config(job.storage)
    spec = inference_spec(job, storage)
    inspection = plan(job, storage, spec)
    queries = query_rows(inspection)
    log.info("inspecting %d files (%d refused before inference) from %s", len(queries),
             len(inspection.refused), job.input)  # fmt: skip

    start = time.perf_counter()
    if queries:  # else every file was refused, and no model is needed
        init_ray(job.ray)
        check_or_log(job.ray, [predictors_request(job.ray, job.predictors)])
    write_run_info(storage, job.output, job, job.sampling.seed or 0,
                   {"contract": spec.contract.record()})  # fmt: skip
    rows = refused_rows(inspection) + inspect(job, spec, queries, progress)
    wall_s = time.perf_counter() - start
    rows.sort(key=lambda row: row["path"])

    enforce_error_budget(storage, job.output, rows, job.max_error_fraction,
                         stale=RESULT_FILES, withheld="detections")  # fmt: skip
    sheet_uri = write_results(storage, job, spec, rows)
    remove_stale_overlays(storage, job.output, {row["overlay"] for row in rows})
    verdicts = [row["anomalous"] for row in rows if not row["error"]]
    return DetectResult(
        output=job.output,
        files=len(rows),
        anomalous=verdicts.count(True),
        normal=verdicts.count(False),
        without_answer=verdicts.count(None),
        errors=sum(1 for row in rows if row["error"]),
        sheet=sheet_uri,
        files_per_s=round(len(rows) / wall_s, 3) if wall_s else 0.0,
    )


def inspect(
    job: DetectJobConfig, spec, queries: list[dict[str, Any]], progress: bool
) -> list[dict[str, Any]]:
    """The queries' detection rows, in order, each overlay written as its row arrives."""
    if not queries:
        return []
    finish = FinishSpec(spec.storage, spec.variant.reasoning, job.threshold,
                        job.overlay.max_side, spec.contract.answer_unit)  # fmt: skip
    with quiet_ray_data():  # a dataset keeps the context it was made in
        dataset = detections(job, spec, queries, finish)
        return write_overlays(spec.storage, job.output, stream(dataset, len(queries), progress))


def detections(job: DetectJobConfig, spec, queries: list[dict[str, Any]], finish: FinishSpec):
    """The lazy Ray Dataset: decode → predict (evaluation's core) → finish."""
    from mmrad.eval.inference import predict, record_dataset
    from mmrad.placement import worker_resources

    dataset = record_dataset(queries, spec.storage, spec.pixels,
                             batch_size=job.predictors.batch_size, placement=job.ray,
                             on_bad_image="skip", fetch_threads=job.data.fetch_threads)  # fmt: skip
    return predict(dataset, spec).map_batches(
        finish_batch, fn_kwargs={"spec": finish}, batch_size=job.predictors.batch_size,
        batch_format="pyarrow", resources=worker_resources(job.ray),
    )  # fmt: skip


def stream(dataset, total: int, progress: bool) -> Iterator[dict[str, Any]]:
    """The dataset's rows in order, with a rich progress bar (made in
    :func:`quiet_ray_data`, the dataset shows none of Ray Data's own: one bar that counts
    files and errors reads better than one per operator)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[errors]} errors"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("inspecting", total=total, errors=0)
        errors = 0
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                errors += bool(row["error"])
                bar.update(task, advance=1, errors=errors)
                yield row


@contextlib.contextmanager
def quiet_ray_data():
    """Datasets made inside show no progress bars of Ray Data's; the setting is as it
    was afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


def write_overlays(
    storage: Storage, output: str, rows: Iterator[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Write each row's overlay PNG (a few at a time: S3 puts are latency-bound) and keep
    the row without the bytes, its ``overlay`` set to the PNG's path in ``output`` (or
    the row made an error row when the write failed: :func:`settle_overlay`)."""
    kept = []
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        pending: list[tuple[Future, dict[str, Any]]] = []
        for row in rows:
            picture = row.pop("overlay_png")
            if picture is not None:
                row["overlay"] = overlay_name(row["relative"])
                write = pool.submit(storage.write_bytes, join(output, row["overlay"]), picture)
                pending.append((write, row))
            kept.append(row)
            while pending and (pending[0][0].done() or len(pending) > 4 * WRITE_THREADS):
                settle_overlay(*pending.pop(0))
        for write, row in pending:
            settle_overlay(write, row)
    return kept


def settle_overlay(write: Future, row: dict[str, Any]) -> None:
    """Wait for one overlay write. A failed one (a name the disk refuses, a full disk)
    makes ``row`` an error row that says so: after inference, one file's overlay is no
    reason to lose every result, and the error budget still stops a run whose writes
    all fail. An object-storage outage fails the job, as it does while decoding."""
    try:
        write.result()
    except StorageUnavailable:
        raise
    except Exception as err:
        why = f"{row['path']}: overlay not written: {type(err).__name__}: {err}"
        row.update(error_fields(row["path"], row["category"], why))


def write_results(storage: Storage, job: DetectJobConfig, spec, rows: Sequence[Mapping]) -> str:
    """The sheet, then the CSV, then the Parquet file (the one a pipeline waits for)."""
    table = detections_table(rows)
    details = {"input": job.input, "model": target_name(spec.target),
               "decision": (f"score >= {job.threshold:g}" if job.threshold is not None
                            else "the model's own Yes/No")}  # fmt: skip
    sheet = contact_sheet(rows, title=f"mmrad detect: {job.input}", details=details)
    sheet_uri = join(job.output, SHEET_NAME)
    storage.write_text(sheet_uri, sheet)
    storage.write_text(join(job.output, CSV_NAME), csv_text(table))
    storage.write_bytes(join(job.output, PARQUET_NAME), parquet_bytes(table))
    return sheet_uri


def target_name(target: ModelTarget | EndpointTarget) -> str:
    if isinstance(target, ModelTarget):
        return target.path
    return f"{target.model} @ {target.url}"


def remove_stale_overlays(storage: Storage, output: str, current: set[str | None]) -> None:
    """Delete overlays of an earlier run in this folder whose files this run had not.
    ``output`` is normalized first: the listing is, and a spelling such as ``out/./x``
    would otherwise match no overlay and delete them all."""
    output = absolute(output)
    prefix = join(output, OVERLAY_FOLDER)
    keep = {join(output, name) for name in current if name}
    for uri in storage.list(prefix):
        if uri not in keep:
            storage.delete(uri)

"""Chain-of-thought annotation with a teacher model: MMR-AD's data construction as a job.

1. Read the input manifest; select the records to annotate (:class:`AnnotateSelect`;
   in ``fill_missing`` mode only those without reasoning).
2. Run the evaluation job's batch inference (:mod:`mmrad.eval.inference`: Ray Data over an
   actor pool of vLLM engines, or an OpenAI-compatible endpoint) with hinted inputs
   (:func:`mmrad.eval.hints.hinted_input`), ``n`` samples per image.
3. Judge every sample (:mod:`mmrad.eval.consistency`) and keep the best accepted one per
   image. Every sample gets exactly one outcome, so accepted + rejected-per-reason adds up
   to the samples generated; the job checks that in every run.
4. Write a NEW manifest (the input is never touched): every input record, with the
   accepted reasoning filled in; images with no accepted sample dropped or kept without
   reasoning (``on_rejected``); records not selected unchanged. Image URIs are written
   absolute, so the images are referenced where they are, not copied. Beside it:
   ``rejected.parquet`` (one row per rejected sample) and ``acceptance.json``.
5. Write the report (``report.md`` and figures) into the run folder.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmrad.annotate.config import AnnotateJobConfig, manifest_file
from mmrad.config import with_absolute_paths
from mmrad.data.manifest import read_manifest, read_split_info, write_manifest
from mmrad.data.splits import category_key
from mmrad.eval.consistency import (
    ACCEPTED,
    REASONS,
    Judgement,
    best_sample,
    judge,
    judge_error,
)
from mmrad.eval.inference import predictors_request
from mmrad.placement import check_or_log
from mmrad.ray_env import init_ray
from mmrad.runinfo import write_run_info
from mmrad.storage import Storage, join, parent
from mmrad.task.answer import Verdict, has_reasoning
from mmrad.task.geometry import as_boxes

log = logging.getLogger(__name__)

REJECTED_NAME = "rejected.parquet"
ACCEPTANCE_NAME = "acceptance.json"
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
    ]
)


class AnnotateError(ValueError):
    """Nothing to annotate, or counts that do not add up; the message says which."""


@dataclass(frozen=True)
class ImageJudgement:
    """One selected record, the outcome of each of its samples and the one kept."""

    record: Mapping[str, Any]
    judgements: tuple[Judgement, ...]
    best: Judgement | None

    @property
    def key(self) -> str:
        return category_key(self.record)


@dataclass
class AnnotateResult:
    manifest_uri: str
    run_uri: str
    report_uri: str
    images: int
    samples: int
    accepted_samples: int
    accepted_images: int
    rejected: dict[str, int]
    records_written: int


# -- selection -------------------------------------------------------------------------


def is_selected(record: Mapping[str, Any], job: AnnotateJobConfig) -> bool:
    """Whether the record goes to the teacher (before ``max_images``)."""
    select = job.select
    if record["split"] not in select.splits:
        return False
    if select.categories and record["category"] not in select.categories:
        return False
    return job.mode == "replace" or not has_reasoning(record.get("reasoning"))


def select_records(records: Sequence[Mapping[str, Any]], job: AnnotateJobConfig) -> list[dict]:
    """The records to annotate, in id order. ``max_images`` takes them round-robin over
    categories (each category's first ids first), so a trial run sees every category."""
    chosen = sorted((dict(r) for r in records if is_selected(r, job)), key=lambda r: r["id"])
    limit = job.select.max_images
    if not limit or limit >= len(chosen):
        return chosen
    queues: dict[str, list[dict]] = defaultdict(list)
    for record in chosen:
        queues[category_key(record)].append(record)
    taken: list[dict] = []
    while len(taken) < limit:
        for queue in queues.values():
            if queue and len(taken) < limit:
                taken.append(queue.pop(0))
    return sorted(taken, key=lambda r: r["id"])


# -- judging -----------------------------------------------------------------------------


def judge_image(
    record: Mapping[str, Any],
    completions: Sequence[str],
    verdicts: Sequence[Verdict],
    error: str | None,
    n: int,
    threshold: float,
) -> ImageJudgement:
    """Judge one image's samples (verdicts parsed in original pixels, aligned with
    ``completions``). An error row counts ``n`` error samples; a teacher that returned
    fewer than ``n`` completions gets the missing ones counted as errors."""
    if error:
        judgements = [judge_error(i, error) for i in range(n)]
    else:
        gt = as_boxes(record["boxes"])
        anomalous = bool(record["is_anomalous"])
        judgements = [
            judge(i, text, verdict, gt, anomalous, threshold)
            for i, (text, verdict) in enumerate(zip(completions, verdicts, strict=True))
        ]
        missing = f"the teacher returned {len(completions)} of {n} completions"
        judgements += [judge_error(i, missing) for i in range(len(completions), n)]
    return ImageJudgement(record, tuple(judgements), best_sample(judgements))


def outcome_counts(images: Iterable[ImageJudgement]) -> dict[str, Any]:
    """Images, samples, accepted and rejected-per-reason counts, acceptance rates."""
    images = list(images)
    rejected = dict.fromkeys(REASONS, 0)
    accepted = 0
    for image in images:
        for judgement in image.judgements:
            if judgement.accepted:
                accepted += 1
            else:
                rejected[judgement.outcome] += 1
    samples = sum(len(image.judgements) for image in images)
    accepted_images = sum(image.best is not None for image in images)
    return {
        "images": len(images),
        "samples": samples,
        "accepted": accepted,
        "rejected": rejected,
        "images_accepted": accepted_images,
        "sample_acceptance": accepted / samples if samples else None,
        "image_acceptance": accepted_images / len(images) if images else None,
    }


def acceptance_summary(images: Sequence[ImageJudgement]) -> dict[str, Any]:
    """Overall and per-category (``source/category``) :func:`outcome_counts`."""
    by_key: dict[str, list[ImageJudgement]] = defaultdict(list)
    for image in images:
        by_key[image.key].append(image)
    return {
        **outcome_counts(images),
        "per_category": {key: outcome_counts(by_key[key]) for key in sorted(by_key)},
    }


def check_counts(counts: Mapping[str, Any], expected_samples: int, where: str) -> None:
    """Accepted plus rejected-per-reason must be the samples generated."""
    total = counts["accepted"] + sum(counts["rejected"].values())
    if total != counts["samples"] or total != expected_samples:
        raise AnnotateError(
            f"{where}: {counts['accepted']} accepted + {sum(counts['rejected'].values())} "
            f"rejected = {total}, but {expected_samples} samples were generated"
        )


# -- the new manifest and side files ---------------------------------------------------


@dataclass(frozen=True)
class ManifestPlan:
    records: list[dict[str, Any]]
    annotated: int
    kept_without_reasoning: int
    dropped: int
    untouched: int


def new_records(
    records: Sequence[Mapping[str, Any]],
    images: Sequence[ImageJudgement],
    on_rejected: str,
) -> ManifestPlan:
    """Every input record in input order: accepted images with the best sample's
    reasoning, rejected ones dropped or kept without reasoning, the rest unchanged."""
    judged = {image.record["id"]: image for image in images}
    out, annotated, kept, dropped = [], 0, 0, 0
    for record in records:
        image = judged.get(record["id"])
        if image is None:
            out.append(dict(record))
        elif image.best is not None:
            out.append({**record, "reasoning": (image.best.reasoning or "").strip()})
            annotated += 1
        elif on_rejected == "keep":
            out.append({**record, "reasoning": None})
            kept += 1
        else:
            dropped += 1
    untouched = len(records) - len(judged)
    return ManifestPlan(out, annotated, kept, dropped, untouched)


def rejected_table(images: Sequence[ImageJudgement]) -> pa.Table:
    """One row per rejected sample: id, category, sample index, reason, detail, text."""
    rows = [
        {
            "id": str(image.record["id"]),
            "category": str(image.record["category"]),
            "sample": j.sample,
            "reason": j.outcome,
            "detail": j.detail,
            "completion": j.completion,
        }
        for image in images
        for j in image.judgements
        if j.outcome != ACCEPTED
    ]
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_annotation(
    storage: Storage,
    output: str,
    records: Sequence[Mapping[str, Any]],
    images: Sequence[ImageJudgement],
    *,
    on_rejected: str,
    extra: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write the new manifest (with the input's ``split`` information), ``rejected.parquet``
    and ``acceptance.json`` (each atomically) beside each other; returns the manifest URI
    and the acceptance dict."""
    summary = acceptance_summary(images)
    plan = new_records(records, images, on_rejected)
    target = manifest_file(output)
    folder = parent(target)
    summary["manifest"] = {
        "uri": target,
        "records": len(plan.records),
        "annotated": plan.annotated,
        "kept_without_reasoning": plan.kept_without_reasoning,
        "dropped": plan.dropped,
        "untouched": plan.untouched,
    }
    if extra:
        summary.update(extra)
    storage.write_bytes(join(folder, REJECTED_NAME), parquet_bytes(rejected_table(images)))
    storage.write_text(join(folder, ACCEPTANCE_NAME), json.dumps(summary, indent=2))
    # the manifest last: whoever finds it finds its side files too
    return write_manifest(storage, plan.records, target, split), summary


# -- the job ---------------------------------------------------------------------------


def teacher_spec(job: AnnotateJobConfig, storage: Storage):
    """The evaluation core's inference spec for the teacher, always asking for reasoning
    and for boxes in pixels, as its hints give them. Built in the driver, so a bad model
    path or a missing API key fails before Ray."""
    from mmrad.eval.inference import InferenceSpec

    if job.teacher.kind == "endpoint":
        from mmrad.eval.endpoint import api_key

        api_key(job.teacher)
    prompt = job.prompt.model_copy(update={"reasoning": True, "box_units": "pixels"})
    return InferenceSpec.build(
        job.teacher, job.sampling, prompt, job.engine, job.predictors, storage, job.ray
    )


def teacher_rows(spec, storage: Storage, selected: list[dict]) -> list[dict[str, Any]]:
    """The evaluation core's prediction rows for the hinted inputs, in input order."""
    from mmrad.eval.hints import hinted_input
    from mmrad.eval.inference import collect_rows, predict, record_dataset

    dataset = record_dataset(selected, storage, spec.pixels, batch_size=spec.predictors.batch_size,
                             placement=spec.placement)  # fmt: skip
    return collect_rows(predict(dataset, spec, to_input=hinted_input))


def judge_rows(
    selected: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    n: int,
    threshold: float,
) -> list[ImageJudgement]:
    """Judge the evaluation core's rows (aligned with ``selected``)."""
    from mmrad.eval.inference import verdicts_of

    if len(rows) != len(selected):
        raise AnnotateError(f"{len(selected)} images sent to the teacher, {len(rows)} came back")
    images = []
    for record, row in zip(selected, rows, strict=True):
        if row["id"] != record["id"]:
            raise AnnotateError(f"rows out of order: expected id {record['id']}, got {row['id']}")
        error = row.get("error")
        completions = list(row.get("completions") or [])
        verdicts = [] if error else verdicts_of(row, require_think=True)
        images.append(judge_image(record, completions, verdicts, error, n, threshold))
    return images


def run_annotate(job: AnnotateJobConfig) -> AnnotateResult:
    """Run the whole job; see the module docstring."""
    from mmrad.annotate.report import write_annotate_report

    job = with_absolute_paths(job)
    storage = Storage.from_config(job.storage)
    records = read_manifest(storage, job.input)
    selected = select_records(records, job)
    if not selected:
        raise AnnotateError(
            f"{manifest_file(job.input)}: no record to annotate (mode {job.mode}, splits "
            f"{job.select.splits}, categories {job.select.categories or 'all'})"
        )
    spec = teacher_spec(job, storage)
    init_ray(job.ray)
    check_or_log(job.ray, [predictors_request(job.ray, job.predictors)])
    run_uri = join(job.run.storage_path, job.run.name)
    write_run_info(storage, run_uri, job, job.sampling.seed, {"contract": spec.contract.record()})
    log.info("annotating %d of %d images, %d samples each", len(selected), len(records),
             job.sampling.n)  # fmt: skip
    rows = teacher_rows(spec, storage, selected)
    images = judge_rows(selected, rows, job.sampling.n, job.filter.iou_threshold)
    counts = acceptance_summary(images)
    check_counts(counts, len(selected) * job.sampling.n, manifest_file(job.input))
    for key, category in counts["per_category"].items():
        check_counts(category, category["images"] * job.sampling.n, key)
    extra = {"n": job.sampling.n, "iou_threshold": job.filter.iou_threshold,
             "input": manifest_file(job.input), "mode": job.mode}  # fmt: skip
    manifest_uri, summary = write_annotation(
        storage, job.output, records, images, on_rejected=job.on_rejected, extra=extra,
        split=read_split_info(storage, job.input),
    )  # fmt: skip
    report_uri = write_annotate_report(
        storage, run_uri, images, summary, pixels=spec.pixels, max_examples=job.report.max_examples
    )
    return AnnotateResult(
        manifest_uri=manifest_uri,
        run_uri=run_uri,
        report_uri=report_uri,
        images=counts["images"],
        samples=counts["samples"],
        accepted_samples=counts["accepted"],
        accepted_images=counts["images_accepted"],
        rejected=counts["rejected"],
        records_written=summary["manifest"]["records"],
    )

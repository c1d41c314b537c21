"""``mmrad sft`` / ``python -m ray_jobs.sft``: the driver side of supervised fine-tuning.

Reads the manifest, plans the steps, gives every Ray Train rank its own ordered dataset
per epoch, runs the ``TorchTrainer`` (Train V2) with checkpoints in the run directory,
then exports the chosen checkpoint as a plain Hugging Face directory with ``mmrad.json``.
Rerunning with the same ``run.name`` resumes from the last checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray

from mmrad.config import ConfigError, SFTJobConfig, with_absolute_paths
from mmrad.data.loading import DecodeSpec, build_dataset, ordered_rows, rank_datasets
from mmrad.data.manifest import read_manifest, records_of_split, spread_subset
from mmrad.data.schema import ManifestError
from mmrad.model.contract import export_knowledge, training_knowledge
from mmrad.model.loading import check_model_dir
from mmrad.placement import (
    actor_shape,
    check_or_log,
    learners_request,
    ray_options,
    worker_resources,
)
from mmrad.ray_env import init_ray, joining_existing_cluster
from mmrad.runinfo import write_run_info
from mmrad.sft.plan import (
    SPLITS_READ,
    DataOrder,
    DataOrderError,
    SFTProgress,
    StepPlan,
    check_data_order,
    records_fingerprint,
)
from mmrad.sft.worker import sft_worker
from mmrad.storage import Storage, join
from mmrad.task.answer import has_reasoning
from mmrad.task.knowledge import knowledge_json
from mmrad.tracking.run import check_tracking, tracked
from mmrad.train.checkpoint import STATE_FILE, read_trainer_state
from mmrad.train.core import checkpoint_uri, make_torch_trainer
from mmrad.train.fail_fast import fit
from mmrad.train.metrics_log import readable_metrics
from mmrad.train.progress import run_with_progress

log = logging.getLogger(__name__)

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class SFTResult:
    run_uri: str
    export_uri: str
    checkpoint_uri: str
    steps: int
    best_val_loss: float | None


def committed_progress(storage: Storage, run_uri: str) -> SFTProgress | None:
    """The SFT state of the last checkpoint Ray committed in ``run_uri``, if any; a
    checkpoint this version cannot resume is a :class:`ConfigError`."""
    try:
        snapshot = json.loads(storage.read_text(join(run_uri, CHECKPOINT_SNAPSHOT)))
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        state_uri = join(run_uri, name, STATE_FILE)
        text = storage.read_text(state_uri)
    except Exception:
        return None  # no committed checkpoint: a fresh run
    try:
        return SFTProgress(**read_trainer_state(state_uri, text)[1])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"run {run_uri}: {err}") from None


def start_position(progress: SFTProgress | None, plan: StepPlan) -> tuple[int, int]:
    """``(epoch, start position)`` of a committed checkpoint, else ``(0, 0)``.

    Only a hint to avoid decoding images a resumed run would skip anyway: workers skip
    positions by their own restored state, so a stale hint costs time, never samples."""
    if progress is None:
        return 0, 0
    progress = replace(progress)
    progress.next_epoch_if_done(plan.steps_per_epoch)
    return progress.epoch, plan.start_position(progress.step_in_epoch)


def build_datasets(
    job: SFTJobConfig, storage: Storage, train: list, val: list, plan: StepPlan,
    progress: SFTProgress | None,
):  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws one bar
    spec = DecodeSpec.from_config(storage, job.data)
    first_epoch, start = start_position(progress, plan)
    epochs_needed = -(-plan.total_steps // plan.steps_per_epoch)
    datasets = {}
    for epoch in range(first_epoch, epochs_needed):
        shards = rank_datasets(
            train, spec, world_size=plan.world_size, seed=job.data.seed, epoch=epoch,
            start=start if epoch == first_epoch else 0, batch_size=job.data.batch_size,
            resources=worker_resources(job.ray),
        )  # fmt: skip
        datasets.update({f"train_e{epoch}_r{rank}": ds for rank, ds in enumerate(shards)})
    val_rows = validation_rows(val, job.validation.samples)
    datasets["val"] = build_dataset(val_rows, spec, job.data.batch_size, worker_resources(job.ray))
    return datasets


def validation_rows(val: list[dict], samples: int) -> list[dict]:
    """The val records every validation scores: ``samples`` spread over the split (by a
    hash of the id: the first ids would all be one category's), in a fixed order."""
    return ordered_rows(spread_subset(val, samples), seed=0)


def chosen_checkpoint(result, which: str):
    """The last checkpoint, or the one with the lowest validation loss."""
    if which == "last" or not result.best_checkpoints:
        return result.checkpoint
    return min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"])[0]


EXPORT_CPUS = 0.5


@ray.remote
def export_task(job_dict: dict, checkpoint, out_uri: str, knowledge: dict) -> str:
    """Load the base model, the checkpoint's weights and export (runs on a worker node)."""
    from mmrad.train.export import export_checkpoint

    job = SFTJobConfig.model_validate(job_dict)
    with tempfile.TemporaryDirectory(prefix="mmrad-export-") as scratch:
        name = Path(checkpoint.path).name
        folder = Path(checkpoint.to_directory(str(Path(scratch) / name)))
        return export_checkpoint(job, folder, out_uri, knowledge)


def step_plan(job: SFTJobConfig, samples: int) -> StepPlan:
    plan = StepPlan(
        samples=samples,
        world_size=job.learners.num_workers,
        batch_size=job.learners.micro_batch_size,
        grad_accum=job.learners.grad_accum,
        epochs=job.schedule.epochs,
        max_steps=job.schedule.max_steps,
    )
    plan.check()
    return plan


def data_order(job: SFTJobConfig, train: list[dict[str, Any]]) -> DataOrder:
    return DataOrder(
        seed=job.data.seed,
        manifest=records_fingerprint(train),
        world_size=job.learners.num_workers,
        micro_batch_size=job.learners.micro_batch_size,
        grad_accum=job.learners.grad_accum,
    )


EXAMPLE_IDS = 5
"""Ids named per split when records lack reasoning."""


def sft_splits(job: SFTJobConfig, storage: Storage) -> dict[str, list[dict[str, Any]]]:
    """The manifest's records of each split in :data:`SPLITS_READ`; an empty one is a
    :class:`ManifestError`."""
    records = read_manifest(storage, job.data.manifest)
    return {split: records_of_split(records, split, job.data.manifest, purpose)
            for split, purpose in SPLITS_READ.items()}  # fmt: skip


def ids_without_reasoning(splits: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {split: [str(r["id"]) for r in records if not has_reasoning(r.get("reasoning"))]
            for split, records in splits.items()}  # fmt: skip


def describe_missing(missing: Mapping[str, list[str]]) -> str:
    """``train 3 (a, b, c), val 1 (d)``: counts and the first ids of each split."""
    parts = []
    for split, ids in missing.items():
        shown = ", ".join(ids[:EXAMPLE_IDS]) + (", ..." if len(ids) > EXAMPLE_IDS else "")
        parts.append(f"{split} {len(ids)} ({shown})")
    return ", ".join(parts)


def check_reasoning(
    job: SFTJobConfig, splits: Mapping[str, list[dict[str, Any]]]
) -> dict[str, dict[str, int]]:
    """Records without reasoning would train on a generic think text
    (:data:`~mmrad.task.answer.GENERIC_REASONING`): refused unless
    ``data.require_reasoning`` is false. Returns what ``run_info.json`` records: the
    count per split, when the prompt has a think block."""
    if not job.prompt.reasoning:
        return {}
    missing = ids_without_reasoning(splits)
    found = {split: ids for split, ids in missing.items() if ids}
    if found and job.data.require_reasoning:
        raise ManifestError(
            f"data.manifest {job.data.manifest}: records without reasoning, which the "
            f"prompt's think block needs: {describe_missing(found)}; fill them in with "
            "`mmrad annotate` (mode fill_missing), or set data.require_reasoning=false to "
            "train them on a generic think text"
        )
    if found:
        log.warning("records without reasoning train on a generic think text: %s",
                    describe_missing(found))  # fmt: skip
    return {"records_without_reasoning": {split: len(ids) for split, ids in missing.items()}}


def run_sft(job: SFTJobConfig) -> SFTResult:
    job = with_absolute_paths(job)
    storage = Storage.from_config(job.storage)
    splits = sft_splits(job, storage)  # a bad manifest fails here, before Ray starts
    reasoning_info = check_reasoning(job, splits)
    knowledge, knowledge_origin = training_knowledge(job.prompt, splits["train"], storage)
    if not joining_existing_cluster(job.ray):  # a cluster's workers may have paths we lack
        check_model_dir(job.model.path)
    check_tracking(job.run)
    init_ray(job.ray)
    check_or_log(job.ray, [learners_request(job.ray, job.learners)])
    run_uri = join(job.run.storage_path, job.run.name)
    train, val = splits["train"], splits["val"]
    plan = step_plan(job, len(train))
    order = data_order(job, train)
    progress = committed_progress(storage, run_uri)
    try:
        check_data_order(progress and progress.data_order, order, f"run {run_uri}")
    except DataOrderError as err:
        raise ConfigError(str(err)) from None
    write_run_info(storage, run_uri, job, job.schedule.seed,
                   {**reasoning_info, "knowledge_origin": knowledge_origin})  # fmt: skip
    spec = {
        "config": job.model_dump(mode="json"),
        "plan": asdict(plan),
        "data_order": asdict(order),
        "run_uri": run_uri,
        "knowledge": knowledge_json(knowledge),
    }
    datasets = build_datasets(job, storage, train, val, plan, progress)
    trainer = make_torch_trainer(sft_worker, job, spec, datasets=datasets, best_by="val_loss")
    final_rows = functools.partial(readable_metrics, storage, run_uri)
    with tracked(job.run, "sft", run_uri, job, storage, final_rows) as tracking:
        result = run_with_progress(
            f"SFT {job.run.name}", job.run.name, lambda: fit(trainer), tracking.log_rows
        )
        checkpoint = chosen_checkpoint(result, job.export.checkpoint)
        out_uri = job.export.out or join(run_uri, "export")
        exporting = export_task.options(**ray_options(actor_shape(job.ray, cpus=EXPORT_CPUS)))
        exported = export_knowledge(knowledge, knowledge_origin)
        export_uri = ray.get(
            exporting.remote(job.model_dump(mode="json"), checkpoint, out_uri, exported)
        )
    best = min((m["val_loss"] for _, m in result.best_checkpoints), default=None)
    return SFTResult(run_uri, export_uri, checkpoint_uri(run_uri, checkpoint), plan.total_steps,
                     best)  # fmt: skip

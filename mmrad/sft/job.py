"""``mmrad sft`` / ``python -m ray_jobs.sft``: the driver side of supervised fine-tuning.

Reads the manifest, plans the steps, gives every Ray Train rank its own ordered dataset
per epoch, runs the ``TorchTrainer`` (Train V2) with checkpoints in the run directory,
then exports the chosen checkpoint as a plain Hugging Face directory with ``mmrad.json``.
Rerunning with the same ``run.name`` resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import ray
from pydantic import BaseModel

from mmrad.config import SFTJobConfig
from mmrad.data.loading import DecodeSpec, build_dataset, ordered_rows, rank_datasets
from mmrad.data.manifest import read_manifest
from mmrad.ray_env import init_ray
from mmrad.runinfo import write_run_info
from mmrad.sft.plan import StepPlan
from mmrad.sft.worker import sft_worker
from mmrad.storage import Storage, absolute, join
from mmrad.train.progress import run_with_progress

log = logging.getLogger(__name__)
TrainingJob = TypeVar("TrainingJob", bound=BaseModel)

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class SFTResult:
    run_uri: str
    export_uri: str
    checkpoint_uri: str
    steps: int
    best_val_loss: float | None


def defect_types_by_category(records: list[dict]) -> dict[str, list[str]]:
    """The 'domain knowledge' of each category: the defect labels its training data shows."""
    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        found[record["category"]].update(record["labels"])
    return {category: sorted(labels) for category, labels in found.items()}


def committed_position(storage: Storage, run_uri: str, plan: StepPlan) -> tuple[int, int]:
    """``(epoch, start position)`` of the last checkpoint Ray committed, else ``(0, 0)``.

    Only a hint to avoid decoding images a resumed run would skip anyway: workers skip
    positions by their own restored state, so a stale hint costs time, never samples."""
    try:
        snapshot = json.loads(storage.read_text(join(run_uri, CHECKPOINT_SNAPSHOT)))
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        state = json.loads(storage.read_text(join(run_uri, name, "trainer_state.json")))
    except Exception:
        return 0, 0
    epoch, in_epoch = state["epoch"], state["step_in_epoch"]
    if in_epoch >= plan.steps_per_epoch:
        return epoch + 1, 0
    return epoch, plan.start_position(in_epoch)


def build_datasets(job: SFTJobConfig, storage: Storage, train: list, val: list, plan: StepPlan):
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws one bar
    spec = DecodeSpec.from_config(storage, job.data)
    run_uri = join(job.run.storage_path, job.run.name)
    first_epoch, start = committed_position(storage, run_uri, plan)
    epochs_needed = -(-plan.total_steps // plan.steps_per_epoch)
    datasets = {}
    for epoch in range(first_epoch, epochs_needed):
        shards = rank_datasets(
            train, spec, world_size=plan.world_size, seed=job.data.seed, epoch=epoch,
            start=start if epoch == first_epoch else 0, batch_size=job.data.batch_size,
        )  # fmt: skip
        datasets.update({f"train_e{epoch}_r{rank}": ds for rank, ds in enumerate(shards)})
    val_rows = ordered_rows(sorted(val, key=lambda r: r["id"])[: job.train.val_samples], seed=0)
    datasets["val"] = build_dataset(val_rows, spec, job.data.batch_size)
    return datasets


def make_trainer(job: SFTJobConfig, storage: Storage, spec: dict, datasets: dict):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": job.scaling.cpus_per_worker}
    if job.scaling.use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    filesystem, path = storage.arrow_filesystem(job.run.storage_path)
    return TorchTrainer(
        sft_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.run.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=job.run.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def chosen_checkpoint(result, which: str):
    """The last checkpoint, or the one with the lowest validation loss."""
    if which == "last" or not result.best_checkpoints:
        return result.checkpoint
    return min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"])[0]


@ray.remote(num_cpus=0.5)
def export_task(job_dict: dict, checkpoint, out_uri: str) -> str:
    """Load the base model, the checkpoint's weights and export (runs on a worker node)."""
    from mmrad.sft.export_step import export_checkpoint

    job = SFTJobConfig.model_validate(job_dict)
    with tempfile.TemporaryDirectory(prefix="mmrad-export-") as scratch:
        name = Path(checkpoint.path).name
        folder = Path(checkpoint.to_directory(str(Path(scratch) / name)))
        return export_checkpoint(job, folder, out_uri)


def with_absolute_paths(job: TrainingJob) -> TrainingJob:
    """Local paths as the driver sees them, so every worker reads and writes the same
    (SFT and GRPO jobs: ``model``, ``data``, ``run`` and ``export`` sections)."""
    job = job.model_copy(deep=True)
    if Path(job.model.path).exists():  # else a hub id or s3://
        job.model.path = absolute(job.model.path)
    job.model.cache_dir = absolute(job.model.cache_dir)
    job.data.manifest = absolute(job.data.manifest)
    job.run.storage_path = absolute(job.run.storage_path)
    if job.export.out:
        job.export.out = absolute(job.export.out)
    return job


def run_sft(job: SFTJobConfig) -> SFTResult:
    job = with_absolute_paths(job)
    init_ray(job.ray)
    storage = Storage.from_config(job.storage)
    run_uri = join(job.run.storage_path, job.run.name)
    write_run_info(storage, run_uri, job, job.train.seed)
    records = read_manifest(storage, job.data.manifest)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"] or train
    plan = StepPlan(
        samples=len(train),
        world_size=job.scaling.num_workers,
        batch_size=job.train.batch_size_per_worker,
        grad_accum=job.train.grad_accum,
        epochs=job.train.epochs,
        max_steps=job.train.max_steps,
    )
    plan.check()
    spec = {
        "config": job.model_dump(mode="json"),
        "plan": asdict(plan),
        "run_uri": run_uri,
        "defect_types": defect_types_by_category(train),
    }
    trainer = make_trainer(job, storage, spec, build_datasets(job, storage, train, val, plan))
    result = run_with_progress(f"SFT {job.run.name}", job.run.name, trainer.fit)
    checkpoint = chosen_checkpoint(result, job.export.checkpoint)
    out_uri = job.export.out or join(run_uri, "export")
    export_uri = ray.get(export_task.remote(job.model_dump(mode="json"), checkpoint, out_uri))
    best = min((m["val_loss"] for _, m in result.best_checkpoints), default=None)
    return SFTResult(run_uri, export_uri, checkpoint.path, plan.total_steps, best)

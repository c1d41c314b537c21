"""The one trainer core that every Ray Train worker of mmrad runs: the SFT workers and
the GRPO learners supply only what their step does.

The core owns, once for both jobs:

- the model: load (hub id, local or object-store directory through the node cache) on rank 0
  only, seed, LoRA, float32 trained weights, activation checkpointing, FSDP sharding
  that broadcasts rank 0's weights (:mod:`mmrad.train.building`); a frozen copy for a
  reference policy;
- AdamW over the trainable parameters and the warm-up + cosine schedule;
- the gradient-accumulated step: gradients synchronised on the last micro-batch only,
  clipped to ``optimizer.max_grad_norm``, then one optimizer and scheduler step;
- checkpoints: DCP shards of the trainable weights and AdamW's moments, the scheduler,
  every rank's RNG, the step and a job-specific ``extra`` state (SFT: data position and
  order; GRPO: the coordinator's state and the prompt ledger), reported to Ray Train;
- the metrics log on rank 0, reopened at the restored step so that rows of steps that
  run again after a resume are not kept twice; the metric names both jobs share;
- the export of trained weights as a Hugging Face directory with ``mmrad.json``.

Both job configs name what the core reads the same way: ``model``, ``lora``,
``learners`` (workers, per-worker resources, FSDP), ``optimizer``, ``schedule``, ``run``
and ``storage`` (see :mod:`mmrad.config`).

Rejected: a base class with abstract ``step`` methods (verl's worker classes). The two
loops differ in what a step is (a slice of an epoch vs a batch fetched from the
coordinator) and when they validate; composition keeps each loop readable top to
bottom, with the core's calls named for what they do.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import ray.train
import torch

from mmrad.storage import Storage, join
from mmrad.train import collective_guard
from mmrad.train.building import build_model
from mmrad.train.checkpoint import load_checkpoint, save_checkpoint
from mmrad.train.distributed import all_max, checkpoint_dir_name, clip_gradients, peak_memory_mb
from mmrad.train.metrics_log import MetricsLog, metrics_dir
from mmrad.train.micro_batches import accumulate_gradients
from mmrad.train.progress import row_poster
from mmrad.train.restore import checkpoint_folder
from mmrad.train.schedule import warmup_cosine

log = logging.getLogger(__name__)
MicroBatch = TypeVar("MicroBatch")


def seed_everything(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's generators: a fresh run is reproducible, and a
    resumed one (which restores each rank's saved states) continues the same streams.
    Python and NumPy draw per rank (``seed + rank``); torch starts from ``seed`` on every
    rank so that the LoRA initialisation agrees before sharding."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def shared_metrics(
    loss: float, grad_norm: float, lr: float, tokens: float, seconds: float
) -> dict[str, float]:
    """What SFT and GRPO both log, under the same names: the training loss (GRPO: policy
    loss plus KL), the gradient norm before clipping, the learning rate, and the tokens
    trained per second of training time (one worker's tokens times the workers)."""
    return {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": lr,
        "perf/tokens_per_s": tokens / max(seconds, 1e-9),
    }


class TrainerCore:
    """One Ray Train worker's model, optimizer, schedule, checkpoints and metrics log.

    ``total_optimizer_steps`` sizes the schedule; ``step`` counts the job's own steps
    (an optimizer step in SFT, a GRPO step of several optimizer steps in GRPO).
    ``with_reference``: also a frozen copy of the starting model (``reference``), sharded
    like the policy. ``patch_head``: the policy carries the auxiliary vision head
    (:mod:`mmrad.train.patch_head`), checkpointed with it.
    After construction ``step`` and ``extra`` hold the restored checkpoint's state (0 and
    ``{}`` in a fresh run)."""

    def __init__(
        self,
        job,
        run_uri: str,
        total_optimizer_steps: int,
        *,
        with_reference: bool = False,
        patch_head: bool = False,
    ):
        from mmrad.model.loading import resolve_model_path

        collective_guard.install()
        self.job = job
        self.run_uri = run_uri
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.on_gpu = job.learners.use_gpu
        self.device = ray.train.torch.get_device()
        self.storage = Storage.from_config(job.storage)
        seed_everything(job.schedule.seed, self.rank)
        self.model_path = resolve_model_path(job.model.path, self.storage, job.model.cache_dir)
        self.trains_adapter = job.lora.enabled
        self.model = build_model(
            job, self.model_path, self.device, self.rank, patch_head=patch_head
        )
        self.reference = None  # built before the restore: loading must not shift the RNG
        if with_reference:
            self.reference = build_model(
                job, self.model_path, self.device, self.rank, trainable=False
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=job.optimizer.lr, weight_decay=job.optimizer.weight_decay
        )
        schedule = job.schedule
        self.scheduler = warmup_cosine(
            self.optimizer, total_optimizer_steps, schedule.warmup_ratio, schedule.min_lr_ratio
        )
        self.step, self.extra = self.restore()
        self.metrics: MetricsLog | None = None
        if self.rank == 0:
            scratch = Path(tempfile.mkdtemp(prefix="mmrad-metrics-"))
            self.metrics = MetricsLog(
                metrics_dir(run_uri, scratch), run_uri, self.storage, resume_step=self.step,
                tensorboard="tensorboard" in job.run.loggers, on_row=row_poster(job.run),
            )  # fmt: skip

    # -- the accumulated step -------------------------------------------------------------

    def accumulate(
        self,
        weighted: Sequence[tuple[MicroBatch, float]],
        loss_of: Callable[[MicroBatch], torch.Tensor],
    ) -> float:
        """Backward ``weight x loss_of(micro)`` of every ``(micro, weight)`` pair (the
        same count on every rank, see :mod:`mmrad.train.micro_batches`), then one
        optimizer step; returns the gradient norm before clipping."""
        self.model.train()
        accumulate_gradients(self.model, weighted, loss_of)
        return self.optimizer_step()

    def optimizer_step(self) -> float:
        norm = clip_gradients(
            self.model, self.params, self.job.optimizer.max_grad_norm,
            self.job.learners.fsdp.version,
        )  # fmt: skip
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def peak_memory_mb(self) -> float:
        """Collective: the largest peak memory of any worker."""
        return all_max(peak_memory_mb(self.on_gpu))

    # -- checkpoints ----------------------------------------------------------------------

    def restore(self) -> tuple[int, dict[str, Any]]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, {}
        local_rank = ray.train.get_context().get_local_rank()
        with checkpoint_folder(checkpoint, local_rank) as folder:
            step, extra = load_checkpoint(
                folder, self.model, self.optimizer, self.scheduler, self.rank,
                self.trains_adapter,
            )  # fmt: skip
        log.info("rank %d resumed at step %d", self.rank, step)
        return step, extra

    def save(self, step: int, extra: dict[str, Any], reported: dict[str, Any]) -> None:
        """Collective: checkpoint ``step`` with the job's ``extra`` state (rank 0's is
        kept) and report it, with ``reported`` metrics, to Ray Train."""
        with tempfile.TemporaryDirectory(prefix="mmrad-ckpt-") as folder:
            save_checkpoint(
                Path(folder), self.model, self.optimizer, self.scheduler, step, extra,
                self.rank, self.trains_adapter,
            )  # fmt: skip
            if self.metrics:
                self.metrics.sync()
            ray.train.report(
                {"step": step, **reported},
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_dir_name(step),
            )

    # -- metrics and export ----------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.log(step, metrics)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()

    def export(
        self, state: dict[str, torch.Tensor], out_uri: str, prompt, extra: dict, knowledge: dict
    ) -> str:
        """Rank 0: ``state`` (the trainable weights, unsharded) over the base model as an
        HF directory with ``mmrad.json`` (LoRA merged); returns the export's URI."""
        from mmrad.config import LoraConfig
        from mmrad.model.export import export_state_dict

        job = self.job
        return export_state_dict(
            state, self.model_path, out_uri, self.storage,
            lora=job.lora if self.trains_adapter else LoraConfig(enabled=False),
            merge_lora=True, prompt=prompt, pixels=job.model.pixels,
            base_model=job.model.path, extra=extra, dtype=job.model.dtype, knowledge=knowledge,
        )  # fmt: skip


def make_torch_trainer(
    train_fn: Callable[[dict], None],
    job,
    spec: dict[str, Any],
    *,
    datasets: dict | None = None,
    callbacks: Sequence = (),
    best_by: str | None = None,
    unrecoverable: Callable[[], str | None] | None = None,
):
    """The ``TorchTrainer`` (Train V2) of a training job: ``learners`` workers with their
    resources, in one placement group (:mod:`mmrad.placement`); checkpoints under
    ``run.storage_path/run.name`` (local or object store), ``run.num_to_keep`` of them
    (the lowest ``best_by`` metric first, else the newest), ``run.max_failures`` restarts,
    none for a failure that a restart cannot fix (:mod:`mmrad.train.fail_fast`; its
    ``unrecoverable()`` names one); run it with :func:`mmrad.train.fail_fast.fit`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mmrad.placement import learner_shape, placement_strategy
    from mmrad.train.fail_fast import StopUnrecoverable

    learners = job.learners
    filesystem, path = Storage.from_config(job.storage).arrow_filesystem(job.run.storage_path)
    keep = CheckpointConfig(num_to_keep=job.run.num_to_keep)
    if best_by:
        keep = CheckpointConfig(
            num_to_keep=job.run.num_to_keep,
            checkpoint_score_attribute=best_by,
            checkpoint_score_order="min",
        )
    return TorchTrainer(
        train_fn,
        train_loop_config=spec,
        scaling_config=ScalingConfig(
            num_workers=learners.num_workers,
            use_gpu=learners.use_gpu,
            resources_per_worker=learner_shape(job.ray, learners),
            placement_strategy=placement_strategy(learners.placement),
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=keep,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            callbacks=[*callbacks, StopUnrecoverable(unrecoverable)],
        ),
        datasets=datasets or {},
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def checkpoint_uri(run_uri: str, checkpoint) -> str:
    """A Ray Train checkpoint of the run at ``run_uri`` as a URI (Ray's own path drops the
    URI's scheme: ``s3://``, ``gs://``, ...)."""
    return join(run_uri, PurePosixPath(checkpoint.path).name)

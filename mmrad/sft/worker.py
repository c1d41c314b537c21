"""The SFT train function that runs in every Ray Train worker.

Each worker reads its own ordered dataset (``train_e<epoch>_r<rank>``), skips the
positions a restored checkpoint already covers, and runs the same number of optimizer
steps as every other rank. A checkpoint records which sample ids each committed step
trained on, so a resumed run can be checked against an uninterrupted one.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from mmrad.config import SFTJobConfig
from mmrad.data.loading import SkipLog
from mmrad.sft.plan import StepPlan
from mmrad.storage import Storage
from mmrad.task.prompt import PromptVariant
from mmrad.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from mmrad.train.distributed import (
    all_max,
    all_sum,
    checkpoint_dir_name,
    clip_gradients,
    peak_memory_mb,
    to_device,
)
from mmrad.train.metrics_log import MetricsLog, metrics_dir
from mmrad.train.progress import report_progress
from mmrad.train.schedule import warmup_cosine
from mmrad.train.sharding import shard_model

log = logging.getLogger(__name__)


def build_model(job: SFTJobConfig, device: torch.device):
    from mmrad.model.loading import load_model, load_processor, resolve_model_path
    from mmrad.model.lora import apply_lora

    storage = Storage.from_config(job.storage)
    path = resolve_model_path(job.model.path, storage, job.model.cache_dir)
    processor = load_processor(path, job.model.pixels)
    model = load_model(path, job.model.dtype)
    torch.manual_seed(job.train.seed)  # identical LoRA init on every rank before sharding
    model = apply_lora(model, job.lora).to(device)
    return model, processor


def micro_batches(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def gather_ids(ids: list[str]) -> list[str]:
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, ids)
    return [sample_id for rank_ids in gathered for sample_id in rank_ids]


class SFTLoop:
    def __init__(self, spec: dict[str, Any]):
        self.job = SFTJobConfig.model_validate(spec["config"])
        self.plan = StepPlan(**spec["plan"])
        self.run_uri: str = spec["run_uri"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.on_gpu = self.job.scaling.use_gpu
        self.device = ray.train.torch.get_device()
        self.only_trainable = self.job.lora.enabled
        model, processor = build_model(self.job, self.device)
        self.model = shard_model(model, self.job.fsdp, self.on_gpu)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        train = self.job.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train.lr, weight_decay=train.weight_decay
        )
        self.scheduler = warmup_cosine(
            self.optimizer, self.plan.total_steps, train.warmup_ratio, train.min_lr_ratio
        )
        from mmrad.model.collate import SFTCollator

        variant = PromptVariant(**self.job.prompt.model_dump())
        self.collate = SFTCollator(processor, variant, defect_types=spec["defect_types"])
        self.skips = SkipLog()
        self.state = self.restore()
        self.val_batches = self.load_val_batches()
        self.metrics = None
        if self.rank == 0:
            scratch = Path(tempfile.mkdtemp(prefix="mmrad-metrics-"))
            self.metrics = MetricsLog(
                metrics_dir(self.run_uri, scratch),
                self.run_uri,
                Storage.from_config(self.job.storage),
            )

    # -- state ---------------------------------------------------------------------------

    def restore(self) -> TrainerState:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainerState()
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(
                Path(folder), self.model, self.optimizer, self.scheduler, self.rank,
                self.only_trainable,
            )  # fmt: skip
        log.info("rank %d resumed at step %d (epoch %d)", self.rank, state.step, state.epoch)
        return state

    def save(self, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="mmrad-ckpt-") as folder:
            save_checkpoint(
                Path(folder), self.model, self.optimizer, self.scheduler, self.state,
                self.rank, self.only_trainable,
            )  # fmt: skip
            if self.metrics:
                self.metrics.sync()
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_dir_name(self.state.step),
            )

    # -- data ----------------------------------------------------------------------------

    def load_val_batches(self) -> list[dict[str, Any]]:
        rows = list(self.skips.usable_rows(ray.train.get_dataset_shard("val").iter_rows()))
        size = self.job.train.batch_size_per_worker
        # Collating checks image tokens against image features for every sample.
        return [self.collate(chunk) for chunk in micro_batches(iter(rows), size)]

    def epoch_rows(self) -> Iterator[dict]:
        """This rank's rows of the current epoch that no committed step has used."""
        shard = ray.train.get_dataset_shard(f"train_e{self.state.epoch}_r{self.rank}")
        start = self.plan.start_position(self.state.step_in_epoch)
        end = self.plan.steps_per_epoch * self.plan.per_step
        for row in shard.iter_rows():
            if start <= row["position"] < end:
                yield row

    # -- steps ---------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        batch = to_device(batch, self.device)
        batch.pop("sample_ids", None)
        tokens = int(batch["attention_mask"].sum())
        return self.model(**batch).loss, tokens

    def train_step(self, step_rows: list[dict]) -> dict[str, float]:
        self.model.train()
        accum = self.job.train.grad_accum
        chunks = list(micro_batches(iter(step_rows), self.job.train.batch_size_per_worker))
        ids, losses, tokens = [], [], 0
        for index, chunk in enumerate(chunks):
            usable = list(self.skips.usable_rows(chunk))
            weight = 1.0 / accum
            if usable:
                batch = self.collate(usable)
                ids.extend(batch["sample_ids"])
            else:  # keep the collectives in step with the other ranks; learn nothing
                batch, weight = self.val_batches[0], 0.0
            if self.job.fsdp.version == 2 and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(index == len(chunks) - 1)
            loss, batch_tokens = self.forward_loss(batch)
            (loss * weight).backward()
            if weight:
                losses.append(float(loss.detach()))
                tokens += batch_tokens
        grad_norm = clip_gradients(
            self.model, self.params, self.job.train.max_grad_norm, self.job.fsdp.version
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        committed = gather_ids(ids)
        self.state.trained_ids.extend(committed)
        self.state.step += 1
        self.state.step_in_epoch += 1
        mean_loss = all_sum(sum(losses)) / max(1.0, all_sum(len(losses)))
        return {"loss": mean_loss, "grad_norm": grad_norm, "tokens": all_sum(tokens),
                "samples": len(committed)}  # fmt: skip

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        losses = [float(self.forward_loss(batch)[0]) for batch in self.val_batches]
        return sum(losses) / max(1, len(losses))

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        train = self.job.train
        window = {"loss": 0.0, "tokens": 0.0, "samples": 0, "steps": 0, "time": time.time()}
        while self.state.step < self.plan.total_steps:
            rows = self.epoch_rows()
            per_rank_step = train.batch_size_per_worker * train.grad_accum
            for step_rows in micro_batches(rows, per_rank_step):
                out = self.train_step(step_rows)
                for key in ("loss", "tokens", "samples"):
                    window[key] += out[key]
                window["steps"] += 1
                step = self.state.step
                if step % train.log_every == 0 or step == self.plan.total_steps:
                    self.log_window(step, window, out["grad_norm"])
                if step % train.checkpoint_every == 0 or step == self.plan.total_steps:
                    self.checkpoint(step)
                elif step % train.val_every == 0:
                    self.log_validation(step)
                if step >= self.plan.total_steps:
                    break
            if self.state.step_in_epoch >= self.plan.steps_per_epoch:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
        if self.metrics:
            self.metrics.log(self.state.step, {"skipped_images": len(self.skips.skipped)})
            self.metrics.close()

    def log_window(self, step: int, window: dict, grad_norm: float) -> None:
        elapsed = max(1e-9, time.time() - window["time"])
        metrics = {
            "train/loss": window["loss"] / max(1, window["steps"]),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": window["tokens"] / elapsed,
            "perf/samples_per_s": window["samples"] / elapsed,
            "train/epoch": self.state.epoch,
            "perf/peak_memory_mb_per_worker": all_max(peak_memory_mb(self.on_gpu)),
        }
        if self.metrics:
            self.metrics.log(step, metrics)
        if self.rank == 0:
            summary = f"loss {metrics['train/loss']:.3f} lr {metrics['train/lr']:.2e}"
            report_progress(self.job.run.name, step, self.plan.total_steps, summary)
        window.update(loss=0.0, tokens=0.0, samples=0, steps=0, time=time.time())

    def log_validation(self, step: int) -> float:
        val_loss = self.validation_loss()
        if self.metrics:
            self.metrics.log(step, {"val/loss": val_loss})
        if self.state.best_val_loss is None or val_loss < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = val_loss, step
        return val_loss

    def checkpoint(self, step: int) -> None:
        val_loss = self.log_validation(step)
        self.save({"step": step, "val_loss": val_loss, "epoch": self.state.epoch})


def sft_worker(spec: dict[str, Any]) -> None:
    """Ray Train entry point."""
    SFTLoop(spec).run()

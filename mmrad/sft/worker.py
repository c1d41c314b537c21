"""The SFT step and loop that run in every Ray Train worker, on the trainer core.

Each worker reads its own ordered dataset (``train_e<epoch>_r<rank>``), skips the
positions a restored checkpoint already covers, and runs the same number of optimizer
steps as every other rank. A checkpoint records which sample ids each committed step
trained on and the data order they follow, so a resumed run continues exactly where the
interrupted one stopped, or refuses when the order changed.

Bad images are judged on the whole split, not per rank: every step gathers the ids each
rank skipped, so all ranks stop together once ``data.max_bad_fraction`` is exceeded.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from mmrad.config import SFTJobConfig
from mmrad.data import idle_wait
from mmrad.data.loading import BadImageBudget, SkipLog
from mmrad.sft.plan import DataOrder, SFTProgress, StepPlan, check_data_order
from mmrad.task.knowledge import parse_knowledge
from mmrad.task.prompt import PromptVariant
from mmrad.train.core import TrainerCore, shared_metrics
from mmrad.train.distributed import all_sum, to_device
from mmrad.train.micro_batches import by_token_budget, same_count, step_weights
from mmrad.train.patch_head import patch_head_of, patch_loss
from mmrad.train.progress import report_progress
from mmrad.train.token_logprobs import LOGP, ScoredTokens, score_tokens

NOT_MODEL_INPUTS = ("labels", "sample_ids", "patch_targets")
"""Batch keys that the loss reads and the model's forward never sees."""


def micro_batches(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def gather_step(ids: list[str], skipped: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Every rank's trained ids (in rank order) and skipped bad images of one step, in one
    collective."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ids, skipped))
    all_ids = [sample_id for rank_ids, _ in gathered for sample_id in rank_ids]
    all_skipped = {k: v for _, rank_skipped in gathered for k, v in rank_skipped.items()}
    return all_ids, all_skipped


class SFTLoop:
    def __init__(self, spec: dict[str, Any]):
        from mmrad.model.collate import SFTCollator
        from mmrad.model.loading import load_processor

        self.job = SFTJobConfig.model_validate(spec["config"])
        self.plan = StepPlan(**spec["plan"])
        self.patch_weight = self.job.objective.patch_loss
        self.core = TrainerCore(self.job, spec["run_uri"], self.plan.total_steps,
                                patch_head=self.patch_weight > 0)  # fmt: skip
        self.patch_head = patch_head_of(self.core.model)
        self.progress = SFTProgress(**self.core.extra)
        self.order = DataOrder(**spec["data_order"])
        check_data_order(self.progress.data_order, self.order, f"run {spec['run_uri']}")
        self.progress.data_order = asdict(self.order)
        self.progress.next_epoch_if_done(self.plan.steps_per_epoch)  # restored at its end
        processor = load_processor(self.core.model_path, self.job.model.pixels)
        variant = PromptVariant(**self.job.prompt.variant_dict())
        knowledge = parse_knowledge(spec["knowledge"], "the job's knowledge")
        self.collate = SFTCollator(processor, variant, knowledge=knowledge,
                                   patch_targets=self.patch_head is not None)  # fmt: skip
        self.skips = SkipLog(self.bad_image_budget(self.plan.samples, "train records"))
        idle_wait.install()  # this process iterates its shards
        # Every rank reads the whole val set, so every rank judges its bad images alike.
        val_rows = list(ray.train.get_dataset_shard("val").iter_rows())
        self.val_skips = SkipLog(self.bad_image_budget(len(val_rows), "val records"))
        self.val_batches = self.collate_val(val_rows)

    # -- data ----------------------------------------------------------------------------

    def bad_image_budget(self, total: int, what: str) -> BadImageBudget:
        data = self.job.data
        return BadImageBudget(data.max_bad_fraction, total, data.manifest, what)

    def collate_val(self, rows: list[dict]) -> list[dict[str, Any]]:
        usable = self.val_skips.usable_rows(rows)
        size = self.job.learners.micro_batch_size
        # Collating checks image tokens against image features for every sample.
        return [self.collate(chunk) for chunk in micro_batches(usable, size)]

    def epoch_rows(self) -> Iterator[dict]:
        """This rank's rows of the current epoch that no committed step has used."""
        shard = ray.train.get_dataset_shard(f"train_e{self.progress.epoch}_r{self.core.rank}")
        start = self.plan.start_position(self.progress.step_in_epoch)
        end = self.plan.steps_per_epoch * self.plan.per_step
        for row in shard.iter_rows():
            if start <= row["position"] < end:
                yield row

    # -- steps ---------------------------------------------------------------------------

    def token_nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed negative log-likelihood of the batch's label tokens, and their
        count (log-probs a chunk of tokens at a time: no full-vocabulary logits)."""
        batch = to_device(batch, self.core.device)
        tokens = ScoredTokens.from_labels(batch["labels"])
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
        stats = score_tokens(
            self.core.model, inputs, tokens, self.job.learners.logprob_chunk_tokens
        )
        return -stats[:, LOGP].sum(), len(tokens)

    def micro_batches_of(self, usable: list[dict]) -> list[dict[str, Any]]:
        """This rank's usable rows of a step as micro-batches (by the token budget)."""
        samples = [self.collate.encode(row) for row in usable]
        learners = self.job.learners
        groups = by_token_budget(
            [len(s.input_ids) for s in samples], learners.micro_batch_size,
            learners.micro_batch_tokens,
        )  # fmt: skip
        return [
            self.collate.batch([samples[i] for i in group], [str(usable[i]["id"]) for i in group])
            for group in groups
        ]

    def train_step(self, step_rows: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's rows: the mean negative log-likelihood
        over every label token of every rank."""
        step_skips = SkipLog()
        batches = self.micro_batches_of(list(step_skips.usable_rows(step_rows)))
        label_tokens = [len(ScoredTokens.from_labels(b["labels"])) for b in batches]
        # A filler keeps the collectives in step with the other ranks; it learns nothing.
        weighted = same_count(batches, step_weights(label_tokens), self.val_batches[0])
        ids = [sample_id for batch in batches for sample_id in batch["sample_ids"]]
        real, nll_sum, patch_sum = {id(batch) for batch in batches}, 0.0, 0.0

        def loss_of(batch: dict[str, Any]) -> torch.Tensor:
            nonlocal nll_sum, patch_sum
            nll, count = self.token_nll(batch)
            loss = nll / max(count, 1)
            if self.patch_head is not None:
                patch = patch_loss(self.patch_head, batch["patch_targets"])
                loss = loss + self.patch_weight * patch
                if id(batch) in real:
                    patch_sum += float(patch.detach())
            if id(batch) in real:
                nll_sum += float(nll.detach())
            return loss

        grad_norm = self.core.accumulate(weighted, loss_of)
        committed, skipped = gather_step(ids, step_skips.skipped)
        self.skips.add(skipped)  # every rank sees the same skips, so all raise together
        self.progress.trained_ids.extend(committed)
        self.core.step += 1
        self.progress.step_in_epoch += 1
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        out = {"loss": all_sum(nll_sum) / max(1.0, all_sum(sum(label_tokens))),
               "grad_norm": grad_norm, "tokens": all_sum(tokens),
               "samples": len(committed)}  # fmt: skip
        if self.patch_head is not None:  # the mean over every rank's micro-batches
            out["patch_loss"] = all_sum(patch_sum) / max(1.0, all_sum(len(batches)))
        return out

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean negative log-likelihood per label token of this rank's val samples."""
        self.core.model.eval()
        nll_sum, count = 0.0, 0
        for batch in self.val_batches:
            nll, tokens = self.token_nll(batch)
            nll_sum, count = nll_sum + float(nll), count + tokens
        return nll_sum / max(1, count)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        schedule, total = self.job.schedule, self.plan.total_steps
        window = {"loss": 0.0, "patch_loss": 0.0, "tokens": 0.0, "samples": 0, "steps": 0,
                  "time": time.time()}  # fmt: skip
        while self.core.step < total:
            per_rank_step = self.job.learners.micro_batch_size * self.job.learners.grad_accum
            for step_rows in micro_batches(self.epoch_rows(), per_rank_step):
                out = self.train_step(step_rows)
                for key in ("loss", "patch_loss", "tokens", "samples"):
                    window[key] += out.get(key, 0.0)
                window["steps"] += 1
                step = self.core.step
                if step % schedule.log_every == 0 or step == total:
                    self.log_window(step, window, out["grad_norm"])
                if step % schedule.checkpoint_every == 0 or step == total:
                    self.checkpoint(step)
                elif step % self.job.validation.every == 0:
                    self.log_validation(step)
                if step >= total:
                    break
            self.progress.next_epoch_if_done(self.plan.steps_per_epoch)
        skipped = self.skips.skipped.keys() | self.val_skips.skipped.keys()
        self.core.log(self.core.step, {"skipped_images": len(skipped)})
        self.core.close()

    def log_window(self, step: int, window: dict, grad_norm: float) -> None:
        elapsed = max(1e-9, time.time() - window["time"])
        loss = window["loss"] / max(1, window["steps"])
        metrics = shared_metrics(loss, grad_norm, self.core.lr, window["tokens"], elapsed)
        metrics.update({
            "perf/samples_per_s": window["samples"] / elapsed,
            "perf/samples": window["samples"],  # trained in this window, all workers
            "perf/tokens": window["tokens"],
            "train/epoch": self.progress.epoch,
            "perf/peak_memory_mb_per_worker": self.core.peak_memory_mb(),
        })  # fmt: skip
        if self.patch_head is not None:
            metrics["train/patch_loss"] = window["patch_loss"] / max(1, window["steps"])
        self.core.log(step, metrics)
        if self.core.rank == 0:
            summary = f"loss {loss:.3f} lr {metrics['train/lr']:.2e}"
            report_progress(self.job.run.name, step, self.plan.total_steps, summary)
        window.update(loss=0.0, patch_loss=0.0, tokens=0.0, samples=0, steps=0, time=time.time())

    def log_validation(self, step: int) -> float:
        val_loss = self.validation_loss()
        self.core.log(step, {"val/loss": val_loss})
        if self.progress.best_val_loss is None or val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss, self.progress.best_step = val_loss, step
        return val_loss

    def checkpoint(self, step: int) -> None:
        val_loss = self.log_validation(step)
        reported = {"val_loss": val_loss, "epoch": self.progress.epoch}
        self.core.save(step, asdict(self.progress), reported)


def sft_worker(spec: dict[str, Any]) -> None:
    """Ray Train entry point."""
    SFTLoop(spec).run()

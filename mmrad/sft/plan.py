"""How many optimizer steps an epoch has and which positions a step consumes.

Every rank must run the same number of steps (FSDP's collectives would hang otherwise),
so an epoch has ``floor(N / (world_size * batch * accum))`` steps and the few positions
left over are not used that epoch. Positions are dealt round-robin (see
``mmrad.data.loading``), so after ``k`` steps of an epoch exactly the global positions
``< k * world_size * batch * accum`` have been consumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS_READ = {"train": "SFT trains on it", "val": "SFT's validation loss"}
"""The splits SFT reads, each with what it is for (no setting chooses them); the pipeline
checks them before any training."""


@dataclass(frozen=True)
class StepPlan:
    samples: int
    world_size: int
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None = None

    @property
    def per_step(self) -> int:
        """Positions one optimizer step consumes, all ranks together."""
        return self.world_size * self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.per_step

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def start_position(self, step_in_epoch: int) -> int:
        return step_in_epoch * self.per_step

    def rank_rows_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size * self.grad_accum

    def check(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.samples} training samples cannot fill one step of {self.per_step} "
                f"({self.world_size} workers x batch {self.batch_size} x accum "
                f"{self.grad_accum}); lower learners.micro_batch_size or learners.grad_accum"
            )


@dataclass(frozen=True)
class DataOrder:
    """What decides which samples each step trains on. A checkpoint records it; a run
    under another order would skip or repeat samples, so resuming under one refuses."""

    seed: int
    manifest: str  # fingerprint of the training records
    world_size: int
    micro_batch_size: int
    grad_accum: int

    def changes_from(self, saved: Mapping[str, Any]) -> list[str]:
        """``"key saved -> now"`` for each field that differs from a saved order."""
        return [
            f"{key} {saved.get(key)!r} -> {value!r}"
            for key, value in asdict(self).items()
            if saved.get(key) != value
        ]


class DataOrderError(ValueError):
    """A run would resume under another data order than its checkpoint's."""


def check_data_order(saved: Mapping[str, Any] | None, now: DataOrder, where: str) -> None:
    if saved is None:
        return
    changed = now.changes_from(saved)
    if changed:
        raise DataOrderError(
            f"{where}: the checkpoint was trained in another data order ({'; '.join(changed)}); "
            "resuming would skip or repeat samples. Rerun with the checkpoint's settings, or "
            "start a new run (another run.name)"
        )


def records_fingerprint(records: Sequence[Mapping[str, Any]]) -> str:
    """A digest of the training records (by id) and everything a sample is made from."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r["id"]):
        fields = {key: record.get(key) for key in FINGERPRINT_FIELDS}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


FINGERPRINT_FIELDS = ("id", "image_uri", "reference_uri", "is_anomalous", "boxes", "labels",
                      "defect_type", "reasoning", "category")  # fmt: skip


@dataclass
class SFTProgress:
    """SFT's own checkpoint state: where in the data it stands, the best validation so
    far, the sample ids of every committed step (all ranks, in commit order) and the
    data order they follow."""

    epoch: int = 0
    step_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    trained_ids: list[str] = field(default_factory=list)
    data_order: dict[str, Any] | None = None

    def next_epoch_if_done(self, steps_per_epoch: int) -> None:
        """Move to the next epoch once this one's steps are done. A checkpoint taken after
        an epoch's last step still names that epoch: a resume starts with the next."""
        if self.step_in_epoch >= steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

"""How many optimizer steps an epoch has and which positions a step consumes.

Every rank must run the same number of steps (FSDP's collectives would hang otherwise),
so an epoch has ``floor(N / (world_size * batch * accum))`` steps and the few positions
left over are not used that epoch. Positions are dealt round-robin (see
``mmrad.data.loading``), so after ``k`` steps of an epoch exactly the global positions
``< k * world_size * batch * accum`` have been consumed.
"""

from __future__ import annotations

from dataclasses import dataclass


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
                f"{self.grad_accum}); lower train.batch_size_per_worker or grad_accum"
            )

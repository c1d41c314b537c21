"""The sweep job's config (``mmrad tune`` / ``python -m ray_jobs.tune``).

A sweep runs a short GRPO per trial, from one GRPO config file plus overrides (the shared
SFT export is its ``model.path``), with the trial's values of ``search_space`` set on it
and in-run validation switched on; ``objective`` names the validation rates summed into
``val/objective``, the metric Tune maximises and ASHA compares trials on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mmrad.config import (
    PathField,
    RayConfig,
    Section,
    StageConfig,
    StorageConfig,
    TrackedRunSection,
    apply_overrides,
    read_yaml,
    validate_config,
)
from mmrad.rl.config import GRPOJobConfig
from mmrad.task.metrics import RATE_KEYS, check_rate_names
from mmrad.tune.space import Dimension, apply_params

OBJECTIVE_METRIC = "val/objective"


class SchedulerSection(Section):
    """Early stopping on the trials' validation results."""

    kind: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early.")
    grace_period: int = Field(1, ge=1, description="Validations before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1/this per rung.")


class TrialSection(Section):
    cpus: float = Field(
        0.1,
        gt=0,
        description="CPUs held by a trial's own process (its engines and learners hold theirs).",
    )
    max_failures: int = Field(0, ge=0, description="Retries of a failed trial.")
    reuse_engines: bool = Field(
        True,
        description=(
            "Keep a trial's vLLM engines for the next trial on its process (Tune reuses "
            "the trial actor), reset to the starting weights. A trial that ASHA stops "
            "ends its GRPO run first (at its learners' next batch)."
        ),
    )


class TuneRunSection(TrackedRunSection):
    storage_path: str = PathField("runs/tune", "Local folder or s3:// prefix.")
    name: str = Field("sweep-tiny", description="Sweep name: rerunning it resumes the sweep.")


class TuneJobConfig(Section):
    """`mmrad tune` / `python -m ray_jobs.tune`."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    grpo: StageConfig = Field(
        default_factory=lambda: StageConfig(config="configs/local/grpo.yaml"),
        description="Each trial's GRPO job: its config file plus overrides.",
    )
    search_space: dict[str, Dimension] = Field(
        default_factory=dict, description="Dotted GRPO config key -> distribution."
    )
    objective: list[str] = Field(
        default_factory=lambda: ["det_accuracy", "loc_accuracy"],
        min_length=1,
        description=f"Validation rates summed into {OBJECTIVE_METRIC}, of {list(RATE_KEYS)}.",
    )
    validate_every: int = Field(
        1, ge=1, description="GRPO steps between a trial's validations (ASHA's time unit)."
    )
    val_samples: int = Field(16, ge=1, description="Validation records per validation.")
    num_samples: int = Field(4, ge=1, description="Trials (times each grid point).")
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial: TrialSection = Field(default_factory=TrialSection)
    seed: int = Field(0, description="Seeds the sampling of the search space.")
    run: TuneRunSection = Field(default_factory=TuneRunSection)

    @model_validator(mode="after")
    def _space_and_objective(self) -> TuneJobConfig:
        if not self.search_space:
            raise ValueError("search_space: give at least one key to sweep")
        check_rate_names(self.objective)
        return self


def trial_base(job: TuneJobConfig) -> dict[str, Any]:
    """The GRPO config every trial starts from (file + overrides + validation on), as a
    dict; checked with a representative point of the search space, so a misspelt key or
    an impossible value fails before Ray starts."""
    data = read_yaml(job.grpo.config) if job.grpo.config else {}
    data = apply_overrides(data, job.grpo.overrides)
    data["validation"] = {
        **data.get("validation", {}),
        "every": job.validate_every,
        "samples": job.val_samples,
        "objective": list(job.objective),
    }
    origin = f"grpo.config {job.grpo.config}"
    base = validate_config(GRPOJobConfig, data, origin).model_dump(mode="json")
    for key, dimension in job.search_space.items():
        point = apply_params(base, {key: dimension.example()})
        validate_config(GRPOJobConfig, point, f"search_space.{key}={dimension.example()!r}")
    return base

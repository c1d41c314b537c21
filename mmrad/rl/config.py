"""The GRPO job's config (``mmrad grpo`` / ``python -m ray_jobs.grpo``): one section per
part of the loop, every knob in ``configs/local/grpo.yaml``.

Cross-field rules are checked here, before any resource starts: a step's samples must
split evenly over learners and mini-batches; ``sync.weights: lora`` trains a LoRA adapter
(and the rollout engines serve it), ``sync.weights: full`` trains and ships every weight
(``lora.enabled`` follows it); ``sync.transport`` picks how new weights reach the rollout
engines (:meth:`SyncSection.resolved_transport`); reward weights and parameters must name
registered reward components. ``sync`` was once a scalar (``sync: full``): that form is
refused with the section to write instead.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mmrad.config import (
    TRAINING_RENAMES,
    DataLoadConfig,
    EngineConfig,
    LearnersConfig,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    PathField,
    PromptOverrides,
    RayConfig,
    RunSection,
    ScheduleConfig,
    Section,
    StorageConfig,
    check_same_grid,
    null_is_no_overrides,
)
from mmrad.task.metrics import RATE_KEYS, check_rate_names

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


LAST_STEP = "last_step"
"""Each of a GRPO run's reports to Ray Train (and Tune) carries its last step under this
key: a sweep's scheduler lets that step finish (:mod:`mmrad.tune.scheduler`)."""


class GRPODataConfig(DataLoadConfig):
    """Prompts: records of one split, in a per-epoch order fixed by ``seed``."""

    split: Literal["train", "val", "test"] = Field("train", description="Split to prompt from.")
    decode_cpus: float = Field(
        0.25,
        gt=0,
        description="CPUs per Ray Data decode task (small: engines and learners hold most).",
    )
    decode_tasks: int = Field(
        2,
        ge=1,
        description="Decode tasks in flight at once (a step needs a batch or two; uncapped, "
        "Ray Data starts as many as the CPUs allow, each in a worker process of its own).",
    )


class GRPOModelConfig(ModelConfig):
    path: str = PathField(
        "runs/sft/sft-tiny/export",
        "The SFT export (HF dir + mmrad.json, LoRA merged) GRPO starts from.",
        "local_or_hub",
    )


class RolloutSection(Section):
    """The vLLM rollout pool and what it samples."""

    num_workers: int = Field(1, ge=1, description="vLLM engines (Ray actors).")
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per engine (tensor parallel: >1).")
    max_retries: int = Field(3, ge=0, description="Replacements of a dead engine per batch.")
    group_size: int = Field(4, ge=2, description="G: samples per prompt.")
    prompts_per_step: int = Field(4, ge=1, description="Groups in one training batch.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (learner uses it too).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, description="Longest completion.")


class RewardSection(Section):
    """The reward: a preset of ``mmrad.task.rewards.REWARD_PRESETS`` with the weights and
    parameters given here on top: a weight given replaces the preset's for its component
    (the preset's others stay; 0 switches one off), parameters merge per component, key by
    key (e.g. ``params: {missed_boxes: {threshold: 0.3}}`` changes that threshold alone).

    ``weights`` and ``params`` keep what the config gave, so a dumped config (a run's
    config.yaml, a sweep's best_grpo.yaml) still says "the preset plus these", and a
    changed ``preset`` applies whole; :meth:`resolved` is the reward that runs. Weights or
    params without a ``preset`` are refused: a config written before presets meant other
    defaults (the ``legacy`` preset's)."""

    preset: Literal["paper", "legacy", "none"] = Field(
        "paper",
        description="paper: format + 1 for the right decision - 0.2 per ground-truth box "
        "missed at the metric's IoU 0.1, no false-box penalty (MMR-AD's Anomaly-R1); "
        "legacy: the reward before it (format 0.5 + detection + localization: "
        "max(0, 1 - 0.2 x missed - 0.1 x false boxes) at IoU 0.5); none: only the weights "
        "given.",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Total reward = sum(weight * component); each weight given replaces the "
        "preset's for that component.",
    )
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-component parameters (thresholds: IoU >= threshold finds a box; "
        "variants), key by key over the preset's and the component's defaults.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_named(cls, data: Any) -> Any:
        given = isinstance(data, dict) and (data.get("weights") or data.get("params"))
        if given and "preset" not in data:
            raise ValueError(
                "weights or params without a preset: give preset: paper (these on top of the "
                "paper's reward), legacy (the reward before presets, which such configs "
                "meant) or none (these alone)"
            )
        return data

    @model_validator(mode="after")
    def _resolves(self) -> RewardSection:
        self.resolved()  # unknown components and parameters, named
        return self

    def resolved(self) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """The reward that runs: every weight, and every component's parameters."""
        from mmrad.task.rewards import resolve_rewards

        return resolve_rewards(self.preset, self.weights, self.params)


class AlgorithmSection(Section):
    """GRPO's objective and the sampling tricks around it."""

    advantage_scale: Literal["std", "none"] = Field(
        "std", description="std = GRPO; none = Dr. GRPO (mean-centred only)."
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="Ratio clip below 1.")
    clip_high: float = Field(
        0.28, ge=0, description="Ratio clip above 1: 0.2 = GRPO's symmetric clip, 0.28 DAPO's."
    )
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean",
        description="How token losses become one number: token-mean (DAPO: every token "
        "weighs the same), seq-mean-token-mean (GRPO: every completion weighs the same), "
        "seq-mean-token-sum-norm (Dr. GRPO: token sums over norm_length).",
    )
    norm_length: int | None = Field(
        None, ge=1, description="seq-mean-token-sum-norm divisor (default: max_tokens)."
    )
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference.")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator.")
    epochs: int = Field(1, ge=1, description="Passes over each batch.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per pass.")
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling cap on the learner/vLLM probability "
        "ratio (null = off, as in plain GRPO).",
    )
    dynamic_sampling: bool = Field(
        True, description="Drop zero-variance groups and refill (DAPO's dynamic sampling)."
    )
    max_sampling_tries: int = Field(
        3, ge=1, description="Draws per step at most; then zero-variance groups fill the batch."
    )
    contrastive_sampling: bool = Field(
        False,
        description="Give zero-variance groups variance: a ground-truth or adversarial sample.",
    )
    max_staleness: Literal[0, 1] = Field(
        1, description="1 = generate batch t+1 while learners train on t (one step off)."
    )


class SyncSection(Section):
    """What the learners ship to the rollout engines after each step, and how."""

    weights: Literal["lora", "full"] = Field(
        "lora",
        description="Train and ship a LoRA adapter (lora.enabled follows), or every weight.",
    )
    transport: Literal["auto", "collective", "object_store"] = Field(
        "auto",
        description=(
            "How weights reach the rollout engines: collective = a broadcast process group "
            "from learner rank 0 to every engine worker (NCCL on GPUs, gloo on CPUs) in "
            "bounded buckets, LoRA merged; object_store = one Ray object per version, LoRA "
            "as adapter files; auto = collective with FSDP2, object_store with FSDP1."
        ),
    )
    bucket_mb: int = Field(
        256, ge=1, description="Size of one broadcast bucket of the collective transport, in MiB."
    )
    channel_timeout_s: float = Field(
        600.0,
        gt=0,
        description=(
            "Longest wait of the collective transport: for the engines to join a channel "
            "(a replacement engine loads the model first) and for one broadcast. The sender "
            "stops waiting at once when an engine's receive fails."
        ),
    )

    def resolved_transport(self, fsdp_version: int) -> Literal["collective", "object_store"]:
        """The transport in effect: an explicit one as given; ``auto`` = the collective
        channel wherever it works (FSDP2: it streams shards one tensor at a time), on
        CPUs too, where benchmarks/weight_sync.py measured it faster end to end than the
        object store for full weights and for LoRA (merged weights spare vLLM's slow CPU
        LoRA kernels)."""
        if self.transport != "auto":
            return self.transport
        return "collective" if fsdp_version == 2 else "object_store"


class CoordinatorSection(Section):
    """The actor between rollout engines and learners."""

    wait_timeout_s: float = Field(
        1800.0,
        gt=0,
        description=(
            "Longest wait of any coordinator call: learners for a batch, the producer for "
            "the learners' weights; the error names what it waited for. Cover a batch's "
            "generation plus a replacement engine's start, and a learner step with its "
            "validation and checkpoint."
        ),
    )


class GRPOLearnersConfig(LearnersConfig):
    cpus_per_worker: float = Field(0.4, gt=0)


class GRPOOptimizerConfig(OptimizerConfig):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")


class GRPOScheduleConfig(ScheduleConfig):
    """GRPO steps (one batch each); the learning rate is constant after warm-up unless
    ``min_lr_ratio`` < 1."""

    max_steps: int = Field(20, ge=1, description="GRPO steps (one batch each).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of steps warming up.")
    min_lr_ratio: float = Field(
        1.0, ge=0, le=1, description="Cosine floor as a share of lr (1 = constant after warm-up)."
    )
    checkpoint_every: int = Field(10, ge=1)
    log_every: int = Field(1, ge=1)
    sample_table_every: int = Field(5, ge=1, description="Steps between sample tables.")
    sample_table_rows: int = Field(8, ge=1, description="Completions per sample table.")
    sync_check_every: int = Field(
        0,
        ge=0,
        description=(
            "Every N steps compare the engines' log-probs of a probe completion with the "
            "learners' right after the sync (0 = never); a difference above "
            "sync_check_tolerance stops the run."
        ),
    )
    sync_check_tolerance: float = Field(
        0.5,
        gt=0,
        description=(
            "Largest learner-vs-engine log-prob difference (nats, any token of the probe) a "
            "sync check accepts. float32 on CPUs agrees to ~1e-5; bf16 kernels differ by "
            "tenths on long completions."
        ),
    )


class ValidationSection(Section):
    """Greedy answers of the current policy on held-out prompts, scored with the
    evaluation job's metrics (``val/<metric>``) and summed into ``val/objective``: what a
    sweep (``mmrad tune``) optimises and what ASHA compares trials on."""

    every: int = Field(
        0, ge=0, description="Steps between validations (0 = never); the last step is included."
    )
    split: Literal["train", "val", "test"] = Field("val", description="Split to validate on.")
    samples: int = Field(
        16, ge=1, description="Records validated: a fixed spread of the split (by id hash)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_tokens.")
    objective: list[str] = Field(
        default_factory=lambda: ["det_accuracy", "loc_accuracy"],
        min_length=1,
        description=f"Metrics summed into val/objective, of {list(RATE_KEYS)}.",
    )

    @model_validator(mode="after")
    def _known_terms(self) -> ValidationSection:
        check_rate_names(self.objective)
        return self

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == max_steps)


class GRPORunSection(RunSection):
    storage_path: str = PathField("runs/grpo", "Local folder or s3:// prefix.")
    name: str = Field("grpo-tiny", description="Run name (resume key).")


class GRPOExportSection(Section):
    out: str | None = PathField(None, "Default: <storage_path>/<name>/export.")


class GRPOJobConfig(Section):
    """`mmrad grpo` / `python -m ray_jobs.grpo`."""

    renamed_keys: ClassVar[dict[str, str]] = {
        **TRAINING_RENAMES,
        "algorithm.lr": "optimizer.lr",
        "algorithm.weight_decay": "optimizer.weight_decay",
        "algorithm.max_grad_norm": "optimizer.max_grad_norm",
        "algorithm.warmup_ratio": "schedule.warmup_ratio",
    }

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: GRPODataConfig = Field(default_factory=GRPODataConfig)
    model: GRPOModelConfig = Field(default_factory=GRPOModelConfig)
    prompt: PromptOverrides = Field(
        default_factory=PromptOverrides,
        description="Unset keys: the export's mmrad.json (mmrad.model.contract).",
    )

    _null_prompt = field_validator("prompt", mode="before")(null_is_no_overrides)
    sync: SyncSection = Field(default_factory=SyncSection)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    rewards: RewardSection = Field(default_factory=RewardSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    learners: GRPOLearnersConfig = Field(default_factory=GRPOLearnersConfig)
    optimizer: GRPOOptimizerConfig = Field(default_factory=GRPOOptimizerConfig)
    schedule: GRPOScheduleConfig = Field(default_factory=GRPOScheduleConfig)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    run: GRPORunSection = Field(default_factory=GRPORunSection)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    export: GRPOExportSection = Field(default_factory=GRPOExportSection)

    @field_validator("sync", mode="before")
    @classmethod
    def _sync_is_a_section(cls, value: Any) -> Any:
        """The old scalar form (``sync: full``, or the override ``sync=full``) is refused
        with the section to write instead."""
        if isinstance(value, str):
            weights = value if value in ("lora", "full") else "lora|full"
            raise ValueError(
                f'sync is a section now: write "sync: {{weights: {weights}, transport: auto}}" '
                f'(or the override sync.weights={weights}) instead of "sync: {value}"'
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _lora_follows_sync(cls, data: Any) -> Any:
        """``lora.enabled`` follows ``sync.weights`` (and may not contradict it)."""
        if not isinstance(data, dict):
            return data
        sync = data.get("sync")
        if isinstance(sync, SyncSection):
            weights = sync.weights
        elif sync is None:
            weights = "lora"
        elif isinstance(sync, dict):
            weights = sync.get("weights", "lora")
        else:
            return data  # the old scalar form or garbage: the sync field's error says why
        if weights not in ("lora", "full"):
            return data  # the sync.weights field's error names what is allowed
        wants_lora = weights == "lora"
        lora = dict(data.get("lora") or {})
        given = lora.get("enabled")
        if given is not None and bool(given) != wants_lora:
            raise ValueError(
                f"lora.enabled={given} contradicts sync.weights={weights!r}; "
                "sync.weights: lora trains an adapter, sync.weights: full trains every weight"
            )
        lora["enabled"] = wants_lora
        return {**data, "lora": lora}

    @model_validator(mode="after")
    def _consistent(self) -> GRPOJobConfig:
        check_same_grid(self.data.pixels, self.model.pixels)
        samples = self.rollout.prompts_per_step * self.rollout.group_size
        split = self.learners.num_workers * self.algorithm.mini_batches
        if samples % split:
            raise ValueError(
                f"a step's {samples} samples (rollout.prompts_per_step x rollout.group_size) "
                f"must split evenly over learners.num_workers x algorithm.mini_batches = {split}"
            )
        if self.sync.transport == "collective" and self.learners.fsdp.version != 2:
            raise ValueError(
                "sync.transport=collective streams FSDP2 shards one tensor at a time; with "
                "learners.fsdp.version=1 use sync.transport=object_store (or auto)"
            )
        if self.sync.weights == "lora":
            if not self.engine.enable_lora:
                self.engine.enable_lora = True
            if self.engine.max_lora_rank < self.lora.r:
                raise ValueError(
                    f"engine.max_lora_rank {self.engine.max_lora_rank} < lora.r {self.lora.r}"
                )
        return self

    @property
    def batch_samples(self) -> int:
        """Samples in one training batch: prompts per step x G."""
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (epochs x mini-batches per GRPO step)."""
        algorithm = self.algorithm
        return self.schedule.max_steps * algorithm.epochs * algorithm.mini_batches

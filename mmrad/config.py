"""Validated configuration for every mmrad job.

A job's config is a YAML file plus ``key.sub=value`` overrides from the command line.
Everything is checked by pydantic *before* Ray or any other resource starts: an unknown
key or a bad value raises :class:`ConfigError` naming the file, the dotted key and what
is allowed there.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PATH_KINDS = ("local", "local_or_hub")


def PathField(default: Any, description: str, kind: str = "local") -> Any:  # noqa: N802
    """A field holding a local path or an object-store URI. Ray workers do not share the
    driver's working directory, so :func:`with_absolute_paths` makes every such field
    absolute before a job hands its config to workers. ``local_or_hub``: a name that is
    not a local path is a hub id and stays as it is."""
    assert kind in PATH_KINDS
    return Field(default, description=description, json_schema_extra={"path": kind})


def _node_folder(value: str | None) -> str | None:
    if value is not None and not os.path.isabs(os.path.expanduser(value)):
        raise ValueError(f"{value!r} is relative; give an absolute folder that every node has")
    return value


NodeFolder = Annotated[str | None, AfterValidator(_node_folder)]


def NodeCacheField() -> Any:  # noqa: N802
    """The folder each node downloads object-store models into. It is never resolved on the
    driver: each node uses this absolute folder when set, else its own (see
    :func:`mmrad.model.loading.node_cache_dir`)."""
    return Field(
        None,
        description="Where each node keeps object-store model downloads (an absolute folder). "
        "null: $MMRAD_NODE_CACHE where the node sets it, else its Ray temp dir's mmrad-models.",
    )


def with_absolute_paths(config: ConfigT) -> ConfigT:
    """A copy of ``config`` with every :func:`PathField` that names a local path made
    absolute (object-store URIs stay as they are), in every section at any depth."""
    from mmrad.storage import absolute

    config = config.model_copy(deep=True)
    _absolutize(config, absolute)
    return config


def path_fields(section: type[BaseModel]) -> dict[str, str]:
    """The :func:`PathField` fields of one section class: name -> kind."""
    fields = {}
    for name, field in section.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("path") in PATH_KINDS:
            fields[name] = str(extra["path"])
    return fields


def _absolutize(section: BaseModel, absolute) -> None:
    kinds = path_fields(type(section))
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            _absolutize(value, absolute)
            continue
        if name not in kinds or not isinstance(value, str) or not value:
            continue
        if kinds[name] == "local_or_hub" and not os.path.exists(value):
            continue  # a hub id or keyword (or an s3:// URI, which absolute() keeps anyway)
        object.__setattr__(section, name, absolute(value))


def check_same_grid(data_pixels: BaseModel, model_pixels: BaseModel) -> None:
    """Images are decoded to the data budget's grid and the model is trained and exported
    with the model budget: the two must agree or boxes land on the wrong grid."""
    if data_pixels != model_pixels:
        raise ValueError(
            f"data.pixels {data_pixels.model_dump()} differ from model.pixels "
            f"{model_pixels.model_dump()}: images would not land on the model's grid"
        )


class GcsStorageConfig(Section):
    """``gs://`` (Google Cloud Storage). Credentials: Google's default chain, never here."""

    endpoint_url: str | None = Field(
        None,
        description="GCS endpoint override, e.g. http://127.0.0.1:4443 for an emulator "
        "(else $STORAGE_EMULATOR_HOST, without credentials; else Google's).",
    )
    anonymous: bool = Field(
        False,
        description="Send no credentials (emulators, public buckets); else Google's default "
        "credentials (GOOGLE_APPLICATION_CREDENTIALS, the metadata server).",
    )
    project_id: str | None = Field(None, description="Project of buckets that mmrad creates.")


class AzureStorageConfig(Section):
    """``abfs://`` and ``abfss://`` (Azure Blob Storage, ADLS Gen2). The account key
    ($AZURE_STORAGE_ACCOUNT_KEY) or SAS token ($AZURE_STORAGE_SAS_TOKEN) comes from the
    environment, else Azure's default credential; never from here."""

    account_name: str | None = Field(
        None,
        description="Storage account of abfs://container/key URIs (else "
        "$AZURE_STORAGE_ACCOUNT_NAME); abfs://container@account.dfs.core.windows.net/key "
        "names its own.",
    )
    endpoint_url: str | None = Field(
        None,
        description="Blob endpoint override, e.g. http://127.0.0.1:10000 for Azurite "
        "(else <account>.blob.core.windows.net over https).",
    )


class StorageConfig(Section):
    """Object storage: ``s3://``, ``gs://``, ``abfs[s]://``, ``hdfs://`` URIs beside local
    paths. Credentials come from each service's standard chain, never from here."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint override (else AWS_ENDPOINT_URL, else AWS's own)."
    )
    region: str | None = Field(None, description="S3 region (else the AWS chain's default).")
    max_attempts: int = Field(
        5, ge=1, le=20, description="Tries per S3 call on transient errors (botocore's own)."
    )
    outage_timeout_s: float = Field(
        300.0,
        gt=0,
        description=(
            "How long reads and writes keep retrying transient faults of any store (resets, 5xx, "
            "SlowDown, a body cut off) with backoff before the job fails."
        ),
    )
    gcs: GcsStorageConfig = Field(default_factory=GcsStorageConfig)
    azure: AzureStorageConfig = Field(default_factory=AzureStorageConfig)


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray address; None starts or joins the local/submitted cluster."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by a job.")
    dashboard: bool = Field(
        True, description="Start Ray's dashboard (and its state API, which Ray Train uses)."
    )
    state_dir: str = Field("runs/ray", description="Local Ray's session files and auth token.")
    warm_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Idle worker processes a local Ray keeps for reuse (Ray's num_workers_soft_limit; "
            "default one per CPU). A reused process has its imports (torch, vLLM) done, so "
            "jobs that start many actors and tasks in one driver (a pipeline, a sweep) "
            "start each stage faster; each kept process holds some memory."
        ),
    )
    worker_resource: str | None = Field(
        "mmrad_worker",
        description=(
            "Custom resource that only worker nodes have (cluster.yaml's worker types "
            "declare it; a local Ray that mmrad starts grants it). Coordinators, engines, "
            "learners and predictors ask for a sliver of it, so none lands on a CPU-only "
            "head. null: they go anywhere."
        ),
    )
    check_placement: bool = Field(
        True,
        description=(
            "Refuse within seconds a job whose actors no node can host (alive nodes and the "
            "autoscaler's node types), naming the resource; turn off on an autoscaling "
            "cluster whose node types Ray does not report (the launcher's are read)."
        ),
    )
    accelerator_type: str | None = Field(
        None,
        description=(
            "GPU type every GPU actor asks for (Ray's names: H100, A100, A10G, L4, ...), so "
            "the autoscaler cannot place a job on the wrong nodes. null: any GPU."
        ),
    )


class SyntheticConfig(Section):
    """Procedurally drawn defects on textures and objects that ship with scikit-image."""

    categories: list[str] = Field(
        default_factory=lambda: ["brick", "grass", "gravel", "coins", "camera", "cell"],
        description="Categories to build (see `mmrad data build --help`).",
    )
    images_per_category: int = Field(24, ge=2, description="Query images per category.")
    anomaly_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Share of anomalous queries.")
    image_size: int = Field(224, ge=32, le=4096, description="Side of the square images.")
    max_defects: int = Field(2, ge=1, le=8, description="Most defects on one anomalous image.")
    defect_scale: float = Field(
        1.0,
        ge=1.0,
        le=4.0,
        description="Defects this many times the painters' size (relative to the image); "
        "2 makes them visible to a model that sees 112 px (docs/learning_study.md).",
    )
    reference: Literal["crop", "aligned"] = Field(
        "crop",
        description="Each query's normal reference: one of its category's fixed crops "
        "(crop), or the query's own crop before its defects were painted (aligned: the same "
        "view, so the defects are the only difference; what made a model from random "
        "weights learn soonest in docs/learning_study.md).",
    )


PUBLISHED_SPLIT_SOURCES = ("mvtec", "visa", "mmrad")
"""Sources whose importers read each image's published split (train or test)."""


class SplitConfig(Section):
    """General AD is judged on categories never seen in training."""

    mode: Literal["published", "unseen"] | None = Field(
        None,
        description="published: each source's own train/test split, val carved from train; "
        "unseen: only held-out categories or sources test. Default: published for mvtec, "
        "visa and mmrad, unseen for synthetic.",
    )
    test_categories: list[str] = Field(
        default_factory=list,
        description="Categories held out (`name` or `source/name`): their published test "
        "images (all their images when the source has no published split) go to test, "
        "none to training.",
    )
    test_sources: list[str] = Field(
        default_factory=list, description="Sources held out the same way."
    )
    val_categories: list[str] = Field(
        default_factory=list,
        description="Categories (`name` or `source/name`) whose images go to val and none "
        "to training (in published mode their published test images stay in test): a "
        "validation split of categories training never sees, judged the way the held-out "
        "test is (to pick a checkpoint or a seed).",
    )
    val_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Share of the rest for val (0: val_categories alone)."
    )
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of seen categories' images also held out to test (unseen mode).",
    )


class DataBuildConfig(Section):
    source: Literal["synthetic", "mvtec", "visa", "mmrad"] = Field(
        "synthetic", description="Which builder reads the raw data."
    )
    input: str | None = Field(None, description="Folder of the raw data set (not for synthetic).")
    out: str = Field("runs/data/synthetic", description="Where images and manifest.parquet go.")
    seed: int = Field(0, description="Seed of the synthetic images and of the split.")
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="Missing or corrupt input image: skip (counted, logged) or fail."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _input_needed(self) -> DataBuildConfig:
        if self.source != "synthetic" and not self.input:
            raise ValueError(f"source {self.source!r} needs `input` (the raw data set's folder)")
        return self

    @model_validator(mode="after")
    def _split_mode_fits(self) -> DataBuildConfig:
        mode = self.split_mode
        if mode == "published" and self.source not in PUBLISHED_SPLIT_SOURCES:
            raise ValueError(
                f"split.mode: source {self.source!r} has no published split; use split.mode=unseen"
            )
        if mode == "published" and self.split.test_fraction:
            raise ValueError(
                "split.test_fraction: refused in published mode (each source's published "
                "test images are the test split); use split.mode=unseen to carve one"
            )
        return self

    @model_validator(mode="after")
    def _val_categories_not_held_out(self) -> DataBuildConfig:
        both = sorted(set(self.split.val_categories) & set(self.split.test_categories))
        if both:
            raise ValueError(
                f"split.val_categories: {', '.join(both)} also in split.test_categories; "
                "a category validates or tests, not both"
            )
        return self

    @property
    def split_mode(self) -> str:
        """``split.mode``, or the source's default when it is not set."""
        if self.split.mode is not None:
            return self.split.mode
        return "published" if self.source in PUBLISHED_SPLIT_SOURCES else "unseen"


class PixelBudget(Section):
    """Qwen2.5-VL's smart-resize budget: the model grid of every image."""

    min_pixels: int = Field(56 * 56, ge=28 * 28)
    max_pixels: int = Field(224 * 224, ge=28 * 28)
    factor: int = Field(28, ge=1, description="patch_size * spatial_merge_size")

    @model_validator(mode="after")
    def _ordered(self) -> PixelBudget:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        return self

    def processor_size(self) -> dict[str, int]:
        """The budget as an image processor's ``size`` (transformers 5 and vLLM's
        ``mm_processor_kwargs`` take it; ``min_pixels``/``max_pixels`` are deprecated)."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}


DEFAULT_MAX_BAD_FRACTION = 0.01


class DataLoadConfig(Section):
    """How jobs read a manifest through Ray Data."""

    manifest: str = PathField("runs/data/synthetic/manifest.parquet", "Manifest URI.")
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="Corrupt or missing image: skip (count and log the id) or fail."
    )
    max_bad_fraction: float = Field(
        DEFAULT_MAX_BAD_FRACTION,
        ge=0,
        le=1,
        description="Share of a split's records whose image may be skipped as bad: more "
        "than floor(share * records) distinct ids fails the job, naming the first ones.",
    )
    seed: int = Field(0, description="Seed of the per-epoch sample order.")
    batch_size: int = Field(16, ge=1, description="Rows per Ray Data decode batch.")
    fetch_threads: int = Field(8, ge=1, le=64, description="Concurrent reads per decode batch.")
    pixels: PixelBudget = Field(default_factory=PixelBudget)


class DataJobConfig(Section):
    """`mmrad data build` / `mmrad data stats`."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataBuildConfig = Field(default_factory=DataBuildConfig)


LANGUAGE_MODEL_PROJECTIONS = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)


class ModelConfig(Section):
    """Where the model comes from and how images are sized for it."""

    path: str = PathField(
        "runs/models/tiny", "Hub id, local HF directory, or s3:// directory.", "local_or_hub"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype (bfloat16 on GPUs, float32 on CPUs)."
    )
    cache_dir: NodeFolder = NodeCacheField()
    pixels: PixelBudget = Field(default_factory=PixelBudget)


class LoraConfig(Section):
    """LoRA through peft; by default the language model's attention and MLP projections
    only, since vLLM cannot serve LoRA on the vision tower."""

    enabled: bool = Field(True, description="False = full fine-tuning.")
    r: int = Field(16, ge=1, le=512)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        LANGUAGE_MODEL_PROJECTIONS, description="peft target_modules (regex or names)."
    )


KNOWLEDGE_FILE_HELP = (
    "JSON or YAML file (local or s3://) of each category's known defect types and a "
    "one-line description: {category: {defect_types: [...], description: ...}}, or MMAD's "
    "domain_knowledge.json as is. Training copies it into the export's mmrad.json; without "
    "one, training uses its training images' labels."
)


BoxUnits = Literal["pixels", "cells"]
PromptWording = Literal["full", "terse"]


class PromptConfig(Section):
    """The prompt variant (the paper's ablation switches)."""

    use_reference: bool = Field(True, description="Show a normal reference image first.")
    domain_knowledge: bool = Field(
        False, description="Describe the category and list its known defect types."
    )
    reasoning: bool = Field(True, description="Ask for <think> reasoning before the answer.")
    box_units: BoxUnits = Field(
        "pixels",
        description="Answer boxes in model-grid pixels, or in cells: the grid's "
        "factor-pixel squares (one per merged vision token) that each box overlaps. Cells "
        "are coarser and easier for a small model to learn; every job reads them back "
        "into pixels.",
    )
    wording: PromptWording = Field(
        "full",
        description="The paper's whole sentences, or terse ones with the same facts and "
        "answer format in about a third of the tokens: for small models, whose step "
        "time the prompt's length sets (the learning recipe's).",
    )
    knowledge_file: str | None = PathField(None, KNOWLEDGE_FILE_HELP)

    VARIANT_KEYS: ClassVar[tuple[str, ...]] = (
        "use_reference", "domain_knowledge", "reasoning", "box_units", "wording"
    )  # fmt: skip
    """The switches an export records as its prompt (the knowledge goes beside them)."""

    def variant_dict(self) -> dict[str, bool | str]:
        return {key: getattr(self, key) for key in self.VARIANT_KEYS}


class PromptOverrides(Section):
    """How a model trained by mmrad is prompted comes from its export's ``mmrad.json``
    (:mod:`mmrad.model.contract`); a key set here overrides the export's, with a warning
    in the log and the change recorded in the run. For a model without ``mmrad.json`` (a
    base model, an endpoint) unset keys take ``PromptConfig``'s and ``PixelBudget``'s
    defaults."""

    use_reference: bool | None = None
    domain_knowledge: bool | None = None
    reasoning: bool | None = None
    box_units: BoxUnits | None = None
    wording: PromptWording | None = None
    pixels: PixelBudget | None = None
    knowledge_file: str | None = PathField(
        None, "Replaces the export's domain knowledge. " + KNOWLEDGE_FILE_HELP
    )


def null_is_no_overrides(value: Any) -> Any:
    """Field validator (before) of a ``prompt: PromptOverrides`` field: configs dumped
    before the export contract wrote ``prompt: null``, meaning the export's prompt."""
    return {} if value is None else value


class FSDPConfig(Section):
    version: Literal[1, 2] = Field(2, description="FSDP2 (fully_shard) or FSDP1.")
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto",
        description="Compute dtype: auto = bf16 on GPUs, none (float32) on CPUs. Trained "
        "weights and AdamW states stay float32 either way.",
    )


class LearnersConfig(Section):
    """The Ray Train workers of a training job (SFT workers, GRPO learners): FSDP over
    NCCL on GPUs, gloo on CPUs."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False)
    cpus_per_worker: float = Field(
        0.5, gt=0, description="Fractional on small machines so Ray Data tasks can run."
    )
    gpus_per_worker: float = Field(1.0, ge=0)
    placement: Literal["strict_pack", "pack"] = Field(
        "strict_pack",
        description=(
            "strict_pack: all workers on one node (NCCL within a node, no job spread over "
            "partial nodes); pack: as few nodes as possible, for more workers than one node has."
        ),
    )
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Samples per forward pass on one worker (at most, with a token budget).",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget of one forward pass (samples x padded length), samples "
        "sorted by length; None = micro_batch_size samples each.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder and vision block in backward (non-reentrant)."
    )
    logprob_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens whose full-vocabulary logits exist at once when computing "
        "log-probs and the loss.",
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)


class OptimizerConfig(Section):
    """AdamW, with the global gradient norm clipped before every step."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class ScheduleConfig(Section):
    """How long a training job runs, its learning-rate schedule (linear warm-up, then
    cosine decay to a floor), seed, and how often it logs and checkpoints."""

    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps warming up.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Cosine floor as a share of lr (1 = constant after warm-up)."
    )
    checkpoint_every: int = Field(20, ge=1)
    log_every: int = Field(5, ge=1)
    seed: int = Field(0, description="Seed of the weights' init (LoRA) and of every RNG.")


LOGGERS = ("tensorboard", "mlflow", "wandb")
DRIVER_TRACKERS = ("mlflow", "wandb")
RESTART_ROW = "restarted_from_step"
"""The key of the row a training run's metrics log hands its driver when it (re)starts:
the steps after it run again, so trackers take their rows again."""


class MlflowSection(Section):
    """MLflow, the embedded experiment tracker: a SQLite file needs no server."""

    tracking_uri: str | None = Field(
        None,
        description="A tracking server (http(s)://host:port, databricks, ...). null: "
        "$MLFLOW_TRACKING_URI when set, else the embedded store `store`.",
    )
    store: str = PathField(
        "runs/mlflow.db",
        "The embedded store when no server is named: a SQLite file on the driver's machine "
        "(artifacts in mlartifacts/ beside it). Open it with `make mlflow-ui`.",
    )
    experiment: str | None = Field(
        None, description="Experiment name. null: mmrad-<job> (mmrad-sft, mmrad-grpo, ...)."
    )

    @model_validator(mode="after")
    def _store_is_local(self) -> MlflowSection:
        if "://" in self.store and not self.store.startswith("file://"):
            raise ValueError(
                f"store {self.store!r}: the embedded store is a local SQLite file; "
                "name a server in tracking_uri instead"
            )
        return self


class WandbSection(Section):
    """Weights & Biases (``pip install 'mmrad[wandb]'``; the key from $WANDB_API_KEY)."""

    project: str = Field("mmrad", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user (else the key's default).")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: written under `dir` only; upload later with `wandb sync`."
    )
    dir: str = PathField("runs/wandb", "Where W&B keeps its local files (on the driver).")


class TrackedRunSection(Section):
    """What every run logs to besides its own JSONL tables. Trackers are written from the
    job's driver only, so nothing local has to cross nodes."""

    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard", "mlflow"],
        description=f"Of {list(LOGGERS)}; metrics.jsonl is always written.",
    )
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    wandb: WandbSection = Field(default_factory=WandbSection)

    @property
    def driver_trackers(self) -> list[str]:
        """The loggers the job's driver writes (TensorBoard is written by the workers)."""
        return [name for name in self.loggers if name in DRIVER_TRACKERS]

    @model_validator(mode="after")
    def _loggers_once(self) -> TrackedRunSection:
        repeated = sorted({name for name in self.loggers if self.loggers.count(name) > 1})
        if repeated:
            raise ValueError(f"loggers: {repeated} named more than once")
        return self


class RunSection(TrackedRunSection):
    """Where a run lives. Rerunning with the same name resumes it."""

    storage_path: str = PathField("runs/sft", "Local folder or s3:// prefix.")
    name: str = Field("sft-tiny", description="Run name (resume key).")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept.")
    max_failures: int = Field(1, ge=0, description="Restarts after a worker dies.")


class SFTLearnersConfig(LearnersConfig):
    micro_batch_size: int = Field(
        2,
        ge=1,
        description="Samples per forward pass on one worker (at most, with a token budget).",
    )
    grad_accum: int = Field(
        1, ge=1, description="Samples per worker and step = micro_batch_size x grad_accum."
    )


class SFTScheduleConfig(ScheduleConfig):
    epochs: int = Field(1, ge=1, description="Passes over the training split (max_steps caps).")


class SFTValidationConfig(Section):
    """Validation loss on a fixed spread of the val split (``samples`` records chosen by a
    hash of the id, so they span its categories)."""

    every: int = Field(20, ge=1, description="Steps between validations (and at checkpoints).")
    samples: int = Field(16, ge=1, description="Val samples per validation.")


class ExportSection(Section):
    checkpoint: Literal["best", "last"] = Field(
        "best", description="best = lowest validation loss."
    )
    merge_lora: bool = Field(True, description="Merge LoRA into the base weights.")
    out: str | None = PathField(None, "Default: <storage_path>/<name>/export.")


TRAINING_RENAMES = {
    "scaling": "learners",
    "fsdp": "learners.fsdp",
    "train.batch_size_per_worker": "learners.micro_batch_size",
    "train.grad_accum": "learners.grad_accum",
    "train.lr": "optimizer.lr",
    "train.weight_decay": "optimizer.weight_decay",
    "train.max_grad_norm": "optimizer.max_grad_norm",
    "train.epochs": "schedule.epochs",
    "train.max_steps": "schedule.max_steps",
    "train.warmup_ratio": "schedule.warmup_ratio",
    "train.min_lr_ratio": "schedule.min_lr_ratio",
    "train.checkpoint_every": "schedule.checkpoint_every",
    "train.log_every": "schedule.log_every",
    "train.seed": "schedule.seed",
    "train.val_every": "validation.every",
    "train.val_samples": "validation.samples",
}
"""Keys of the training jobs (SFT, GRPO) before they shared one set of names."""


class SFTDataConfig(DataLoadConfig):
    require_reasoning: bool = Field(
        True,
        description="With a reasoning prompt, refuse train/val records without reasoning; "
        "false trains them on a generic think text and counts them in run_info.json.",
    )


class SFTObjectiveConfig(Section):
    """What SFT minimises besides the answer's negative log-likelihood."""

    patch_loss: float = Field(
        0.0,
        ge=0.0,
        description="Weight of an auxiliary loss on the vision tower: a linear head on each "
        "merged vision token predicts whether its cell holds a defect (binary "
        "cross-entropy against the records' boxes). Teaches a model from random weights "
        "where defects are; the head is checkpointed and dropped at export. 0: off.",
    )


class SFTJobConfig(Section):
    """`mmrad sft` / `python -m ray_jobs.sft`."""

    renamed_keys: ClassVar[dict[str, str]] = TRAINING_RENAMES

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    objective: SFTObjectiveConfig = Field(default_factory=SFTObjectiveConfig)
    learners: SFTLearnersConfig = Field(default_factory=SFTLearnersConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: SFTScheduleConfig = Field(default_factory=SFTScheduleConfig)
    validation: SFTValidationConfig = Field(default_factory=SFTValidationConfig)
    run: RunSection = Field(default_factory=RunSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _one_grid(self) -> SFTJobConfig:
        check_same_grid(self.data.pixels, self.model.pixels)
        if self.objective.patch_loss and self.learners.fsdp.version == 1:
            raise ValueError(
                "objective.patch_loss needs learners.fsdp.version 2: under FSDP1 a resumed "
                "run with the patch head does not continue exactly as an uninterrupted one"
            )
        return self


class EngineConfig(Section):
    """The one vLLM engine wrapper (rollouts, evaluation, serving, annotation).
    On CPUs: in-process engine, eager, float32, explicit KV cache size."""

    max_model_len: int = Field(4096, ge=256)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPUs, float32 on CPUs."
    )
    kv_cache_bytes: int = Field(
        512 * 2**20, ge=2**20, description="KV cache on CPUs (GPUs use the utilization)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    enable_lora: bool = Field(False)
    max_lora_rank: int = Field(64, ge=1)
    max_loras: int = Field(
        1,
        ge=1,
        description="LoRA adapters in one batch, and kept loaded (least recently used "
        "dropped first, reloaded from their folder when asked for again).",
    )
    max_images: int = Field(2, ge=1, description="Images per prompt.")
    seed: int = 0
    multiprocess: bool | None = Field(
        None,
        description=(
            "Run vLLM's engine core in a child process (vLLM's layout on GPUs) or in the "
            "calling process (fastest on CPUs); None = child process on GPUs, in-process "
            "on CPUs."
        ),
    )


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` → ``(["a", "b"], 3)``; the value is read as YAML (so ``[1, 2]`` is a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


EXTENDS_KEY = "extends"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping. A file may start from another: ``extends: <path relative
    to this file>`` deep-merges the file's own mapping on top of the other's (mappings
    merge key by key, lists and scalars replace); the other may extend a third, and so on.
    ``extends`` itself is gone from the result; a cycle or a missing file is a
    :class:`ConfigError` naming the chain of files."""
    return _read_extended((Path(path),))


def _read_extended(chain: tuple[Path, ...]) -> dict[str, Any]:
    """The last file of ``chain`` (each file extended by the one before it), merged."""
    path = chain[-1]
    if path.resolve() in {earlier.resolve() for earlier in chain[:-1]}:
        raise ConfigError(f"{_chain_text(chain)}: extends makes a cycle")
    data = _read_mapping(path, chain)
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{_chain_text(chain)}: extends must be a file path, got {parent!r}")
    return deep_merge(_read_extended((*chain, path.parent / parent)), data)


def _read_mapping(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    where = _chain_text(chain)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _chain_text(chain: Sequence[Path]) -> str:
    """``a.yaml`` alone, or ``a.yaml extends b.yaml extends c.yaml``."""
    return f" {EXTENDS_KEY} ".join(str(path) for path in chain)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` on ``base``: mappings in both merge recursively; any other value of
    ``top`` (list, scalar, null) replaces ``base``'s."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        both = isinstance(below, Mapping) and isinstance(value, Mapping)
        merged[key] = deep_merge(below, value) if both else value
    return merged


def _model_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The section class reached by following ``path`` from ``model``, if any."""
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "<top>"
    if error["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"key {key!r}: unknown key (allowed: {', '.join(allowed)}){did_you_mean}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"key {key!r}: {error['msg']}{shown}"


def leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every value in ``data`` that is not itself a mapping."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(leaf_keys(value, f"{dotted}."))
        else:
            keys.append(dotted)
    return keys


def renamed_key_errors(model: type[BaseModel], data: Mapping[str, Any]) -> list[str]:
    """One message per key that a job config has renamed (``renamed_keys``: old dotted
    key or section -> new one), naming the key to use instead."""
    renames: Mapping[str, str] = getattr(model, "renamed_keys", {})
    errors = []
    for key in leaf_keys(data):
        for old, new in renames.items():
            if key == old or key.startswith(old + "."):
                moved = new + key[len(old) :]
                errors.append(f"key {key!r} is now {moved!r}")
                break
    return errors


def validate_config(
    model: type[ConfigT], data: Mapping[str, Any], origin: str = "<config>"
) -> ConfigT:
    renamed = renamed_key_errors(model, data)
    if renamed:
        raise ConfigError(f"{origin}: " + "; ".join(renamed))
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        lines = [_describe(e, model) for e in err.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(lines)) from None


def load_config(
    model: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ConfigT:
    """Read ``path`` (optional), apply ``overrides`` and validate against ``model``."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    origin = str(path) if path else "<defaults>"
    if overrides:
        origin += " with overrides " + " ".join(overrides)
    return validate_config(model, data, origin)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, as written into every run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class StageConfig(Section):
    """One pipeline stage: its job's own config file plus overrides. The pipeline fills in
    what connects the stages (input manifest, model to start from, run folders)."""

    config: str | None = Field(None, description="The job's config file (else its defaults).")
    overrides: list[str] = Field(default_factory=list, description="`key.sub=value` items.")
    enabled: bool = Field(True, description="Off: the stage and those after it are not run.")


class TinyModelStage(Section):
    build: bool = Field(
        True, description="Build the tiny random model first (local runs); off for hub models."
    )
    seed: int = 0


class EvalStageConfig(StageConfig):
    baselines: list[Literal["base", "sft"]] = Field(
        default_factory=lambda: ["base", "sft"],
        description="Also evaluate these on the same split, each in a stage of its own "
        "(eval_base, eval_sft; the final model's eval runs last), so the pipeline's table "
        "shows base → SFT → GRPO. base: the model SFT starts from, prompted as SFT trains; "
        "sft: the SFT export, when GRPO follows it.",
    )


class ServeSmokeStage(StageConfig):
    images: int = Field(4, ge=1, description="Test images sent through /v1/detect.")


LATEST_FOLDER = "latest"
"""``<run.storage_path>/latest/<stage>``: links to the newest pipeline run's stage folders."""


class PipelineRunSection(Section):
    storage_path: str = Field(
        "runs/pipeline",
        description="Local folder or s3:// prefix. Locally, <storage_path>/latest/<stage> "
        "links to the last run's stage folders (what configs/local/*.yaml read).",
    )
    name: str = Field("local", description="Run name: stages already done are skipped.")

    @field_validator("name")
    @classmethod
    def _not_the_links(cls, name: str) -> str:
        if name == LATEST_FOLDER:
            raise ValueError(f"{LATEST_FOLDER!r} names the folder of links to the last run")
        return name


class PipelineConfig(Section):
    """`mmrad pipeline` / `python -m ray_jobs.pipeline`: data → SFT → GRPO → evaluation →
    serving smoke test. A stage is skipped when the hash of its resolved config and its
    inputs matches the one recorded with its output."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    run: PipelineRunSection = Field(default_factory=PipelineRunSection)
    tiny_model: TinyModelStage = Field(default_factory=TinyModelStage)
    data: StageConfig = Field(default_factory=StageConfig)
    sft: StageConfig = Field(default_factory=StageConfig)
    grpo: StageConfig = Field(default_factory=StageConfig)
    eval: EvalStageConfig = Field(default_factory=EvalStageConfig)
    serve: ServeSmokeStage = Field(default_factory=ServeSmokeStage)

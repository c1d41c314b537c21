"""``mmrad pipeline`` / ``python -m ray_jobs.pipeline``: the whole method as one job.

tiny model (local runs) → data → SFT → GRPO → evaluation → serving smoke test. Each stage
is its own job with its own config file; the pipeline wires one stage's output into the
next and gives every stage a folder named by a hash of its resolved config and of the
hashes of the stages it reads from. Evaluation runs once per model on the same split: the
base model (``eval_base``, prompted as SFT trains it), the SFT export (``eval_sft``) and
last the final model (``eval``); ``<run>/table/`` then holds the paper's table of the
three (:mod:`mmrad.eval.paper_table`). Without an SFT stage GRPO starts from the base
model; without a GRPO stage SFT's export is the final model. So:

- a stage whose hash matches the one recorded with its finished output is skipped;
- a changed config (or a changed upstream stage) runs in a new folder, and nothing
  already written is lost;
- an interrupted stage reruns in the same folder, where SFT and GRPO resume from their
  last checkpoint.

Every stage's config is resolved and validated before the first one starts, and right
after the data stage every later stage's splits are checked to have records, so an empty
test split fails before any training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from mmrad.config import (
    LATEST_FOLDER,
    ConfigError,
    DataJobConfig,
    ModelConfig,
    PipelineConfig,
    PromptConfig,
    SFTJobConfig,
    StageConfig,
    TinyModelStage,
    apply_overrides,
    dump_config,
    read_yaml,
    validate_config,
)
from mmrad.data.manifest import in_split, read_manifest_table
from mmrad.data.schema import ManifestError
from mmrad.ray_env import init_ray
from mmrad.runinfo import write_run_info
from mmrad.serve.smoke import SPLIT_READ as SMOKE_SPLIT_READ
from mmrad.sft.plan import SPLITS_READ as SFT_SPLITS_READ
from mmrad.storage import Storage, absolute, is_remote, join
from mmrad.tune.space import apply_params

log = logging.getLogger(__name__)
console = Console()
LEDGER_FOLDER = "stages"

SplitRead = tuple[str, str]
"""A split a stage reads from the data stage's manifest, and the setting that chose it."""


@dataclass(frozen=True)
class StageRecord:
    """What the ledger keeps of a finished stage."""

    name: str
    hash: str
    folder: str
    outputs: dict[str, str]
    seconds: float


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its resolved job config, folder and the outputs it will write."""

    name: str
    job: BaseModel
    hash: str
    folder: str
    outputs: dict[str, str]
    work: Callable[[BaseModel, Storage], Any]
    checked: tuple[str, ...] = ()
    """Outputs that must exist for a recorded stage to count as done."""
    reads: tuple[SplitRead, ...] = ()
    """Splits of the data stage's manifest that must have records (checked before the
    first stage after the data stage runs)."""


@dataclass
class PipelineResult:
    run_uri: str
    stages: dict[str, str] = field(default_factory=dict)  # name -> "ran" | "skipped"
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    table: dict[str, str] = field(default_factory=dict)
    """The comparison table's files (:func:`write_comparison`) by format."""


NOT_HASHED = ("loggers", "mlflow", "wandb")
"""Keys of a job's ``run`` section that say where a run is tracked, not what it computes:
adding W&B to a pipeline does not train its stages again."""


def stage_hash(name: str, job: BaseModel, upstream: Mapping[str, str]) -> str:
    """sha256 of the stage name, its resolved config (less :data:`NOT_HASHED`) and its
    upstream stages' hashes."""
    config = job.model_dump(mode="json")
    if isinstance(config.get("run"), dict):
        config["run"] = {k: v for k, v in config["run"].items() if k not in NOT_HASHED}
    payload = {"stage": name, "config": config, "upstream": dict(upstream)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stage_data(stage: StageConfig) -> dict[str, Any]:
    """A stage's job config as a dict: its file (else the job's defaults) plus overrides."""
    data = read_yaml(stage.config) if stage.config else {}
    return apply_overrides(data, stage.overrides)


class Ledger:
    """``<run>/stages/<name>.json``: the hash and outputs of each finished stage."""

    def __init__(self, storage: Storage, run_uri: str):
        self.storage = storage
        self.run_uri = run_uri

    def _uri(self, name: str) -> str:
        return join(self.run_uri, LEDGER_FOLDER, f"{name}.json")

    def read(self, name: str) -> StageRecord | None:
        uri = self._uri(name)
        if not self.storage.exists(uri):
            return None
        return StageRecord(**json.loads(self.storage.read_text(uri)))

    def write(self, record: StageRecord) -> None:
        self.storage.write_text(self._uri(record.name), json.dumps(asdict(record), indent=2))

    def is_done(self, stage: PlannedStage) -> bool:
        record = self.read(stage.name)
        if record is None or record.hash != stage.hash:
            return False
        return all(self.storage.exists(stage.outputs[key]) for key in stage.checked)


class Planner:
    """Resolves every stage's job config in order, wiring outputs into inputs."""

    def __init__(self, config: PipelineConfig, run_uri: str):
        self.config = config
        self.run_uri = run_uri
        self.stages: list[PlannedStage] = []

    def hashes(self, *names: str) -> dict[str, str]:
        return {s.name: s.hash for s in self.stages if s.name in names}

    def planned(self, name: str) -> bool:
        return any(stage.name == name for stage in self.stages)

    def outputs(self, name: str) -> dict[str, str]:
        return self._stage(name).outputs

    def job(self, name: str) -> Any:
        return self._stage(name).job

    def _stage(self, name: str) -> PlannedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"{name}.enabled is false, but a later stage needs its output")

    def add(
        self,
        name: str,
        model: type[BaseModel],
        data: Mapping[str, Any],
        upstream: tuple[str, ...],
        place: Callable[[str], tuple[dict[str, Any], dict[str, str]]],
        work: Callable[[BaseModel, Storage], Any],
        checked: tuple[str, ...],
        origin: str = "",
        reads: Callable[[Any], Sequence[SplitRead]] = lambda job: (),
    ) -> None:
        """Validate the stage's job config ``data`` (dotted keys allowed), hash it, then
        ``place(folder)`` gives the settings that put its outputs in the stage's folder
        (not part of the hash) and the outputs' URIs; ``reads(job)`` the splits it reads."""
        origin = origin or f"pipeline stage {name}"
        digest = stage_hash(name, validate_config(model, apply_params(data, {}), origin),
                            self.hashes(*upstream))  # fmt: skip
        folder = join(self.run_uri, f"{name}-{digest[:10]}")
        settings, outputs = place(folder)
        job = validate_config(model, apply_params(data, settings), origin)
        self.stages.append(
            PlannedStage(name, job, digest, folder, outputs, work, checked, tuple(reads(job)))
        )


def plan(config: PipelineConfig, run_uri: str) -> list[PlannedStage]:
    planner = Planner(config, run_uri)
    for add_stage in STAGE_BUILDERS:
        add_stage(planner)
    return planner.stages


# -- stages -------------------------------------------------------------------------------


def _model_path(planner: Planner, configured: str) -> str:
    if planner.config.tiny_model.build:
        return planner.outputs("tiny_model")["model"]
    return configured


def _wired(planner: Planner, stage: StageConfig, wiring: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's config dict with the pipeline's storage and the upstream outputs set."""
    storage = planner.config.storage.model_dump()
    return apply_params(stage_data(stage), {"storage": storage, **wiring})


def _origin(stage: StageConfig, name: str) -> str:
    return f"{stage.config or '<defaults>'} (pipeline stage {name})"


def add_tiny_model(planner: Planner) -> None:
    if not planner.config.tiny_model.build:
        return

    def place(folder: str) -> tuple[dict[str, Any], dict[str, str]]:
        # vLLM and transformers read the tiny model from a local directory.
        local = absolute(
            join("runs/models", folder.rsplit("/", 1)[1]) if is_remote(folder) else folder
        )
        return {}, {"model": local, "config": join(local, "config.json")}

    def work(job: TinyModelStage, storage: Storage) -> None:
        from mmrad.model.tiny import build_tiny_model

        build_tiny_model(planner.outputs("tiny_model")["model"], seed=job.seed)

    data = planner.config.tiny_model.model_dump()
    planner.add("tiny_model", TinyModelStage, data, (), place, work, ("config",))


def add_data(planner: Planner) -> None:
    stage = planner.config.data
    if not stage.enabled:
        return

    def place(folder: str) -> tuple[dict[str, Any], dict[str, str]]:
        return {"data.out": folder}, {"manifest": join(folder, "manifest.parquet")}

    def work(job: DataJobConfig, storage: Storage) -> None:
        from mmrad.data.build import build_dataset, holds_data_set

        # The folder is named by the config's hash: a manifest there is this very data
        # set, built by a run killed before it recorded the stage (the build refuses to
        # write over a manifest).
        if holds_data_set(job.data.out, storage):
            return
        build_dataset(job.data, storage)

    planner.add("data", DataJobConfig, _wired(planner, stage, {}), (), place, work,
                ("manifest",), _origin(stage, "data"))  # fmt: skip


def _training_place(run_name: str) -> Callable[[str], tuple[dict[str, Any], dict[str, str]]]:
    """SFT and GRPO: the run and its export inside the stage's folder."""

    def place(folder: str) -> tuple[dict[str, Any], dict[str, str]]:
        export = join(folder, "export")
        settings = {"run.storage_path": folder, "run.name": run_name, "export.out": export}
        outputs = {"export": export, "run": join(folder, run_name),
                   "export_info": join(export, "mmrad.json")}  # fmt: skip
        return settings, outputs

    return place


def add_sft(planner: Planner) -> None:
    stage = planner.config.sft
    if not stage.enabled:
        return
    configured = stage_data(stage).get("model", {}).get("path", ModelConfig().path)
    wiring = {"data.manifest": planner.outputs("data")["manifest"],
              "model.path": _model_path(planner, configured)}  # fmt: skip

    def work(job: SFTJobConfig, storage: Storage) -> None:
        from mmrad.sft.job import run_sft

        run_sft(job)

    planner.add("sft", SFTJobConfig, _wired(planner, stage, wiring), ("tiny_model", "data"),
                _training_place("sft"), work, ("export_info",), _origin(stage, "sft"),
                lambda job: tuple(SFT_SPLITS_READ.items()))  # fmt: skip


def add_grpo(planner: Planner) -> None:
    stage = planner.config.grpo
    if not stage.enabled:
        return
    from mmrad.rl.config import GRPOJobConfig

    wiring = {"data.manifest": planner.outputs("data")["manifest"],
              "model.path": _grpo_start(planner, stage)}  # fmt: skip

    def work(job: GRPOJobConfig, storage: Storage) -> None:
        from mmrad.rl.job import run_grpo

        run_grpo(job)

    def reads(job: GRPOJobConfig) -> list[SplitRead]:
        validating = [(job.validation.split, "validation.split")] if job.validation.every else []
        return [(job.data.split, "data.split"), *validating]

    data = _wired(planner, stage, wiring)
    planner.add("grpo", GRPOJobConfig, data, ("tiny_model", "data", "sft"),
                _training_place("grpo"), work, ("export_info",), _origin(stage, "grpo"),
                reads)  # fmt: skip


def _grpo_start(planner: Planner, stage: StageConfig) -> str:
    """SFT's export; without an SFT stage (RL without SFT) the base model."""
    if planner.planned("sft"):
        return planner.outputs("sft")["export"]
    from mmrad.rl.config import GRPOModelConfig

    configured = stage_data(stage).get("model", {}).get("path", GRPOModelConfig().path)
    return _model_path(planner, configured)


def final_model(planner: Planner) -> str:
    """The newest trained export: GRPO's when it is planned, else SFT's."""
    return planner.outputs("grpo" if planner.planned("grpo") else "sft")["export"]


EVAL_STAGES = {"eval_base": "base", "eval_sft": "SFT", "eval": "final"}
"""The evaluation stages in the order they run, with their rows' labels in the table
(the final model's row says which it is, :func:`eval_label`)."""


@dataclass(frozen=True)
class Evaluated:
    """A model the pipeline evaluates: its stage, what it reads and how it is prompted
    (``None``: its export's contract)."""

    stage: str
    model: str
    upstream: tuple[str, ...]
    prompt: dict[str, Any] | None = None


def evaluated_models(planner: Planner) -> list[Evaluated]:
    """The baselines asked for, then the final model (evaluated last)."""
    baselines = planner.config.eval.baselines
    trained = [name for name in ("sft", "grpo") if planner.planned(name)]
    if not trained:
        raise ConfigError("eval: the pipeline evaluates a trained model; enable sft or grpo")
    models = []
    if "base" in baselines:
        first = planner.job(trained[0])
        models.append(Evaluated("eval_base", first.model.path, ("tiny_model", "data"),
                                base_prompt(first)))  # fmt: skip
    if "sft" in baselines and trained == ["sft", "grpo"]:
        models.append(Evaluated("eval_sft", planner.outputs("sft")["export"], ("data", "sft")))
    models.append(Evaluated("eval", final_model(planner), ("data", "sft", "grpo")))
    return models


def eval_label(stage: str, stages: Sequence[str]) -> str:
    """A table row's label: base, SFT, or the final model's training stage."""
    if stage != "eval":
        return EVAL_STAGES[stage]
    return "GRPO" if "grpo" in stages else "SFT"


def base_prompt(first_training: BaseModel) -> dict[str, Any]:
    """The evaluation's ``prompt`` overrides that prompt a base model (no ``mmrad.json``)
    as the first training stage prompts it: every variant key, a GRPO stage's unset ones
    at ``PromptConfig``'s defaults (how GRPO prompts a model without ``mmrad.json``). Its
    domain knowledge can only come from a knowledge file: knowledge from training labels
    lives in the exports."""
    prompt = first_training.prompt
    variant = {key: value for key in PromptConfig.VARIANT_KEYS
               if (value := getattr(prompt, key)) is not None}  # fmt: skip
    chosen = {**PromptConfig().variant_dict(), **variant}
    if prompt.knowledge_file is not None:
        chosen["knowledge_file"] = prompt.knowledge_file
    return {**chosen, "pixels": first_training.model.pixels.model_dump()}


def add_eval(planner: Planner) -> None:
    stage = planner.config.eval
    if not stage.enabled:
        return
    for evaluated in evaluated_models(planner):
        _add_eval_stage(planner, stage, evaluated)


def _add_eval_stage(planner: Planner, stage: StageConfig, evaluated: Evaluated) -> None:
    from mmrad.eval.config import EvalJobConfig

    wiring = {"data.manifest": planner.outputs("data")["manifest"],
              "target": {"kind": "model", "path": evaluated.model}}  # fmt: skip
    if evaluated.prompt is not None:  # the eval config's own prompt.* keys still win
        own = stage_data(stage).get("prompt") or {}
        wiring |= {f"prompt.{k}": v for k, v in evaluated.prompt.items() if k not in own}

    def place(folder: str) -> tuple[dict[str, Any], dict[str, str]]:
        run = join(folder, "eval")
        outputs = {"run": run, "report": join(run, "report.md"),
                   "metrics": join(run, "metrics.json")}  # fmt: skip
        return {"run.storage_path": folder, "run.name": "eval"}, outputs

    def work(job: EvalJobConfig, storage: Storage) -> None:
        from mmrad.eval.job import run_eval

        run_eval(job)

    planner.add(evaluated.stage, EvalJobConfig, _wired(planner, stage, wiring),
                evaluated.upstream, place, work, ("metrics",),
                _origin(stage, evaluated.stage),
                lambda job: [(job.data.split, "data.split")])  # fmt: skip


class ServeSmokeJob(BaseModel):
    """The serving smoke test: a Serve config file (Ray's schema) and how many test
    images go through ``/v1/detect``."""

    serve_config: dict[str, Any]
    manifest: str
    images: int


def add_serve(planner: Planner) -> None:
    stage = planner.config.serve
    if not stage.enabled:
        return
    from mmrad.serve.config import load_serve_file

    if stage.config is None:
        raise ConfigError("serve.config: the serving smoke test needs a Serve config file")
    app = _single_mmrad_app(load_serve_file(stage.config, stage.overrides))
    model = f"applications.{app}.args.model_dir={final_model(planner)}"
    served = load_serve_file(stage.config, [*stage.overrides, model])
    data = {"serve_config": served.config, "images": stage.images,
            "manifest": planner.outputs("data")["manifest"]}  # fmt: skip

    def place(folder: str) -> tuple[dict[str, Any], dict[str, str]]:
        return {}, {"responses": join(folder, "responses.json")}

    def work(job: ServeSmokeJob, storage: Storage) -> None:
        from mmrad.serve.smoke import smoke_test

        responses = smoke_test(job.serve_config, job.manifest, job.images, storage)
        storage.write_text(planner.outputs("serve")["responses"], json.dumps(responses, indent=2))

    planner.add("serve", ServeSmokeJob, data, ("data", "sft", "grpo"), place, work,
                ("responses",), _origin(stage, "serve"),
                lambda job: [SMOKE_SPLIT_READ])  # fmt: skip


def remove_leftover_smoke_app(stages: Sequence[PlannedStage]) -> None:
    """Delete the smoke app a killed run's serve stage left deployed (its ``finally`` did
    not run), whether or not this run's serve stage runs; the stage's own name for it
    (:func:`mmrad.serve.smoke.smoke_app_name`), so other applications stay."""
    from mmrad.serve.smoke import remove_leftover

    for stage in stages:
        if isinstance(stage.job, ServeSmokeJob):
            remove_leftover(stage.job.serve_config)


def _single_mmrad_app(file: Any) -> str:
    if len(file.apps) != 1:
        raise ConfigError(
            f"{file.origin}: the smoke test needs exactly one mmrad application, "
            f"found {sorted(file.apps) or 'none'}"
        )
    return next(iter(file.apps))


STAGE_BUILDERS: list[Callable[[Planner], None]] = [
    add_tiny_model, add_data, add_sft, add_grpo, add_eval, add_serve,
]  # fmt: skip
"""In order; a disabled stage adds nothing, and a later stage that needs it fails to plan."""


# -- running ------------------------------------------------------------------------------


def split_sizes(storage: Storage, manifest: str) -> Counter[str]:
    """Records per split of a manifest (its split column only)."""
    table = read_manifest_table(storage, manifest, validate=False)
    return Counter(table.column("split").to_pylist())


def describe_sizes(sizes: Mapping[str, int]) -> str:
    """``train 20, val 4`` (``no records`` when empty)."""
    return ", ".join(f"{split} {n}" for split, n in sorted(sizes.items())) or "no records"


def check_splits_read(stages: Sequence[PlannedStage], manifest: str, storage: Storage) -> None:
    """Every stage finds records in the splits it reads from the data stage's
    ``manifest``; an empty one fails now, before any training, not at the stage."""
    sizes = split_sizes(storage, manifest)
    for stage in stages:
        for split, setting in stage.reads:
            if not sum(n for name, n in sizes.items() if in_split(name, split)):
                raise ManifestError(
                    f"pipeline stage {stage.name} reads split {split!r} ({setting}), but the "
                    f"data stage's manifest {manifest} has none ({describe_sizes(sizes)}); "
                    "the data stage's data.split.test_categories, data.split.test_sources "
                    "and data.split.val_fraction decide which records go to which split"
                )


def drop_stale_latest(storage_path: str, stages: Sequence[PlannedStage]) -> None:
    """Remove the ``latest`` links that name another run's folder than this plan's (or a
    stage this plan does not have), so that the links never mix two runs' outputs: a
    stage that has not finished yet has no link until it does."""
    links = Path(storage_path) / LATEST_FOLDER
    if is_remote(storage_path) or not links.is_dir():
        return
    planned = {stage.name: Path(stage.folder).resolve() for stage in stages}
    for link in links.iterdir():
        if link.is_symlink() and planned.get(link.name) != link.resolve():
            link.unlink()


def point_latest(storage_path: str, stage: PlannedStage) -> None:
    """Make ``<storage_path>/latest/<stage>`` a relative link to the stage's folder (local
    runs only; object stores have no links), replaced atomically: stable names for the
    newest outputs, which ``configs/local/*.yaml`` read."""
    if is_remote(storage_path) or is_remote(stage.folder):
        return
    links = Path(storage_path) / LATEST_FOLDER
    links.mkdir(parents=True, exist_ok=True)
    staged = links / f".{stage.name}.{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(os.path.relpath(stage.folder, links))
    staged.replace(links / stage.name)


def dump_pipeline(config: PipelineConfig) -> str:
    """``--print-config``: the config, once every stage's own config is resolved and
    validated as a run would (nothing starts)."""
    plan(config, absolute(join(config.run.storage_path, config.run.name)))
    return dump_config(config)


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    storage = Storage.from_config(config.storage)
    run_uri = absolute(join(config.run.storage_path, config.run.name))
    stages = plan(config, run_uri)  # every config validated before anything starts
    drop_stale_latest(absolute(config.run.storage_path), stages)
    init_ray(config.ray)
    remove_leftover_smoke_app(stages)
    write_run_info(storage, run_uri, config, seed=0)
    ledger = Ledger(storage, run_uri)
    result = PipelineResult(run_uri=run_uri)
    for stage in stages:
        if ledger.is_done(stage):
            console.rule(f"{stage.name}: done before (hash {stage.hash[:10]}), skipped")
            result.stages[stage.name] = "skipped"
        else:
            console.rule(f"{stage.name} → {stage.folder}")
            start = time.perf_counter()
            stage.work(stage.job, storage)
            seconds = time.perf_counter() - start
            ledger.write(StageRecord(stage.name, stage.hash, stage.folder, stage.outputs, seconds))
            result.stages[stage.name] = "ran"
        result.outputs[stage.name] = stage.outputs
        point_latest(absolute(config.run.storage_path), stage)
        if stage.name == "data":
            check_splits_read(stages, stage.outputs["manifest"], storage)
    result.table = write_comparison(result, storage)
    return result


TABLE_FOLDER = "table"


def evaluated_runs(result: PipelineResult, storage: Storage) -> list[tuple[str, dict]]:
    """``(label, metrics)`` of the pipeline's evaluations, in the order they ran."""
    from mmrad.eval.compare import read_metrics

    names = list(result.stages)
    return [(eval_label(name, names), read_metrics(storage, result.outputs[name]["run"]))
            for name in EVAL_STAGES if name in result.outputs]  # fmt: skip


def write_comparison(result: PipelineResult, storage: Storage) -> dict[str, str]:
    """The paper's table of the evaluated models (base → SFT → GRPO) as Markdown, LaTeX
    and a figure in ``<run>/table/``; nothing when nothing was evaluated."""
    from mmrad.eval.paper_table import write_table_files

    runs = evaluated_runs(result, storage)
    return write_table_files(runs, join(result.run_uri, TABLE_FOLDER), storage) if runs else {}


def print_summary(result: PipelineResult) -> None:
    """Where everything went, and the evaluation's headline table when there is one."""
    from mmrad.eval.report import headline_table

    for name, how in result.stages.items():
        console.print(f"{name}: {how} → {result.outputs[name]}")
    metrics = result.outputs.get("eval", {}).get("metrics")
    if metrics:
        storage = Storage()
        console.print(f"\nreport: {result.outputs['eval']['report']}")
        console.print(headline_table(json.loads(storage.read_text(metrics))))
    if result.table:
        console.print(f"\nthe evaluated models (det/loc accuracy, %): {result.table['markdown']}")
        console.print(Storage().read_text(result.table["markdown"]))

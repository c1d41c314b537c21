"""``mmrad pipeline`` / ``python -m ray_jobs.pipeline``: the whole method as one job.

tiny model (local runs) → data → SFT → GRPO → evaluation → serving smoke test. Each stage
is its own job with its own config file; the pipeline wires one stage's output into the
next and gives every stage a folder named by a hash of its resolved config and of the
hashes of the stages it reads from. So:

- a stage whose hash matches the one recorded with its finished output is skipped;
- a changed config (or a changed upstream stage) runs in a new folder, and nothing
  already written is lost;
- an interrupted stage reruns in the same folder, where SFT and GRPO resume from their
  last checkpoint.

Every stage's config is resolved and validated before the first one starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from mmrad.config import (
    DataJobConfig,
    PipelineConfig,
    SFTJobConfig,
    StageConfig,
    load_config,
)
from mmrad.ray_env import init_ray
from mmrad.runinfo import write_run_info
from mmrad.storage import Storage, absolute, is_s3, join

log = logging.getLogger(__name__)
console = Console()
LEDGER_FOLDER = "stages"


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


@dataclass
class PipelineResult:
    run_uri: str
    stages: dict[str, str] = field(default_factory=dict)  # name -> "ran" | "skipped"
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    report: str | None = None


def stage_hash(name: str, job: BaseModel, upstream: Mapping[str, str]) -> str:
    """sha256 of the stage name, its resolved config and its upstream stages' hashes."""
    payload = {"stage": name, "config": job.model_dump(mode="json"), "upstream": dict(upstream)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_stage_job(model: type[BaseModel], stage: StageConfig) -> BaseModel:
    return load_config(model, stage.config, stage.overrides)


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

    def outputs(self, name: str) -> dict[str, str]:
        return next(s.outputs for s in self.stages if s.name == name)

    def add(
        self,
        name: str,
        job: BaseModel,
        upstream: tuple[str, ...],
        place: Callable[[BaseModel, str], dict[str, str]],
        work: Callable[[BaseModel, Storage], Any],
        checked: tuple[str, ...],
    ) -> None:
        """``place(job, folder)`` points the job's outputs into ``folder`` (after hashing,
        so the folder is not part of the hash) and returns their URIs."""
        digest = stage_hash(name, job, self.hashes(*upstream))
        folder = join(self.run_uri, f"{name}-{digest[:10]}")
        outputs = place(job, folder)
        self.stages.append(PlannedStage(name, job, digest, folder, outputs, work, checked))


def plan(config: PipelineConfig, run_uri: str) -> list[PlannedStage]:
    planner = Planner(config, run_uri)
    for add_stage in STAGE_BUILDERS:
        if not add_stage(planner):
            break
    return planner.stages


# -- stages -------------------------------------------------------------------------------


def _model_path(planner: Planner, configured: str) -> str:
    if planner.config.tiny_model.build:
        return planner.outputs("tiny_model")["model"]
    return configured


def add_tiny_model(planner: Planner) -> bool:
    if not planner.config.tiny_model.build:
        return True

    def place(job: BaseModel, folder: str) -> dict[str, str]:
        # vLLM and transformers read the tiny model from a local directory.
        local = join("runs/models", folder.rsplit("/", 1)[1]) if is_s3(folder) else folder
        return {"model": absolute(local), "config": join(absolute(local), "config.json")}

    def work(job: BaseModel, storage: Storage) -> None:
        from mmrad.model.tiny import build_tiny_model

        build_tiny_model(planner.outputs("tiny_model")["model"], seed=job.seed)

    planner.add("tiny_model", planner.config.tiny_model, (), place, work, ("config",))
    return True


def add_data(planner: Planner) -> bool:
    if not planner.config.data.enabled:
        return False
    job = load_stage_job(DataJobConfig, planner.config.data)
    job.storage = planner.config.storage

    def place(job: DataJobConfig, folder: str) -> dict[str, str]:
        job.data.out = folder
        return {"manifest": join(folder, "manifest.parquet")}

    def work(job: DataJobConfig, storage: Storage) -> None:
        from mmrad.data.build import build_dataset

        build_dataset(job.data, storage)

    planner.add("data", job, (), place, work, ("manifest",))
    return True


def add_sft(planner: Planner) -> bool:
    if not planner.config.sft.enabled:
        return False
    job = load_stage_job(SFTJobConfig, planner.config.sft)
    job.storage = planner.config.storage
    job.data.manifest = planner.outputs("data")["manifest"]
    job.model.path = _model_path(planner, job.model.path)
    job.run.name = "sft"

    def place(job: SFTJobConfig, folder: str) -> dict[str, str]:
        job.run.storage_path = folder
        job.export.out = join(folder, "export")
        return {"export": job.export.out, "run": join(folder, "sft"),
                "export_info": join(job.export.out, "mmrad.json")}  # fmt: skip

    def work(job: SFTJobConfig, storage: Storage) -> None:
        from mmrad.sft.job import run_sft

        run_sft(job)

    planner.add("sft", job, ("tiny_model", "data"), place, work, ("export_info",))
    return True


STAGE_BUILDERS: list[Callable[[Planner], bool]] = [add_tiny_model, add_data, add_sft]
"""In order; a builder returns False when its stage is disabled, which ends the plan."""


# -- running ------------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    storage = Storage.from_config(config.storage)
    run_uri = absolute(join(config.run.storage_path, config.run.name))
    stages = plan(config, run_uri)  # every config validated before anything starts
    init_ray(config.ray)
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
    return result

"""``mmrad grpo`` / ``python -m ray_jobs.grpo``: the driver of a GRPO run.

The driver reads the manifest, starts the coordinator actor (prompts, vLLM rollout pool,
rewards, weight versions; :mod:`mmrad.rl.coordinator`) and a ``TorchTrainer`` of FSDP2
learners (:mod:`mmrad.rl.learner`) whose checkpoints land in the run directory (local or
``s3://``), draws the progress bar, and stops the coordinator at the end. The learners
export the final policy (LoRA merged) as an HF directory with ``mmrad.json``.
Rerunning with the same ``run.name`` resumes from the last checkpoint: the same weights,
optimizer, RNG, weight version and data position, so no prompt is repeated or skipped.
After a killed driver the rerun first waits for that driver's actors to end (Ray ends
what a dead driver owned); a live run of the same name is refused. A dead coordinator, or
a fault it recorded as fatal, ends the run at once instead of restarting the learners
(:mod:`mmrad.rl.guard`); rerun to resume.

The prompt variant, pixel budget and domain knowledge come from the SFT export's
``mmrad.json`` (:mod:`mmrad.model.contract`), so GRPO prompts as SFT trained unless its
``prompt`` section overrides them (logged, and recorded in ``run_info.json``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import ray

from mmrad.actor_names import wait_until_free
from mmrad.config import ConfigError, PromptConfig, with_absolute_paths
from mmrad.data.manifest import read_manifest, records_of_split, spread_subset
from mmrad.model.contract import Contract, export_knowledge, resolve_contract, training_knowledge
from mmrad.model.loading import check_model_dir
from mmrad.placement import check_or_log, ray_options
from mmrad.ray_env import init_ray, joining_existing_cluster
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.coordinator import MAX_CONCURRENCY, Coordinator, coordinator_name, worker_spec
from mmrad.rl.guard import why_unrecoverable
from mmrad.rl.kept_engines import KeptEngines
from mmrad.rl.learner import grpo_learner
from mmrad.rl.pool import OUTSIDE_PARENT_PLACEMENT_GROUP
from mmrad.rl.resources import coordinator_shape, grpo_requests
from mmrad.runinfo import write_run_info
from mmrad.storage import Storage, join
from mmrad.task.knowledge import Knowledge
from mmrad.task.prompt import PromptVariant
from mmrad.tracking.run import check_tracking, tracked
from mmrad.train.core import checkpoint_uri, make_torch_trainer
from mmrad.train.fail_fast import fit
from mmrad.train.metrics_log import readable_metrics
from mmrad.train.progress import run_with_progress

log = logging.getLogger(__name__)


@dataclass
class GRPOResult:
    run_uri: str
    export_uri: str
    checkpoint_uri: str | None
    steps: int


def starting_point(job: GRPOJobConfig, storage: Storage) -> Contract:
    """How GRPO prompts: the starting export's contract (its ``mmrad.json``) under the
    job's ``prompt`` overrides; a plain HF model is prompted as the config says. The
    learners' and engines' ``model.pixels`` must be the contract's pixel budget."""
    from mmrad.model.contract import model_info

    info = model_info(job.model.path, storage, "model.path")
    if info is not None and info.get("lora") == "adapter":
        raise ConfigError(
            f"model.path {job.model.path}: the export keeps its LoRA adapter apart; GRPO "
            "starts from a merged export (export it with export.merge_lora=true)"
        )
    prompt = job.prompt
    if info is None and prompt.pixels is None:  # a plain model: the config decides
        prompt = prompt.model_copy(update={"pixels": job.model.pixels})
    contract = resolve_contract(job.model.path, info, prompt, storage, "grpo prompt")
    if job.model.pixels != contract.pixels:
        raise ConfigError(
            f"model.pixels {job.model.pixels.model_dump()} differ from the pixel budget GRPO "
            f"prompts with, {contract.pixels.model_dump()} (model.path {job.model.path}); set "
            "model.pixels and data.pixels to it, or prompt.pixels to override the export's"
        )
    return contract


def grpo_knowledge(contract: Contract, train: list[dict], storage: Storage) -> tuple[dict, str]:
    """The knowledge GRPO prompts with and exports: the contract's (the export's copy or
    ``prompt.knowledge_file``); for a model without one, the training images' labels."""
    if contract.knowledge_origin is not None:
        return dict(contract.knowledge), contract.knowledge_origin
    return training_knowledge(PromptConfig(), train, storage)


@dataclass(frozen=True)
class GRPORecords:
    """What the coordinator gets from the manifest."""

    prompts: list[dict]
    validation: list[dict]
    train: list[dict]


def grpo_records(job: GRPOJobConfig, storage: Storage) -> GRPORecords:
    """The prompts (``data.split``) and validation records; an empty split is a
    :class:`~mmrad.data.schema.ManifestError`."""
    records = read_manifest(storage, job.data.manifest)
    return GRPORecords(
        prompts=records_of_split(records, job.data.split, job.data.manifest, "data.split"),
        validation=validation_records(job, records),
        train=[r for r in records if r["split"] == "train"],
    )


def start_coordinator(
    job: GRPOJobConfig,
    records: GRPORecords,
    variant: PromptVariant,
    knowledge: Knowledge,
    workers: Sequence | None = None,
):
    actor = ray.remote(Coordinator).options(
        name=coordinator_name(job.run.name),
        **ray_options(coordinator_shape(job)),
        max_concurrency=MAX_CONCURRENCY,
        scheduling_strategy=OUTSIDE_PARENT_PLACEMENT_GROUP,  # so are its engines and tasks
    )
    return actor.remote(
        job.model_dump(mode="json"),
        records.prompts,
        asdict(variant),
        knowledge,
        records.validation,
        workers,
    )


def validation_records(job: GRPOJobConfig, records: list[dict]) -> list[dict]:
    """The records validated during the run: a fixed spread of ``validation.samples`` of
    the split (:func:`~mmrad.data.manifest.spread_subset`; the first ids would be one
    category's), none when validation is off."""
    validation = job.validation
    if not validation.every:
        return []
    chosen = records_of_split(records, validation.split, job.data.manifest, "validation.split")
    return spread_subset(chosen, validation.samples)


ENGINES_FILE = "engines.json"  # a run on kept engines: what they were when it started


def run_grpo(
    job: GRPOJobConfig, train_callbacks: Sequence = (), engines: KeptEngines | None = None
) -> GRPOResult:
    """Run (or resume) a GRPO job; ``train_callbacks`` go to the learners' Ray Train run
    (a sweep passes Tune's report callback). With ``engines`` the rollout engines are
    taken from (and stay in) this process's kept ones, reset to the starting weights;
    the run folder's ``engines.json`` records each one's reset (``pid``, ``version``,
    ``adapter_dir``, ``reloaded``)."""
    job = with_absolute_paths(job)
    check_tracking(job.run)
    init_ray(job.ray)
    check_or_log(job.ray, grpo_requests(job))
    storage = Storage.from_config(job.storage)
    records = grpo_records(job, storage)  # an empty split fails before anything is written
    if not joining_existing_cluster(job.ray):  # a cluster's workers may have paths we lack
        check_model_dir(job.model.path)
    # A rerun right after a killed driver: that driver's actors are still ending.
    wait_until_free(coordinator_name(job.run.name), f"run.name {job.run.name}")
    contract = starting_point(job, storage)
    knowledge, origin = grpo_knowledge(contract, records.train, storage)
    run_uri = join(job.run.storage_path, job.run.name)
    used = replace(contract, knowledge=knowledge, knowledge_origin=origin)
    write_run_info(storage, run_uri, job, job.schedule.seed, {"contract": used.record()})
    workers = None
    if engines is not None:
        workers = engines.take(worker_spec(job, contract.variant), job.rollout.num_workers)
    coordinator = start_coordinator(job, records, contract.variant, knowledge, workers)
    spec = {
        "config": job.model_dump(mode="json"),
        "coordinator": coordinator,
        "coordinator_name": coordinator_name(job.run.name),
        "run_uri": run_uri,
        "variant": contract.prompt.variant_dict(),
        "knowledge": export_knowledge(knowledge, origin),
    }
    ask = functools.partial(why_unrecoverable, coordinator, spec["coordinator_name"])
    final_rows = functools.partial(readable_metrics, storage, run_uri)
    try:
        trainer = make_torch_trainer(
            grpo_learner, job, spec, callbacks=train_callbacks, unrecoverable=ask
        )
        with tracked(job.run, "grpo", run_uri, job, storage, final_rows) as tracking:
            result = run_with_progress(
                f"GRPO {job.run.name}", job.run.name, lambda: fit(trainer), tracking.log_rows
            )
    finally:
        if engines is not None:
            record_engines(coordinator, storage, run_uri)
        try:
            ray.get(coordinator.stop.remote(), timeout=120)
        except Exception as err:  # the run's own error matters more
            log.warning("stopping the GRPO coordinator: %s", err)
        ray.kill(coordinator)
    checkpoint = checkpoint_uri(run_uri, result.checkpoint) if result.checkpoint else None
    export_uri = job.export.out or join(run_uri, "export")
    return GRPOResult(run_uri, export_uri, checkpoint, job.schedule.max_steps)


def record_engines(coordinator, storage: Storage, run_uri: str) -> None:
    """Write what the kept engines reported when the run's pool reset them."""
    try:
        reused = ray.get(coordinator.engines.remote(), timeout=120)
        storage.write_text(join(run_uri, ENGINES_FILE), json.dumps(reused, indent=2))
    except Exception as err:  # the run's own error, and stopping its coordinator, matter more
        log.warning("recording the GRPO run's kept engines: %s", err)

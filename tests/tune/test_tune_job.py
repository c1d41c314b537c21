"""The sweep job on the session's Ray: 4 ASHA trials of a 2-step GRPO from the session's
SFT export, the driver SIGKILLed after a trial's step-1 checkpoint, ``Tuner.restore``
that keeps the finished trials and resumes that one at step 2, and the best config run
as a GRPO job. Config errors fail early."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmrad.config import ConfigError, load_config, read_yaml
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics
from mmrad.tune.config import TuneJobConfig, trial_base
from mmrad.tune.job import TRIAL_RUNS, run_tune
from tests.helpers.checkpoints import committed_step
from tests.helpers.faults import record_fault
from tests.helpers.processes import train_workers
from tests.helpers.tracking import artifact_names, client, history, the_run_of

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/local/tune.yaml"
SESSION_GRPO = [
    "model.pixels.max_pixels=12544",  # the session SFT export's pixel budget
    "data.pixels.max_pixels=12544",
    "data.decode_cpus=0.1",
    "engine.kv_cache_bytes=67108864",
    "rollout.cpus_per_worker=0.4",
    "learners.cpus_per_worker=0.4",
    "learners.num_workers=1",  # the GRPO tests cover 2 FSDP learners; here Tune is tested
    "rollout.max_tokens=64",
]


@pytest.mark.parametrize("path", ["configs/local/tune.yaml", "configs/cluster/tune.yaml"])
def test_shipped_sweeps_and_their_trials_validate(path):
    job = load_config(TuneJobConfig, REPO / path)
    base = trial_base(job)  # every swept key checked on the GRPO config
    assert base["validation"]["every"] == job.validate_every


def test_a_misspelt_search_key_names_itself():
    job = load_config(TuneJobConfig, CONFIG, ["search_space={rewards.weights.localisation: "
                                              "{uniform: [0.5, 2.0]}}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"search_space\.rewards\.weights\.localisation.*"
                                          r"unknown component"):  # fmt: skip
        trial_base(job)


def test_trials_validate_with_the_sweep_objective():
    base = trial_base(load_config(TuneJobConfig, CONFIG, ["objective=[loc_f1]"]))
    assert base["validation"] == {"every": 1, "split": "val", "samples": 8,
                                  "max_tokens": None, "objective": ["loc_f1"]}  # fmt: skip
    with pytest.raises(ConfigError, match="objective"):
        load_config(TuneJobConfig, CONFIG, ["objective=[accuracy]"])


TRIALS = 3


def sweep_file(tmp_path: Path, export: str, manifest: str, address: str) -> Path:
    data = read_yaml(CONFIG)
    data["ray"] = {"address": address}
    data["grpo"]["overrides"] += [
        f"model.path={export}", f"data.manifest={manifest}",
        f"run.storage_path={tmp_path / 'grpo'}", *SESSION_GRPO,
        "schedule.checkpoint_every=1",  # a trial killed after step 1 resumes at step 2
    ]  # fmt: skip
    data["run"] = {
        "storage_path": str(tmp_path / "sweeps"),
        "name": "sweep",
        "loggers": ["tensorboard", "mlflow"],
    }
    data["val_samples"] = 4
    data["num_samples"] = TRIALS  # one finished before the kill, the killed one, one after
    # ASHA may not stop a trial at its first validation here: the trial whose driver is
    # killed after step 1 must go on to step 2 whatever its objective.
    data["scheduler"] = {**data["scheduler"], "grace_period": 2}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trial_dirs(sweep: Path) -> list[Path]:
    runs = sweep / TRIAL_RUNS
    return sorted(runs.iterdir()) if runs.exists() else []


def finished(trial: Path) -> bool:
    return (trial / "export" / "mmrad.json").exists()


def started(trial: Path) -> float:
    return (trial / "run_info.json").stat().st_mtime


TUNE_SNAPSHOT_S = 3.0
"""Time for Tune's driver to save its experiment state after it handled a result
(``TUNE_GLOBAL_CHECKPOINT_S`` is 1 s here, plus a turn of its loop)."""
LEARNER_SLICE_S = 0.1
"""How long the later trial's learners run between two looks at its checkpoints (a
GRPO step's learner part takes longer)."""


def tune_has_step_1(trial_id: str) -> bool:
    """Tune's driver has handled the trial's step-1 validation: its MLflow logger
    callback logged it."""
    found = client().get_experiment_by_name("mmrad-tune")
    runs = client().search_runs([found.experiment_id]) if found else []
    for run in runs:
        if run.data.tags.get("trial_name", "").endswith(trial_id):
            points = client().get_metric_history(run.info.run_id, "val/objective")
            return any(point.step == 1 for point in points)
    return False


def kill_driver_mid_trial(
    driver: subprocess.Popen, sweep: Path, log: Path, timeout: float = 1200
) -> tuple[Path, list[dict], dict[str, float]]:
    """SIGKILL the sweep's driver once a trial has finished (its GRPO export is written)
    and a later one has committed its step-1 GRPO checkpoint and Tune has saved its
    step-1 result. A GRPO step here can take under a second (the checkpoints of steps
    1 and 2 were written 0.7 s apart), so from the later trial's start its learners run
    only in slices of :data:`LEARNER_SLICE_S`: they are stopped (SIGSTOP) whenever its
    checkpoints are looked at, and stay stopped from the look that finds its step-1
    checkpoint committed until the driver is dead. Ray Train commits a checkpoint when
    its controller takes the report from the learner, which a stopped learner cannot
    give: step 2 cannot be committed in between. Returns that trial's run folder, its
    metrics rows of the committed step, and the start times of the trials finished
    before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = [t for t in trial_dirs(sweep) if (t / "run_info.json").exists()]
        done = [t for t in trials if finished(t)]
        newest = max(trials, key=started, default=None)
        if done and not finished(newest) and started(newest) > max(map(started, done)):
            learners = train_workers()  # a learner started since cannot be at step 2
            signal_each(learners, signal.SIGSTOP)
            if committed_step(Storage(), str(newest)) == 1:  # stopped: step 2 is not done
                while not tune_has_step_1(newest.name) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(TUNE_SNAPSHOT_S)
                done_before = {t.name: started(t) for t in done}
                driver.send_signal(signal.SIGKILL)
                driver.wait(timeout=60)
                signal_each(learners, signal.SIGKILL)  # Ray ends the rest of the trial
                assert not finished(newest), "the trial finished before its driver was killed"
                step = committed_step(Storage(), str(newest))
                rows = [r for r in read_metrics(Storage(), str(newest)) if r["step"] <= step]
                return newest, rows, done_before
            signal_each(learners, signal.SIGCONT)
            time.sleep(LEARNER_SLICE_S)
        else:
            time.sleep(0.2)
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed:\n{log.read_text()[-4000:]}")
    driver.kill()
    pytest.fail(f"no trial finished in time:\n{log.read_text()[-4000:]}")


def signal_each(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def assert_sweep_tracked(sweep: Path, result, trial_ids: list[str]) -> None:
    """The sweep is one MLflow run with its outputs; under it one run per trial (the
    interrupted trial's continued, not doubled), each validation at its GRPO step."""
    parent = the_run_of(str(sweep), "mmrad-tune")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/objective"] == pytest.approx(result.best_objective)
    assert {"results.csv", "results.md", "objective.png", "best_grpo.yaml"} <= artifact_names(
        parent.info.run_id
    )
    trial_runs = client().search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    names = [run.data.tags["trial_name"] for run in trial_runs]
    assert sorted(next(t for t in trial_ids if n.endswith(t)) for n in names) == trial_ids
    for run in trial_runs:
        assert run.info.status == "FINISHED"
        steps = [step for step, _ in history(run.info.run_id)["val/objective"]]
        assert steps == [1, 2], (run.data.tags["trial_name"], steps)
        assert "metrics.jsonl" in artifact_names(run.info.run_id)
        assert set(read_yaml(CONFIG)["search_space"]) <= set(run.data.params)


@pytest.mark.e2e
@pytest.mark.timeout(2400)
def test_sweep_survives_a_killed_driver_and_its_best_config_runs(
    ray_cluster, sft_trained, synthetic_local, tmp_path
):
    address = ray_cluster.get_runtime_context().gcs_address
    config = sweep_file(tmp_path, sft_trained.export_uri, synthetic_local, address)
    sweep = tmp_path / "sweeps" / "sweep"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = tmp_path / "driver.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ray_jobs.tune", "--config", str(config)],
            cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        killed_trial, committed, done_before = kill_driver_mid_trial(driver, sweep, log)

    result = run_tune(load_config(TuneJobConfig, config))  # resumes: Tuner.restore

    # The interrupted trial resumed from its GRPO checkpoint: its committed steps' rows
    # are kept as they were (a trial started over would log them anew), each step once.
    rows = read_metrics(Storage(), str(killed_trial))
    assert committed and rows[: len(committed)] == committed
    steps = [row["step"] for row in rows if "reward/total/mean" in row]
    assert steps == [1, 2], steps  # resumed at step 2: step 1 not run again
    record_fault("tune/1 sweep driver killed mid-trial", {
        "stage": "sweep", "prompts_lost": 0, "samples_repeated_or_skipped": 0,
        "fault": "the sweep's driver SIGKILLed after a trial's GRPO checkpoint 1",
        "outcome": f"Tuner.restore: {len(done_before)} finished trial(s) not rerun; the "
                   "interrupted one resumed at step 2 (step 1 not rerun)",
        "seconds_to_recover": "n/a (a rerun)",
    })  # fmt: skip

    assert result.trials == TRIALS
    trials = {t.name: t for t in trial_dirs(sweep)}
    assert done_before and len(trials) == TRIALS
    for name, mtime in done_before.items():  # finished trials were not run again
        assert started(trials[name]) == mtime
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["trial"] for row in rows) == sorted(trials)
    for row in rows:
        assert row["status"] == "done" and row["objective"], row
        assert int(row["validations"]) == 2 and finished(trials[row["trial"]]), row
    assert 0.0 <= result.best_objective <= 2.0  # det_accuracy + loc_accuracy
    assert rows[0]["trial"] == result.best_trial
    header = (sweep / "results.md").read_text().split("| trial | status |", 1)[1].split("\n")[0]
    assert all(f" {key} |" in header for key in read_yaml(config)["search_space"])
    assert (sweep / "objective.png").read_bytes()[:4] == b"\x89PNG"

    assert_sweep_tracked(sweep, result, sorted(trials))

    best = load_config(GRPOJobConfig, result.best_config_uri)  # runs as is
    best_row = rows[0]
    assert best.rewards.weights["localization"] == pytest.approx(
        float(best_row["rewards.weights.localization"])
    )
    grpo = run_grpo(best)
    assert grpo.steps == 2 and Path(grpo.export_uri, "mmrad.json").exists()

    started_with = read_yaml(config)
    for key, change, names in (
        ("search_space", {"algorithm.kl_beta": {"choice": [0.0, 0.1]}},
         "another search space: algorithm.kl_beta.choice: [0.0, 0.01] then, [0.0, 0.1] now"),
        ("grpo", {"overrides": [*started_with["grpo"]["overrides"], "rollout.max_tokens=48"]},
         "another base GRPO config (file and overrides): rollout.max_tokens: 64 then, 48 now"),
    ):  # fmt: skip
        changed = tmp_path / f"changed-{key}.yaml"
        changed.write_text(yaml.safe_dump({**started_with, key: {**started_with[key], **change}}))
        with pytest.raises(ConfigError, match=re.escape(names)):
            run_tune(load_config(TuneJobConfig, changed))
    assert result.trials == len(trial_dirs(sweep)) == TRIALS  # the refusals started none

"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1 with token auth.

The cluster is started without the venv on ``PATH``: the job names its interpreter, as
README's submit commands do, with ``py_executable`` in its ``runtime_env`` (every worker
it starts) and in its entrypoint (the driver, which Ray runs as a shell command)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mmrad.config import RayConfig
from mmrad.placement import local_resources
from mmrad.ray_env import PREEMPTION_WATCHER, auth_token_path, local_system_config
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics
from tests.conftest import WARM_WORKERS
from tests.helpers.checkpoints import committed_step
from tests.helpers.faults import record_fault, wait_for
from tests.helpers.readme_commands import check_readme_after_demo
from tests.helpers.tracking import assert_tracked_as_its_table, the_run_of

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8275
JOBS_ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"
# the same warm worker pool as the session's Ray
WARM_POOL = json.dumps(local_system_config(RayConfig(warm_workers=WARM_WORKERS)))
# a head that works too, as cluster.yaml's worker nodes do (mmrad.placement)
WORKER_NODE = json.dumps(local_resources(RayConfig()))
JOB_PYTHON = sys.executable  # the venv's
JOB_ENV = json.dumps({"py_executable": JOB_PYTHON,
                      "excludes": [".venv", "runs", ".git", "*.pyc", "__pycache__"]})  # fmt: skip


def without_venv(path: str) -> str:
    """``PATH`` less the venv's bin folder: no job finds the venv's python by name."""
    venv_bin = Path(sys.executable).parent.resolve()
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != venv_bin)


def cluster_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = without_venv(env["PATH"])
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(auth_token_path(state))
    env[PREEMPTION_WATCHER] = "0"  # as on the local clusters mmrad starts
    env.pop("RAY_ADDRESS", None)
    return env


def ray_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head_cluster(tmp_path_factory):
    state = Path(tmp_path_factory.mktemp("head", numbered=True))
    temp_dir = Path("/tmp") / f"mmrad-head-{os.getpid()}"
    env = cluster_env(state)
    started = ray_cli(
        env, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6390",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
        "--dashboard-agent-listen-port=52375", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", f"--system-config={WARM_POOL}", f"--resources={WORKER_NODE}",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    yield env
    stop_processes_of(temp_dir)


def stop_processes_of(temp_dir: Path) -> None:
    """End exactly the processes this cluster started (``ray stop`` would end every Ray
    process on the machine, other clusters' included): those whose command line names
    its temp dir, and their descendants."""
    import psutil

    marker = str(temp_dir)
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(marker in part for part in (p.info["cmdline"] or []))]  # fmt: skip
    family = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for process in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def submit(env: dict[str, str], *entrypoint: str) -> str:
    """Submit ``<venv python> -m <entrypoint>`` with the repo as working dir and the venv's
    python as ``py_executable``; returns the job id."""
    submitted = ray_cli(
        env, "job", "submit", f"--address={JOBS_ADDRESS}", "--working-dir", str(REPO),
        "--runtime-env-json", JOB_ENV, "--no-wait", "--", JOB_PYTHON, "-m", *entrypoint,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    output = submitted.stdout + submitted.stderr
    return next(line.split("'")[1] for line in output.splitlines() if "submitted" in line)


def wait_for_job(env: dict[str, str], job_id: str) -> tuple[str, str]:
    """Wait for the job's end; returns its final status (lower case) and its logs. The
    status is polled over the Jobs REST API (``ray job status`` would start a Python
    process every poll, a core-second each on a 2-core machine running the job)."""
    import httpx

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    headers = {"authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 1500
    status = ""
    while time.monotonic() < deadline:
        reply = httpx.get(f"{JOBS_ADDRESS}/api/jobs/{job_id}", headers=headers, timeout=30)
        reply.raise_for_status()
        status = reply.json()["status"].lower()
        if status in ("succeeded", "failed", "stopped"):
            break
        time.sleep(1)
    answer = ray_cli(env, "job", "logs", f"--address={JOBS_ADDRESS}", job_id)
    return status, answer.stdout + answer.stderr


def submit_and_wait(env: dict[str, str], *entrypoint: str) -> tuple[str, str]:
    return wait_for_job(env, submit(env, *entrypoint))


def kill_driver_after_sft_checkpoint(run: Path, step: int) -> tuple[Path, list[dict]]:
    """SIGKILL the pipeline job's driver once its SFT stage committed checkpoint ``step``;
    returns the SFT run's folder and its metrics rows up to that step."""
    sft = wait_for(lambda: next(iter(run.glob("sft-*/*/checkpoint_*")), None), "SFT", 900).parent
    wait_for(lambda: committed_step(Storage(), str(sft)) >= step, f"SFT checkpoint {step}", 900)
    (driver,) = [p for p in psutil.process_iter(["cmdline"])
                 if "ray_jobs.pipeline" in (p.info["cmdline"] or [])
                 and f"run.storage_path={run.parent}" in p.info["cmdline"]]  # fmt: skip
    driver.kill()
    done = committed_step(Storage(), str(sft))
    return sft, [row for row in read_metrics(Storage(), str(sft)) if row["step"] <= done]


def assert_patch_head_trained_and_left_out(sft: Path, rows: list[dict]) -> None:
    """SFT's auxiliary vision head (``objective.patch_loss``): its loss logged every step,
    the head and its AdamW moments checkpointed, and none of it in the stage's export."""
    from safetensors import safe_open

    from tests.helpers.checkpoints import latest_checkpoint, read_checkpoint

    patch = [row["train/patch_loss"] for row in rows if "train/patch_loss" in row]
    assert len(patch) == len([row for row in rows if "train/loss" in row]) > 0
    checkpoint = read_checkpoint(Storage(), latest_checkpoint(Storage(), str(sft)))
    assert any("mmrad_patch_head" in key and key.endswith("exp_avg") for key in checkpoint)
    with safe_open(sft.parent / "export" / "model.safetensors", "pt") as exported:
        names = list(exported.keys())
    assert names and not any("patch_head" in name for name in names)


SMALL_PIPELINE = [
    "data.overrides=['data.synthetic.categories=[brick, grass, coins]', "
    "data.synthetic.images_per_category=8, data.synthetic.image_size=112, "
    "'data.split.test_categories=[coins]']",
    "sft.overrides=[schedule.max_steps=4, schedule.checkpoint_every=2, validation.every=2, "
    "objective.patch_loss=0.5]",
    "grpo.overrides=[schedule.max_steps=2, schedule.checkpoint_every=2, "
    "schedule.sample_table_every=1, rollout.prompts_per_step=2, rollout.max_tokens=64, "
    "sync.weights=full, algorithm.max_staleness=0]",
    "eval.overrides=[data.limit=4, sampling.max_tokens=64]",
    "serve.images=2",
]


def test_pipeline_job_runs_through_ray_job_submit(head_cluster, tmp_path):
    """SFT (full weights) → GRPO (full-weight sync, on-policy: ``make demo`` runs LoRA one
    step off) → evaluation → Serve smoke test, as a submitted job whose driver is
    SIGKILLed after SFT's step-2 checkpoint and which is then submitted again: the rerun
    skips the finished stages, resumes SFT (its first steps' rows kept as they were),
    and writes the report and the served answers."""
    run = tmp_path / "submitted"
    command = ("ray_jobs.pipeline", "--config", "configs/local/pipeline.yaml",
               f"run.storage_path={tmp_path}", "run.name=submitted", *SMALL_PIPELINE)  # fmt: skip
    first = submit(head_cluster, *command)
    sft, committed = kill_driver_after_sft_checkpoint(run, step=2)
    status, _ = wait_for_job(head_cluster, first)
    assert "failed" in status, status

    status, logs = submit_and_wait(head_cluster, *command)
    assert "succeeded" in status, logs[-4000:]
    for stage in ("tiny_model", "data"):
        assert f"{stage}: skipped" in logs, logs[-4000:]
    for stage in ("sft", "grpo", "eval_base", "eval_sft", "eval", "serve"):
        assert f"{stage}: ran" in logs, logs[-4000:]
    rows = read_metrics(Storage(), str(sft))
    assert committed and rows[: len(committed)] == committed  # resumed, not started over
    assert max(row["step"] for row in rows) == 4
    assert_patch_head_trained_and_left_out(sft, rows)
    record_fault("pipeline/1 driver killed during SFT, then resubmitted", {
        "stage": "pipeline (SFT)", "prompts_lost": 0, "samples_repeated_or_skipped": 0,
        "fault": "the submitted pipeline job's driver SIGKILLed after SFT's checkpoint 2",
        "outcome": "the job fails; resubmitted, it skips finished stages and resumes SFT at "
                   "step 3",
        "seconds_to_recover": "n/a (a resubmission)",
    })  # fmt: skip
    (metrics,) = run.glob("eval-*/eval/metrics.json")
    assert {"det_accuracy", "loc_accuracy", "auroc"} <= set(json.loads(metrics.read_text()))
    # The paper's table of the three models on the same test images, base → SFT → GRPO.
    table = (run / "table/table.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == [
        "base", "SFT", "GRPO"
    ]  # fmt: skip
    assert (run / "table/table.tex").is_file() and (run / "table/table.png").is_file()
    assert "the evaluated models" in logs and table.splitlines()[0] in logs
    images = {json.loads(p.read_text())["n_images"] for p in run.glob("eval*/eval/metrics.json")}
    assert images == {4}
    (responses,) = run.glob("serve-*/responses.json")
    answers = json.loads(responses.read_text())
    assert len(answers) == 2 and all(0.0 <= (a["score"] or 0.0) <= 1.0 for a in answers)
    (grpo_metrics,) = run.glob("grpo-*/grpo/metrics.jsonl")
    steps = [json.loads(line) for line in grpo_metrics.read_text().splitlines()]
    steps = [step for step in steps if "reward/total/mean" in step]
    assert [step["version_lag"] for step in steps] == [0, 0]

    # What `make demo` logs: every training and evaluation stage in MLflow (the job
    # inherits the session's MLFLOW_TRACKING_URI from the head), the resumed SFT as one run.
    assert_tracked_as_its_table(str(sft), "mmrad-sft")
    assert_tracked_as_its_table(str(grpo_metrics.parent), "mmrad-grpo")
    evaluated = the_run_of(str(metrics.parent), "mmrad-eval")
    assert evaluated.data.metrics["det_accuracy"] == json.loads(metrics.read_text())["det_accuracy"]

    # The README's commands as written, against this run as if it were `make demo`'s.
    checks = check_readme_after_demo(tmp_path / "latest", tmp_path / "readme")
    assert [problem for check in checks.values() for problem in check.problems] == []
    assert "sft" in {p.name for p in (tmp_path / "latest").iterdir()}

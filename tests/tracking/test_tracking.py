"""The trackers on their real backends: MLflow's SQLite store read back with MLflow's own
client, W&B in offline mode read back from its run file. No Ray."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mmrad.config import RESTART_ROW, SFTJobConfig, TrackedRunSection, load_config
from mmrad.storage import Storage
from mmrad.tracking.mlflow_run import MlflowRun
from mmrad.tracking.run import TrackingError, check_tracking, open_tracking, tracked
from mmrad.tracking.values import flat_metrics, flat_params, metric_key, metric_values, shown
from mmrad.train.metrics_log import MetricsLog
from tests.conftest import TEST_BUCKET
from tests.helpers.tracking import latest_by_step
from tests.helpers.wandb_offline import offline_history


def section(tmp_path: Path, *overrides: str) -> TrackedRunSection:
    """A run section whose MLflow store is this test's own SQLite file."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    return load_config(SFTJobConfig, None, [f"run.mlflow.tracking_uri={store}", *overrides]).run


def mlflow_of(run: TrackedRunSection) -> MlflowClient:
    return MlflowClient(tracking_uri=run.mlflow.tracking_uri)


def rows(*steps: int, **offsets: float) -> list[dict]:
    return [{"step": s, "time": 1e9 + s, "loss": 1.0 / s + offsets.get("loss", 0.0),
             "lr": 0.1 * s, "note": "text is not a metric"} for s in steps]  # fmt: skip


def points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# -- values -------------------------------------------------------------------------------


def test_a_config_becomes_dotted_parameters():
    params = flat_params({"optimizer": {"lr": 0.001, "betas": [0.9, 0.95]}, "name": "x",
                          "prompt": {}, "seed": None})  # fmt: skip
    assert params == {"optimizer.lr": "0.001", "optimizer.betas": "[0.9, 0.95]", "name": "x",
                      "prompt": "{}", "seed": "null"}  # fmt: skip


def test_a_row_keeps_its_finite_numbers_under_keys_trackers_take():
    row = {"step": 3, "time": 5.0, "reward/total/mean": 0.5, "ok": True, "text": "no",
           "nan": float("nan"), "weird key%": 2, "list": [1]}  # fmt: skip
    assert metric_values(row) == {"reward/total/mean": 0.5, "ok": 1.0, "weird key_": 2.0}


def test_a_report_flattens_to_slash_joined_metrics():
    metrics = {"det_f1": 0.5, "auroc": None, "per_source": {"mvtec": {"det_f1": 0.25}}}
    assert flat_metrics(metrics) == {"det_f1": 0.5, "per_source/mvtec/det_f1": 0.25}


# -- MLflow -------------------------------------------------------------------------------


def test_mlflow_logs_each_step_once_and_a_resume_logs_the_steps_it_runs_again(tmp_path):
    run = section(tmp_path)
    first = MlflowRun.open(run.mlflow, "mmrad-sft", "r1", "/runs/sft/r1", "sft")
    first.log_params({"optimizer.lr": "0.1", "seed": "0"})
    first.log_rows([{"step": 0, RESTART_ROW: 0}, *rows(1, 2, 3)])
    first.log_rows(rows(2, 3))  # the board and the final pass over the table overlap
    again = MlflowRun.open(run.mlflow, "mmrad-sft", "r1", "/runs/sft/r1", "sft")
    again.log_params({"optimizer.lr": "0.2", "new": "1"})  # a resume may change the config
    again.log_rows(rows(3))  # a late row of the crashed attempt's last step: had already
    # restored from the checkpoint of step 1: steps 2-3 run again, with other values
    again.log_rows([{"step": 1, RESTART_ROW: 1}, *rows(2, 3, 4, loss=100.0)])
    again.log_rows(rows(1, 2, 3, 4, loss=100.0))  # the last pass: nothing new
    again.finish(failed=False)

    client = mlflow_of(run)
    assert again.run_id == first.run_id
    both = [(1, 1.0), (2, 0.5), (2, 100.5), (3, 1 / 3), (3, 100 + 1 / 3), (4, 100.25)]
    assert points(client, first.run_id, "loss") == both
    latest = latest_by_step(client.get_metric_history(first.run_id, "loss"))
    assert latest == {1: 1.0, 2: 100.5, 3: 100 + 1 / 3, 4: 100.25}  # what the table holds
    assert client.get_run(first.run_id).data.metrics["loss"] == 100.25
    assert "restarted_from_step" not in client.get_run(first.run_id).data.metrics
    finished = client.get_run(first.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params == {"optimizer.lr": "0.1", "seed": "0", "new": "1"}
    assert finished.data.tags["mmrad.run_uri"] == "/runs/sft/r1"
    other = MlflowRun.open(run.mlflow, "mmrad-sft", "r2", "/runs/sft/r2", "sft")
    fresh = MlflowRun.open(run.mlflow, "mmrad-sft", "r1", "/runs/sft/r1", "sft", resume=False)
    assert len({first.run_id, other.run_id, fresh.run_id}) == 3
    experiment = client.get_experiment_by_name("mmrad-sft")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_a_rerun_logs_the_rows_its_killed_driver_never_forwarded(tmp_path):
    """A driver killed after its workers wrote step 2's validation row but before it
    forwarded the row to MLflow: the rerun's live rows start after its restart row, so
    the row reaches MLflow only when the rerun opens its run (its last pass would skip
    it: by then MLflow has the key at a later step)."""
    run = section(tmp_path)
    run_dir = tmp_path / "runs" / "sft" / "killed"
    run_dir.mkdir(parents=True)
    config = load_config(SFTJobConfig, None, [])
    validation = {"step": 2, "time": 1e9 + 2, "val/loss": 6.0}
    table = [*rows(1, 2), validation]
    killed = open_tracking(run, "sft", str(run_dir), config, Storage())
    killed.log_rows(rows(1, 2))  # then SIGKILL: no last pass, the validation row unsent
    table += [{"step": 2, RESTART_ROW: 2}, *rows(3, 4), {**validation, "step": 4}]
    with tracked(run, "sft", str(run_dir), config, Storage(), lambda: table) as tracking:
        tracking.log_rows(table[3:])  # what the rerun's workers post

    client = mlflow_of(run)
    (found,) = client.search_runs([client.get_experiment_by_name("mmrad-sft").experiment_id])
    assert points(client, found.info.run_id, "val/loss") == [(2, 6.0), (4, 6.0)]
    assert latest_by_step(client.get_metric_history(found.info.run_id, "loss")) == {
        s: 1.0 / s for s in (1, 2, 3, 4)
    }


def test_a_failed_run_is_marked_failed_with_its_rows_and_its_own_files(tmp_path):
    run = section(tmp_path)
    run_dir = tmp_path / "runs" / "sft" / "broken"
    (run_dir / "checkpoint_000001").mkdir(parents=True)
    (run_dir / "checkpoint_000001" / "model.pt").write_bytes(b"weights")
    (run_dir / "config.yaml").write_text("a: 1\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(1, 2)))
    config = load_config(SFTJobConfig, None, [])
    with (
        pytest.raises(RuntimeError, match="worker died"),
        tracked(run, "sft", str(run_dir), config, Storage(), lambda: rows(1, 2)) as tracking,
    ):
        tracking.log_rows(rows(1))
        raise RuntimeError("worker died")

    client = mlflow_of(run)
    (found,) = client.search_runs([client.get_experiment_by_name("mmrad-sft").experiment_id])
    assert found.info.status == "FAILED"
    assert points(client, found.info.run_id, "loss") == [(1, 1.0), (2, 0.5)]
    assert found.data.params["optimizer.lr"] == str(config.optimizer.lr)
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert names == {"config.yaml", "metrics.jsonl"}  # no checkpoint folders


@pytest.mark.integration
def test_run_files_on_object_storage_are_logged(tmp_path, s3_server):
    storage = Storage()
    run_uri = f"s3://{TEST_BUCKET}/tracking/run-files"
    storage.ensure_bucket(run_uri)
    storage.write_text(f"{run_uri}/report.md", "# report\n")
    storage.write_text(f"{run_uri}/checkpoint_000002/state.json", "{}")
    run = section(tmp_path)
    tracking = open_tracking(run, "eval", run_uri, load_config(SFTJobConfig, None, []), storage)
    tracking.log_run_files()
    tracking.finish(failed=False)
    run_id = tracking.trackers["mlflow"].run_id
    artifacts = mlflow_of(run).list_artifacts(run_id)
    assert [a.path for a in artifacts] == ["report.md"]
    local = mlflow_of(run).download_artifacts(run_id, "report.md", str(tmp_path))
    assert Path(local).read_text() == "# report\n"


def test_a_tracking_server_that_does_not_answer_fails_fast_and_names_the_logger(tmp_path):
    run = section(tmp_path)
    run.mlflow.tracking_uri = "http://user:secret@127.0.0.1:9"  # the discard port: refused
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with pytest.raises(TrackingError, match="run.loggers names mlflow") as err:
        check_tracking(run)
    assert "secret" not in str(err.value)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before  # the check's own
    assert shown("at http://u:pw@host:5000/x: refused") == "at http://u:***@host:5000/x: refused"


def test_a_tracker_that_is_not_installed_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a missing module
    run = section(tmp_path, "run.loggers=[mlflow,wandb]")
    with pytest.raises(TrackingError, match=r"pip install 'mmrad\[wandb\]'"):
        check_tracking(run)


def test_loggers_are_checked_when_the_config_is_read():
    with pytest.raises(Exception, match="loggers"):
        load_config(SFTJobConfig, None, ["run.loggers=[mlflow,comet]"])
    with pytest.raises(Exception, match="more than once"):
        load_config(SFTJobConfig, None, ["run.loggers=[mlflow,mlflow]"])
    with pytest.raises(Exception, match="tracking_uri"):
        load_config(SFTJobConfig, None, ["run.mlflow.store=s3://bucket/mlflow.db"])


def test_the_embedded_store_is_a_sqlite_file_beside_the_runs(tmp_path, monkeypatch):
    from mmrad.tracking.mlflow_run import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    run = load_config(SFTJobConfig, None, []).run
    assert tracking_uri(run.mlflow) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(run.mlflow) == "http://127.0.0.1:5000"
    run.mlflow.tracking_uri = "http://tracking:80"
    assert tracking_uri(run.mlflow) == "http://tracking:80"


# -- W&B ----------------------------------------------------------------------------------


def test_wandb_offline_run_holds_the_rows_and_a_rerun_resumes_it(tmp_path):
    run = section(tmp_path, "run.loggers=[wandb]", f"run.wandb.dir={tmp_path}",
                  "run.wandb.mode=offline")  # fmt: skip
    config = load_config(SFTJobConfig, None, [])
    with tracked(run, "sft", "/runs/sft/w", config, Storage()) as tracking:
        tracking.log_rows(rows(1, 2))
        run_id = tracking.trackers["wandb"].run.id
    time.sleep(1.1)  # W&B names an offline run's folder by the second: a rerun in the same
    # second would write into the first one's folder and hide it
    with tracked(run, "sft", "/runs/sft/w", config, Storage()) as tracking:
        tracking.log_rows(rows(2, 3))
        assert tracking.trackers["wandb"].run.id == run_id

    logged = offline_history(tmp_path, run_id)
    assert sorted(logged) == [1, 2, 3]
    assert logged[3]["loss"] == pytest.approx(1 / 3)
    assert "note" not in logged[1]


# -- the workers' side --------------------------------------------------------------------


def test_metrics_log_hands_each_row_on_and_writes_tensorboard_only_when_asked(tmp_path):
    handed = []
    metrics = MetricsLog(tmp_path, str(tmp_path), Storage(), tensorboard=False,
                         on_row=handed.append)  # fmt: skip
    metrics.log(1, {"loss": 0.5})
    metrics.text(1, "samples", "a table")
    metrics.close()
    restart, row = handed  # a (re)started log first says where it starts: step 0
    assert restart == {"step": 0, RESTART_ROW: 0} and (row["step"], row["loss"]) == (1, 0.5)
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5


def test_the_ui_of_make_mlflow_ui_is_the_version_that_writes_the_store():
    """``make mlflow-ui`` installs the full mlflow package beside the venv; a store made by
    another version would need a migration first."""
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    version = re.search(r"^MLFLOW_VERSION := (\S+)$", makefile, re.M).group(1)
    assert version == metadata.version("mlflow-skinny")


# -- what the review found ------------------------------------------------------------------


def test_keys_mlflow_would_refuse_are_made_normal():
    assert metric_key("per_category/synthetic//det_f1") == "per_category/synthetic/det_f1"
    assert metric_key("/a/./b/../c/") == "a/_/b/_/c"
    assert len(metric_key("k" * 400)) == 250


def test_passwords_in_urls_are_masked_in_parameters_and_messages():
    params = flat_params({"target": {"url": "https://bob:p@ss@api.example.com/v1"}})
    assert params == {"target.url": "https://bob:***@api.example.com/v1"}
    assert shown("no URL here: user@host") == "no URL here: user@host"


def test_a_submitted_jobs_relative_store_moves_out_of_rays_copy_of_the_working_dir(
    tmp_path, monkeypatch
):
    from mmrad.tracking.mlflow_run import embedded_store

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    copy = tmp_path / "ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab12"
    run = load_config(SFTJobConfig, None, [f"run.mlflow.store={copy}/runs/mlflow.db"]).run
    assert embedded_store(run.mlflow) == tmp_path / "home/mmrad/runs/mlflow.db"
    run.mlflow.store = str(tmp_path / "elsewhere/./mlflow.db")
    assert embedded_store(run.mlflow) == tmp_path / "elsewhere/mlflow.db"


def test_a_batch_that_failed_is_sent_again_and_a_failing_tracker_waits_for_the_last_pass(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = section(tmp_path)
    tracking = open_tracking(run, "sft", "/runs/sft/flaky", load_config(SFTJobConfig, None, []),
                             Storage())  # fmt: skip
    mlflow_run = tracking.trackers["mlflow"]
    store = mlflow_run.client
    mlflow_run.client = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens
    tracking.log_rows(rows(1))  # fails: a warning, and the tracker waits
    mlflow_run.client = store
    tracking.log_rows(rows(2))  # skipped while the run goes on
    assert points(store, mlflow_run.run_id, "loss") == []
    tracking.last_pass(rows(1, 2, 3))
    assert points(store, mlflow_run.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_wandb_online_without_a_key_fails_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    run = section(tmp_path, "run.loggers=[wandb]", "run.wandb.mode=online")
    with pytest.raises(TrackingError, match="WANDB_API_KEY"):
        check_tracking(run)


def test_a_tracker_that_cannot_open_leaves_no_run_of_another_running(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = section(tmp_path, "run.loggers=[mlflow,wandb]")
    with pytest.raises(TrackingError, match="wandb"):
        open_tracking(run, "sft", "/runs/sft/half", load_config(SFTJobConfig, None, []),
                      Storage())  # fmt: skip
    client = mlflow_of(run)
    (half,) = client.search_runs([client.get_experiment_by_name("mmrad-sft").experiment_id])
    assert half.info.status == "FAILED"


def test_mlflow_gets_bounded_retries_and_no_telemetry_unless_the_user_chose(tmp_path, monkeypatch):
    from mmrad.tracking.mlflow_run import mlflow_client

    for name in ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")  # the user's own
    mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"

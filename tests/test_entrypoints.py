"""The entry points users type: ``mmrad --version``, ``--print-config`` on every command and
job, and one mapping of user errors to an exit status and one line (``mmrad.jobs``),
shared by the CLI and ``python -m ray_jobs.<job>``. Nothing here starts Ray."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from mmrad.annotate.config import AnnotateJobConfig
from mmrad.cli import app
from mmrad.config import (
    ConfigError,
    DataJobConfig,
    PipelineConfig,
    SFTJobConfig,
    dump_config,
    load_config,
)
from mmrad.detect.config import DetectJobConfig
from mmrad.eval.config import EvalJobConfig
from mmrad.jobs import exits_on_user_errors, one_line, user_errors
from mmrad.rl.config import GRPOJobConfig
from mmrad.serve.config import load_serve_file
from mmrad.serve.deploy import dump_serve_file
from mmrad.tune.config import TuneJobConfig
from tests.helpers.entrypoints import run_job_module

REPO = Path(__file__).resolve().parents[1]
LOCAL = "configs/local"

# command line (after `mmrad`), its config model and file, what its arguments override
COMMANDS = [
    (["data", "build"], DataJobConfig, "data.yaml", []),
    (["data", "stats", "runs/x"], DataJobConfig, "data.yaml", []),
    (["sft"], SFTJobConfig, "sft.yaml", []),
    (["grpo"], GRPOJobConfig, "grpo.yaml", []),
    (["tune"], TuneJobConfig, "tune.yaml", []),
    (["eval", "run"], EvalJobConfig, "eval.yaml", []),
    (["eval", "report", "runs/x"], EvalJobConfig, "eval.yaml", []),
    (["eval", "compare", "runs/x"], EvalJobConfig, "eval.yaml", []),
    (["eval", "table", "runs/x"], EvalJobConfig, "eval.yaml", []),
    (["annotate"], AnnotateJobConfig, "annotate.yaml", []),
    (["detect", "runs/images"], DetectJobConfig, "detect.yaml", ["input=runs/images"]),
    (["pipeline"], PipelineConfig, "pipeline.yaml", []),
]
# job module, its config model, its config file
JOBS = [
    ("sft", SFTJobConfig, "sft.yaml"),
    ("grpo", GRPOJobConfig, "grpo.yaml"),
    ("tune", TuneJobConfig, "tune.yaml"),
    ("evaluate", EvalJobConfig, "eval.yaml"),
    ("annotate", AnnotateJobConfig, "annotate.yaml"),
    ("detect", DetectJobConfig, "detect.yaml"),
    ("pipeline", PipelineConfig, "pipeline.yaml"),
]


@pytest.fixture
def no_ray_started():
    was_up = ray.is_initialized()
    yield
    assert ray.is_initialized() == was_up


def test_version_is_the_installed_packages():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"mmrad {version('mmrad')}\n"


@pytest.mark.parametrize(
    ("command", "model", "file", "overrides"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS]
)
def test_every_command_prints_its_resolved_config(command, model, file, overrides, no_ray_started):
    path = f"{LOCAL}/{file}"
    result = CliRunner().invoke(app, [*command, "--config", path, "--print-config"])
    assert result.exit_code == 0, result.output
    assert result.stdout == dump_config(load_config(model, path, overrides))


def test_print_config_shows_overrides_and_refuses_a_bad_one(no_ray_started):
    args = ["sft", "-c", f"{LOCAL}/sft.yaml", "--print-config"]
    shown = CliRunner().invoke(app, [*args, "schedule.max_steps=7"])
    assert yaml.safe_load(shown.stdout)["schedule"]["max_steps"] == 7
    refused = CliRunner().invoke(app, [*args, "schedule.max_steps=x"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.output.startswith("config error: ") and "schedule.max_steps" in refused.output


def test_serve_prints_the_resolved_serve_file(no_ray_started):
    path = f"{LOCAL}/serve.yaml"
    result = CliRunner().invoke(app, ["serve", "-c", path, "--print-config",
                                      "applications.mmrad.args.auth_token=hush"])  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    args = printed["applications"][0]["args"]
    assert Path(args["model_dir"]).is_absolute() and "hush" not in result.stdout
    assert args["max_tokens"] == 512 and args["auth_token"] == "**********"  # defaults filled
    assert printed["http_options"] == {"host": "127.0.0.1", "port": 8000}


@pytest.mark.parametrize(("job", "model", "file"), JOBS, ids=[j[0] for j in JOBS])
def test_every_job_prints_its_resolved_config(job, model, file, capsys, no_ray_started):
    path = f"{LOCAL}/{file}"
    assert run_job_module(job, "--config", path, "--print-config") == 0
    assert capsys.readouterr().out == dump_config(load_config(model, path))


def test_the_serve_job_prints_the_resolved_serve_file(capsys, no_ray_started):
    path = f"{LOCAL}/serve.yaml"
    assert run_job_module("serve", "-c", path, "x=1", "--print-config") == 2  # unknown key
    assert run_job_module("serve", "-c", path, "--print-config") == 0
    assert capsys.readouterr().out == dump_serve_file(load_serve_file(path))


# job, arguments, exit status, the one line's start; {tiny_model}: a model that exists
# (a clean clone has no demo run for the local configs' models)
BAD_INPUT = [
    ("sft", ["data.manifest=/nonexistent/m.parquet"], 1, "error: /nonexistent/m.parquet"),
    (
        "evaluate",
        ["data.manifest=/nonexistent/m.parquet", "target.path={tiny_model}"],
        1,
        "error: /nonexistent/m.parquet",
    ),
    ("annotate", ["input=/nonexistent/m.parquet"], 1, "error: /nonexistent/m.parquet"),
    (
        "detect",
        ["input=/nonexistent/images", "target.path={tiny_model}"],
        1,
        "error: /nonexistent/images",
    ),
    ("tune", ["grpo.overrides=[data.manifest=/nonexistent/m.parquet]"], 1, "error: /nonexistent"),
    ("pipeline", ["data.config=/nonexistent.yaml"], 2, "config error: /nonexistent.yaml"),
    ("serve", ["applications.mmrad.import_path=other:app"], 2, "config error: "),
]


@pytest.mark.parametrize(
    ("job", "args", "status", "line"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT]
)
def test_jobs_end_bad_input_with_one_line_and_the_clis_status(
    job, args, status, line, capsys, no_ray_started, tiny_model
):
    file = {"evaluate": "eval.yaml"}.get(job, f"{job}.yaml")
    args = [arg.format(tiny_model=tiny_model) for arg in args]
    assert run_job_module(job, "--config", f"{LOCAL}/{file}", *args) == status
    err = capsys.readouterr().err.strip().splitlines()[-1:]
    assert err and err[0].startswith(line) and "Traceback" not in err[0]


def test_a_job_process_prints_no_traceback_for_a_missing_model():
    """The case from the issue, as a real process: one line on stderr, status 1."""
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.evaluate", "--config", f"{LOCAL}/eval.yaml",
         "target.path=/nonexistent"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "error: target.path /nonexistent: no model there (no config.json or mmrad.json)"
    )


# -- the mapping itself ----------------------------------------------------------------


def test_every_user_error_exits_1_with_one_line(capsys):
    for kind in user_errors():
        with pytest.raises(SystemExit) as exit_, exits_on_user_errors():
            raise kind("first line\n  second [line]")
        assert exit_.value.code == 1, kind
        assert capsys.readouterr().err == "error: first line; second [line]\n", kind


def test_a_config_error_at_run_time_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_, exits_on_user_errors():
        raise ConfigError("run runs/x: the checkpoint was trained in another data order")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("config error: run runs/x: the checkpoint")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError), exits_on_user_errors():
        raise KeyError("a bug")


def test_a_ray_task_error_shows_its_cause_not_the_remote_traceback():
    from ray.exceptions import RayTaskError

    from mmrad.storage import StorageError

    cause = StorageError("s3://b/m.parquet: access denied")
    wrapped = RayTaskError("read", "Traceback (most recent call last):\n  ...", cause)
    wrapped = wrapped.as_instanceof_cause()
    assert isinstance(wrapped, StorageError)
    assert one_line(wrapped) == "s3://b/m.parquet: access denied"


def test_the_cli_maps_a_user_error_raised_by_a_command(tmp_path, no_ray_started):
    result = CliRunner().invoke(app, ["data", "stats", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1

"""cluster.yaml is a valid Ray cluster-launcher config, by Ray's own schema and defaults,
whose node types can host every request of configs/cluster/*; the Dockerfile it runs."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from mmrad.config import SFTJobConfig, load_config
from mmrad.eval.config import EvalJobConfig
from mmrad.eval.inference import predictors_request
from mmrad.placement import (
    PlacementError,
    Request,
    check_placement,
    launcher_node_types,
    learners_request,
)
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.resources import grpo_requests
from mmrad.serve.config import load_serve_file
from mmrad.tune.config import TuneJobConfig, trial_base
from mmrad.tune.job import sweep_requests

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DEEP_LEARNING_AMI = ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                     "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema_after_its_defaults(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_head_takes_no_work_and_gpu_workers_scale_from_zero(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    instance_types = {spec["node_config"]["InstanceType"] for spec in workers.values()}
    assert {"g5.12xlarge", "p5.48xlarge"} <= instance_types
    for spec in workers.values():
        assert spec["min_workers"] == 0 < spec["max_workers"]


def test_nodes_run_the_mmrad_image_on_the_current_deep_learning_ami(cluster):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cluster["docker"]["image"].endswith(f"/mmrad:{version}")  # built from the Dockerfile
    assert not cluster["setup_commands"], "nothing is installed at boot"
    for spec in cluster["available_node_types"].values():
        config = spec["node_config"]
        assert config["ImageId"] == DEEP_LEARNING_AMI, "the AMI is looked up, never pinned"
        assert "IamInstanceProfile" in config, "S3 access by instance profile"


def test_every_node_exports_metrics_on_the_port_the_readme_names(cluster):
    readme = " ".join((REPO / "README.md").read_text().split())  # lines wrap anywhere
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(command for command in commands if "ray start" in command)
        port = re.search(r"--metrics-export-port=(\d+)", start)
        assert port, start
        assert f"metrics export port ({port.group(1)}" in readme


def test_a_broken_cluster_yaml_is_rejected(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_p5_48xlarge"]["max_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(broken))


def cluster_config_requests() -> dict[str, list[Request]]:
    """What each job of configs/cluster/ asks of the cluster, as mmrad will ask it."""
    folder = REPO / "configs/cluster"
    sft = load_config(SFTJobConfig, folder / "sft.yaml")
    grpo = load_config(GRPOJobConfig, folder / "grpo.yaml")
    evaluation = load_config(EvalJobConfig, folder / "eval.yaml")
    tune = load_config(TuneJobConfig, folder / "tune.yaml")
    serve = load_serve_file(folder / "serve.yaml").config["applications"][0]["deployments"][0]
    options = serve["ray_actor_options"]
    replica = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"],
               "accelerator_type:" + options["accelerator_type"]: 0.001}  # fmt: skip
    return {
        "sft": [learners_request(sft.ray, sft.learners)],
        "grpo": grpo_requests(grpo),
        "eval": [predictors_request(evaluation.ray, evaluation.predictors)],
        "tune": sweep_requests(tune, GRPOJobConfig.model_validate(trial_base(tune))),
        "serve": [
            Request("Serve replicas", replica, serve["autoscaling_config"]["max_replicas"])
        ],  # fmt: skip
    }


@pytest.mark.parametrize("job", ["sft", "grpo", "eval", "tune", "serve"])
def test_every_request_of_the_cluster_configs_fits_a_worker_node_type_never_the_head(cluster, job):
    requests = cluster_config_requests()[job]
    types = launcher_node_types(cluster)
    check_placement(requests, types)
    head = [t for t in types if t.name == f"node type {cluster['head_node_type']}"]
    for request in requests:
        with pytest.raises(PlacementError, match="mmrad_worker"):
            check_placement([request], head)


def test_a_cluster_yaml_without_a_node_for_the_configs_fails_the_check(cluster):
    """The check above can fail: without the 8-GPU type the 8 packed SFT learners fit nowhere."""
    shrunk = copy.deepcopy(cluster)
    del shrunk["available_node_types"]["gpu_p5_48xlarge"]
    with pytest.raises(PlacementError, match=r"learners \(8 packed on one node\)"):
        check_placement(cluster_config_requests()["sft"], launcher_node_types(shrunk))


def test_the_dockerfile_bakes_the_gpu_extra_on_a_cuda_image_and_lints_clean():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "FROM ${CUDA_IMAGE}" in dockerfile
    assert "pip install '.[gpu]'" in dockerfile
    python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=3.11,<3.12" and "python3.11 -m venv" in dockerfile
    hadolint = Path(sys.executable).parent / "hadolint"
    linted = subprocess.run([str(hadolint), "--failure-threshold", "warning", "Dockerfile"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_jobs_run_on_the_images_python():
    """``configs/cluster/job_env.yaml`` (every ``ray job submit`` to the cluster) names the
    image's venv, and every submit command shown in a cluster file's header names it too."""
    venv = re.search(r"^\s*VIRTUAL_ENV=(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    job_env = yaml.safe_load((REPO / "configs/cluster/job_env.yaml").read_text())
    assert job_env["py_executable"] == f"{venv}/bin/python"
    for path in [REPO / "cluster.yaml", *sorted((REPO / "configs/cluster").glob("*.yaml"))]:
        text = path.read_text()
        if "ray job submit" in text:
            assert "--runtime-env configs/cluster/job_env.yaml" in text, path
            assert f"-- {venv}/bin/python -m ray_jobs." in text, path

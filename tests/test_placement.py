"""Placement rules: what mmrad's actors ask for, and the refusal of a request no node meets."""

from __future__ import annotations

import math

import pytest

from mmrad.config import LearnersConfig, RayConfig
from mmrad.placement import (
    WORKER_RESOURCE_SHARE,
    WORKER_RESOURCE_UNITS,
    NodeType,
    PlacementError,
    Request,
    actor_shape,
    check_placement,
    cluster_node_types,
    launcher_node_types,
    learners_request,
    ray_options,
)

H100_NODE = NodeType("p5", {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1,
                            "mmrad_worker": WORKER_RESOURCE_UNITS}, max_count=-1)  # fmt: skip
HEAD = NodeType("head", {"CPU": 0, "memory": 32e9})


def gpu_learners(count: int, placement: str = "strict_pack") -> LearnersConfig:
    return LearnersConfig(num_workers=count, use_gpu=True, cpus_per_worker=4,
                          gpus_per_worker=1, placement=placement)  # fmt: skip


def test_gpu_actors_ask_the_worker_resource_and_the_accelerator_type():
    config = RayConfig(accelerator_type="H100")
    engine = actor_shape(config, cpus=4, gpus=1)
    assert engine == {"CPU": 4, "GPU": 1, "accelerator_type:H100": WORKER_RESOURCE_SHARE,
                      "mmrad_worker": WORKER_RESOURCE_SHARE}  # fmt: skip
    coordinator = actor_shape(config, cpus=0)
    assert coordinator == {"CPU": 0, "mmrad_worker": WORKER_RESOURCE_SHARE}
    assert ray_options(engine) == {
        "num_cpus": 4,
        "num_gpus": 1,
        "resources": {
            "accelerator_type:H100": WORKER_RESOURCE_SHARE,
            "mmrad_worker": WORKER_RESOURCE_SHARE,
        },
    }
    assert actor_shape(RayConfig(worker_resource=None), cpus=1) == {"CPU": 1}


def test_a_cpu_only_head_cannot_host_a_coordinator():
    coordinator = Request("the GRPO coordinator", actor_shape(RayConfig(), cpus=0))
    with pytest.raises(PlacementError, match="no node offers 'mmrad_worker'") as error:
        check_placement([coordinator], [HEAD])
    assert "resources: {mmrad_worker: 1000}" in str(error.value)  # how to fix it
    assert "ray.worker_resource: null" in str(error.value)
    check_placement([coordinator], [HEAD, H100_NODE])


def test_a_missing_gpu_type_is_named():
    engine = Request("rollout engines", actor_shape(RayConfig(accelerator_type="A100"), cpus=4,
                                                    gpus=1), 4)  # fmt: skip
    with pytest.raises(PlacementError, match="rollout engines .each. ask .*"
                       "no node offers 'accelerator_type:A100'") as error:  # fmt: skip
        check_placement([engine], [HEAD, H100_NODE])
    assert "ray.accelerator_type" in str(error.value)
    assert "p5: {CPU: 192, GPU: 8" in str(error.value)  # what the cluster has


def test_strictly_packed_learners_must_fit_one_node():
    config = RayConfig()
    small = NodeType("g5", {"CPU": 48, "GPU": 4, "mmrad_worker": WORKER_RESOURCE_UNITS}, -1)
    eight = learners_request(config, gpu_learners(8))
    assert eight.packed and eight.on_one_node()["GPU"] == 8
    with pytest.raises(PlacementError, match=r"learners \(8 packed on one node\).*'GPU' 8 "
                       r"\(at most 4\).*placement: pack"):  # fmt: skip
        check_placement([eight], [HEAD, small])
    check_placement([learners_request(config, gpu_learners(8, "pack"))], [HEAD, small])
    check_placement([eight], [HEAD, small, H100_NODE])


def test_a_fixed_cluster_is_checked_for_the_whole_job():
    one_node = NodeType("node", {"CPU": 16, "GPU": 4, "mmrad_worker": WORKER_RESOURCE_UNITS})
    config = RayConfig()
    engines = Request("rollout engines", actor_shape(config, cpus=2, gpus=1), 2)
    learners = learners_request(config, gpu_learners(3))
    with pytest.raises(PlacementError, match=r"together \(rollout engines, learners\) the job "
                       r"asks 'GPU' 5, the cluster has at most 4"):  # fmt: skip
        check_placement([engines, learners], [one_node])
    check_placement([engines, learners_request(config, gpu_learners(2))], [one_node])
    growing = NodeType("autoscaled", one_node.resources, max_count=-1)
    check_placement([engines, learners], [growing])


def test_launcher_node_types_leave_detected_resources_unknown():
    cluster = {
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0, "GPU": 0}, "max_workers": 0},
            "gpu": {"resources": {"GPU": 4, "mmrad_worker": 1000}, "max_workers": 2},
        },
    }
    head, gpu = launcher_node_types(cluster)
    assert (head.max_count, head.resources["CPU"], head.resources["memory"]) == (1, 0, math.inf)
    assert (gpu.max_count, gpu.resources["CPU"], gpu.resources["GPU"]) == (2, math.inf, 4)
    check_placement([Request("engines", {"CPU": 8, "GPU": 1, "mmrad_worker": 0.001}, 8)],
                    [head, gpu])  # fmt: skip
    with pytest.raises(PlacementError, match="'GPU' 9, the cluster has at most 8"):
        check_placement([Request("engines", {"GPU": 1}, 9)], [head, gpu])


@pytest.mark.integration
def test_a_job_no_node_can_host_fails_at_once_naming_the_resource(ray_cluster, tmp_path):
    """On the session's real local Ray: it grants the worker resource, and a GRPO run whose
    engines ask for a GPU it lacks is refused before any actor starts, not left pending."""
    from mmrad.rl.config import GRPOJobConfig
    from mmrad.rl.job import run_grpo

    local = {node.name: node.resources for node in cluster_node_types()}
    assert [r["mmrad_worker"] for r in local.values()] == [WORKER_RESOURCE_UNITS]
    job = GRPOJobConfig.model_validate({
        "rollout": {"gpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "never-placed"},
    })  # fmt: skip
    with pytest.raises(PlacementError, match="rollout engines .each. ask .*no node offers 'GPU'"):
        run_grpo(job)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    unknown = job.model_copy(
        update={
            "rollout": job.rollout.model_copy(update={"gpus_per_worker": 0.0}),
            "ray": RayConfig(worker_resource="gpu_workers"),
        }
    )
    with pytest.raises(PlacementError, match="the GRPO coordinator .* no node offers "
                       "'gpu_workers'"):  # fmt: skip
        run_grpo(unknown)


@pytest.mark.integration
def test_the_command_line_reports_it_in_one_line(ray_cluster, tmp_path, monkeypatch, capfd):
    from mmrad.cli import run

    monkeypatch.setattr(
        "sys.argv",
        [
            "mmrad",
            "grpo",
            "ray.accelerator_type=H100",
            "learners.use_gpu=true",
            f"run.storage_path={tmp_path}",
        ],
    )
    with pytest.raises(SystemExit) as exit_code:
        run()
    assert exit_code.value.code == 1
    printed = " ".join(capfd.readouterr().err.split())  # errors go to stderr
    assert printed.startswith("error: learners (2 packed on one node) ask") and "'GPU' 2" in printed
    assert "Traceback" not in printed

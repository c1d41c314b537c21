"""cluster.yaml is a valid Ray cluster-launcher config, by Ray's own schema and defaults."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema_after_its_defaults(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_head_takes_no_work_and_gpu_workers_scale_from_zero(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    instance_types = {spec["node_config"]["InstanceType"] for spec in workers.values()}
    assert {"g5.12xlarge", "p5.48xlarge"} <= instance_types
    for spec in workers.values():
        assert spec["min_workers"] == 0 < spec["max_workers"]


def test_nodes_run_rays_image_and_install_mmrad_with_the_gpu_extra(cluster):
    assert cluster["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("[gpu]" in command for command in cluster["setup_commands"])
    for spec in cluster["available_node_types"].values():
        assert "IamInstanceProfile" in spec["node_config"], "S3 access by instance profile"


def test_a_broken_cluster_yaml_is_rejected(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_p5_48xlarge"]["max_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(broken))

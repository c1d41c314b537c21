"""GRPO and evaluation on a simulated multi-node cluster (tests/helpers/multinode.py):
a CPU-only head that takes no work and two worker nodes, each reading only its own
model cache folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrad.model.loading import COMPLETE_MARKER, cached_model_dir
from mmrad.storage import Storage
from tests.conftest import TEST_BUCKET

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# Ray's class names of the actors that do the work (a Ray Data actor is named after its UDF)
WORKING_ACTORS = {"coordinator": "Coordinator", "engines": "RolloutWorker",
                  "learners": "RayTrainWorker",
                  "predictors": "MapWorker(MapBatches(EnginePredictor))"}  # fmt: skip


@pytest.fixture(scope="module")
def multinode(s3_server, tiny_model, synthetic_s3, tmp_path_factory):
    """Both jobs run in a child process: a ``Cluster`` cannot share this session's Ray."""
    folder = tmp_path_factory.mktemp("multinode")
    model = f"s3://{TEST_BUCKET}/models/tiny-multinode"
    Storage().upload_dir(tiny_model, model)
    spec = {"folder": str(folder), "model": model, "manifest": synthetic_s3[0],
            "runs": f"s3://{TEST_BUCKET}/runs/multinode"}  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.multinode", str(folder / "spec.json"),
         str(folder / "result.json")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return spec, json.loads((folder / "result.json").read_text())


def nodes_of(result: dict, kind: str) -> set[str]:
    return {a["node"] for a in result["actors"] if a["class"] == WORKING_ACTORS[kind]}


def test_both_jobs_ran_to_the_end(multinode):
    _, result = multinode
    jobs = result["jobs"]
    assert jobs["grpo_steps"] == 2 and jobs["grpo_checkpoint"].startswith("s3://")
    assert jobs["eval_samples"] == 4 and jobs["eval_errors"] == 0


def test_no_working_actor_ran_on_the_head(multinode):
    """Where Ray put them, and why it must have: each asked for the worker resource, which
    the head lacks (Ray may place a 0-CPU actor on a worker node by chance)."""
    _, result = multinode
    for kind, name in WORKING_ACTORS.items():
        actors = [a for a in result["actors"] if a["class"] == name]
        assert actors, f"no {kind} found among {result['actors']}"
        assert {a["node"] for a in actors} <= {"worker-1", "worker-2"}, (kind, actors)
        for actor in actors:
            assert any(key.startswith("mmrad_worker") for key in actor["resources"]), actor
    assert len(nodes_of(result, "learners")) == 1  # strict_pack: one node


def test_each_node_downloaded_the_model_into_its_own_folder_and_the_head_none(multinode):
    spec, result = multinode
    caches = result["caches"]
    assert caches["head"] == []  # the driver never resolved the model for its actors
    key = cached_model_dir(spec["model"], "/").name
    loading = set().union(*(nodes_of(result, kind) for kind in ("engines", "learners",
                                                                "predictors")))  # fmt: skip
    for node in ("worker-1", "worker-2"):
        downloaded = f"{key}/{COMPLETE_MARKER}" in caches[node]
        assert downloaded == (node in loading), (node, caches[node])
        assert all(path.startswith(key) for path in caches[node]), caches[node]

"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``), run in its own process:
``python -m tests.helpers.multinode SPEC.json RESULT.json``.

Like ``cluster.yaml``: a head with 0 CPUs and no ``mmrad_worker``, and two worker nodes
that declare it, each with its own model cache folder (``MMRAD_NODE_CACHE``, set per node
as an operator would). The driver runs on the head, as under ``ray job submit``, and runs
2 GRPO steps and one evaluation from ``s3://`` inputs. The result says where every actor
ran and what each node's cache folder holds; ``tests/test_multinode.py`` judges it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

WORKER_NODES = ("worker-1", "worker-2")
CPUS_PER_WORKER_NODE = 2  # logical: the machine has 2 cores for all three nodes
OBJECT_STORE_BYTES = 400 * 2**20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(folder: Path):
    """The head and two worker nodes; returns the cluster and ``{node id: node name}``."""
    from ray.cluster_utils import Cluster

    from mmrad.model.loading import NODE_CACHE_ENV
    from mmrad.placement import WORKER_RESOURCE_UNITS
    from mmrad.ray_env import ray_environment

    os.environ.update(ray_environment(folder / "ray"))
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True,
        "dashboard_agent_listen_port": free_port(),
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "env_vars": {NODE_CACHE_ENV: str(folder / "cache" / "head")},
    })  # fmt: skip
    names = {cluster.head_node.node_id: "head"}
    for name in WORKER_NODES:
        cache = str(folder / "cache" / name)
        node = cluster.add_node(**common, num_cpus=CPUS_PER_WORKER_NODE,
                                resources={"mmrad_worker": WORKER_RESOURCE_UNITS},
                                dashboard_agent_listen_port=free_port(),
                                env_vars={NODE_CACHE_ENV: cache})  # fmt: skip
        names[node.node_id] = name
    cluster.wait_for_nodes()
    os.environ[NODE_CACHE_ENV] = str(folder / "cache" / "head")  # the driver is on the head
    return cluster, names


def run_jobs(spec: dict, address: str) -> dict:
    from mmrad.config import load_config
    from mmrad.eval.config import EvalJobConfig
    from mmrad.eval.job import run_eval
    from mmrad.rl.config import GRPOJobConfig
    from mmrad.rl.job import run_grpo

    grpo = load_config(GRPOJobConfig, "configs/local/grpo.yaml", [
        f"ray.address={address}", f"model.path={spec['model']}",
        f"data.manifest={spec['manifest']}", f"run.storage_path={spec['runs']}/grpo",
        "run.name=multinode", "schedule.max_steps=2", "rollout.num_workers=2",
        "rollout.cpus_per_worker=0.4", "rollout.prompts_per_step=2", "rollout.max_tokens=32",
        "algorithm.dynamic_sampling=false", "engine.kv_cache_bytes=67108864",
        "data.pixels.max_pixels=12544", "model.pixels.max_pixels=12544",
        "schedule.checkpoint_every=2", "schedule.sync_check_every=2",
    ])  # fmt: skip
    trained = run_grpo(grpo)
    evaluation = load_config(EvalJobConfig, "configs/local/eval.yaml", [
        f"ray.address={address}", f"target.path={spec['model']}",
        f"data.manifest={spec['manifest']}", f"run.storage_path={spec['runs']}/eval",
        "run.name=multinode", "data.limit=4", "sampling.max_tokens=16",
        "predictors.cpus_per_actor=0.5", "prompt.pixels.max_pixels=12544",
    ])  # fmt: skip
    evaluated = run_eval(evaluation)
    return {"grpo_steps": trained.steps, "grpo_checkpoint": trained.checkpoint_uri,
            "eval_samples": evaluated.samples, "eval_errors": evaluated.errors}  # fmt: skip


def actor_placements(names: dict[str, str]) -> list[dict]:
    from ray.util.state import list_actors

    return [{"class": actor.class_name, "name": actor.name, "node": names.get(actor.node_id),
             "resources": sorted(actor.required_resources or {})}
            for actor in list_actors(limit=10_000, detail=True,
                                     raise_on_missing_output=False)]  # fmt: skip


def cache_contents(folder: Path) -> dict[str, list[str]]:
    """Each node's cache folder: the files below it (relative), or none when absent."""
    contents = {}
    for name in ("head", *WORKER_NODES):
        root = folder / "cache" / name
        contents[name] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return contents


def main(spec_file: str, result_file: str) -> None:
    import ray

    spec = json.loads(Path(spec_file).read_text())
    folder = Path(spec["folder"])
    cluster, names = start_cluster(folder)
    try:
        jobs = run_jobs(spec, cluster.address)
        result = {"jobs": jobs, "actors": actor_placements(names),
                  "caches": cache_contents(folder)}  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(result_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])

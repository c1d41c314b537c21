"""Where mmrad's actors may run, and a refusal within seconds when no node can host them.

On a cluster the head node runs drivers only. Every actor that does work (the GRPO
coordinator, rollout engines, learners, evaluation predictors) asks for a sliver of
``ray.worker_resource``, a custom resource that only worker nodes declare (``cluster.yaml``)
and that a local Ray started by mmrad grants; GPU actors also ask for
``ray.accelerator_type`` when one is set. Learners share one placement group, on one node
(``strict_pack``) or as few as possible (``pack``).

Ray keeps a request that no node can meet pending forever. :func:`check_placement` first
compares a job's requests with the nodes the cluster has or can add (alive nodes, and the
autoscaler's node types where Ray or the cluster launcher tells them) and names what is
missing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrad.config import LearnersConfig, RayConfig

log = logging.getLogger(__name__)

WORKER_RESOURCE_UNITS = 1000
"""How much of ``ray.worker_resource`` a worker node declares (``cluster.yaml``, local Ray)."""
WORKER_RESOURCE_SHARE = 0.001
"""How much one actor asks: a node hosts up to a million of them; the resource only marks
where they may go."""
ACCELERATOR_PREFIX = "accelerator_type:"
"""Ray's resource for a node's GPU type (``accelerator_type:H100``), set by Ray on GPU nodes."""
CLUSTER_CONFIG_ENV = "MMRAD_CLUSTER_CONFIG"
"""A cluster-launcher YAML whose node types the autoscaler can add (default: the one the
launcher leaves on the head)."""
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Resources Ray fills in from the instance type when a launcher node type leaves them out.
_AUTODETECTED = ("CPU", "GPU", "memory")
_NOT_SHOWN = ("object_store_memory", "memory")

Shape = dict[str, float]


class PlacementError(RuntimeError):
    """No node of the cluster, present or addable, can host a job's actors."""


@dataclass(frozen=True)
class Request:
    """``count`` actors of ``shape`` each; ``packed``: all of them on one node."""

    label: str
    shape: Shape
    count: int = 1
    packed: bool = False

    def on_one_node(self) -> Shape:
        """What one node must offer: one actor's shape, or all of them when packed."""
        factor = self.count if self.packed else 1
        return {key: amount * factor for key, amount in self.shape.items()}

    def in_total(self) -> Shape:
        return {key: amount * self.count for key, amount in self.shape.items()}


@dataclass(frozen=True)
class NodeType:
    """Nodes of one shape: an alive node (``max_count`` 1) or an autoscaler node type
    (``max_count`` -1: unbounded)."""

    name: str
    resources: Mapping[str, float]
    max_count: int = 1

    def offers(self, key: str) -> float:
        return self.resources.get(key, 0.0)


def actor_shape(config: RayConfig, *, cpus: float, gpus: float = 0.0) -> Shape:
    """The resources of one working actor under ``config``'s placement rules."""
    shape: Shape = {"CPU": cpus}
    if gpus:
        shape["GPU"] = gpus
        if config.accelerator_type:
            shape[ACCELERATOR_PREFIX + config.accelerator_type] = WORKER_RESOURCE_SHARE
    return shape | worker_resources(config)


def worker_resources(config: RayConfig) -> Shape:
    """The custom resources of any working actor or task: a worker node's, never the
    head's. Data tasks ask them too; Ray Data fuses a decode stage into the predictor
    actors after it only where both ask the same."""
    return {config.worker_resource: WORKER_RESOURCE_SHARE} if config.worker_resource else {}


def ray_options(shape: Shape) -> dict[str, Any]:
    """``shape`` as ``.options()`` / ``map_batches`` arguments."""
    custom = {key: amount for key, amount in shape.items() if key not in ("CPU", "GPU")}
    return {"num_cpus": shape.get("CPU", 0.0), "num_gpus": shape.get("GPU", 0.0),
            "resources": custom}  # fmt: skip


def placement_strategy(packing: str) -> str:
    """A learners' ``placement`` value as Ray's placement-group strategy."""
    return packing.upper()


def local_resources(config: RayConfig) -> dict[str, float]:
    """The custom resources a local Ray started by mmrad grants (it is a worker node too)."""
    return {config.worker_resource: WORKER_RESOURCE_UNITS} if config.worker_resource else {}


# -- the check --------------------------------------------------------------------------


def check_placement(
    requests: Sequence[Request], node_types: Sequence[NodeType] | None = None
) -> None:
    """Raise :class:`PlacementError` naming each request that no node can host, else any
    resource the cluster lacks for all of them together; ``node_types`` defaults to the
    current cluster's. Best effort: it never refuses what could run, but it sums
    capacities without fitting the actors node by node."""
    types = list(cluster_node_types() if node_types is None else node_types)
    problems = [problem for request in requests if (problem := _unmet(request, types))]
    problems = problems or _over_capacity(requests, types)
    if problems:
        offered = "; ".join(f"{t.name}: {_describe(t.resources)}" for t in types) or "none"
        problems.append(f"Nodes this cluster has or can add: {offered}")
        raise PlacementError("\n".join(problems))


def _unmet(request: Request, types: Sequence[NodeType]) -> str | None:
    need = request.on_one_node()
    if any(_fits(need, node.resources) for node in types):
        return None
    who = f"{request.count} packed on one node" if request.packed else "each"
    most = {key: max((node.offers(key) for node in types), default=0.0) for key in need}
    missing = [key for key, amount in need.items() if most[key] < amount]
    if not missing:
        return f"{request.label} ({who}) ask {_describe(need)}: no single node has all of it"
    key = missing[0]
    offered = f"{_amount(need[key])} (at most {_amount(most[key])})"
    return (f"{request.label} ({who}) ask {_describe(need)}: no node offers {key!r} "
            f"{offered}. {_hint(key, request)}")  # fmt: skip


def _over_capacity(requests: Sequence[Request], types: Sequence[NodeType]) -> list[str]:
    demand: dict[str, float] = {}
    for request in requests:
        for key, amount in request.in_total().items():
            demand[key] = demand.get(key, 0.0) + amount
    problems = []
    for key, amount in demand.items():
        capacity = sum(_capacity(node, key) for node in types)
        if amount > capacity + 1e-9:
            labels = ", ".join(r.label for r in requests if r.shape.get(key))
            problems.append(f"together ({labels}) the job asks {key!r} {_amount(amount)}, "
                            f"the cluster has at most {_amount(capacity)}")  # fmt: skip
    return problems


def _capacity(node: NodeType, key: str) -> float:
    offered = node.offers(key)
    if not offered or not node.max_count:
        return 0.0
    return math.inf if node.max_count < 0 else offered * node.max_count


def _fits(need: Mapping[str, float], offered: Mapping[str, float]) -> bool:
    return all(offered.get(key, 0.0) + 1e-9 >= amount for key, amount in need.items())


def _hint(key: str, request: Request) -> str:
    if key.startswith(ACCELERATOR_PREFIX):
        return "Set ray.accelerator_type to a GPU type the cluster has, or null for any."
    if key in ("CPU", "GPU", "memory"):
        if request.packed:
            return "Use fewer or smaller workers, or placement: pack to spread them over nodes."
        return "Ask less per actor, or add a node type that has it."
    return (f"Declare {key!r} in the worker node types' resources (cluster.yaml: resources: "
            f"{{{key}: {WORKER_RESOURCE_UNITS}}}), or set ray.worker_resource: null.")  # fmt: skip


def _describe(resources: Mapping[str, float]) -> str:
    shown = [f"{key}: {_amount(amount)}" for key, amount in sorted(resources.items())
             if amount and key not in _NOT_SHOWN and not key.startswith("node:")]  # fmt: skip
    return "{" + ", ".join(shown) + "}"


def _amount(value: float) -> str:
    return "unknown" if math.isinf(value) else f"{value:g}"


# -- what the cluster has or can add ----------------------------------------------------


def cluster_node_types() -> list[NodeType]:
    """The alive nodes, then the node types the autoscaler can add."""
    import ray

    alive = [NodeType(f"node {node['NodeManagerAddress']} {node['NodeID'][:8]}",
                      dict(node["Resources"]))
             for node in ray.nodes() if node["Alive"]]  # fmt: skip
    return alive + autoscaler_node_types()


def autoscaler_node_types() -> list[NodeType]:
    """Node types from the config the autoscaler reported to Ray (autoscaler v2), else
    from the cluster launcher's YAML on the head (``$MMRAD_CLUSTER_CONFIG`` or
    ``~/ray_bootstrap_config.yaml``); none for a cluster without an autoscaler."""
    from ray._private.state import state

    reported = state.get_cluster_config()
    if reported is not None and reported.node_group_configs:
        return [NodeType(f"node type {group.name}", dict(group.resources), group.max_count)
                for group in reported.node_group_configs]  # fmt: skip
    path = Path(os.environ.get(CLUSTER_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return []
    import yaml

    return launcher_node_types(yaml.safe_load(path.read_text()))


def launcher_node_types(cluster: Mapping[str, Any]) -> list[NodeType]:
    """A cluster-launcher config's node types; resources it leaves to Ray's detection
    (CPU, GPU, memory) count as unknown, so they never cause a refusal."""
    types = []
    for name, spec in cluster.get("available_node_types", {}).items():
        resources = {key: math.inf for key in _AUTODETECTED}
        resources.update({key: float(value) for key, value in spec.get("resources", {}).items()})
        head = name == cluster.get("head_node_type")
        # a type's max_workers is optional; the cluster's own cap applies then
        most = 1 if head else spec.get("max_workers", cluster.get("max_workers", -1))
        types.append(NodeType(f"node type {name}", resources, most))
    return types


def check_or_log(config: RayConfig, requests: Sequence[Request]) -> None:
    """:func:`check_placement` unless ``ray.check_placement`` is off."""
    if not config.check_placement:
        log.info("placement not checked (ray.check_placement is off)")
        return
    check_placement(requests)


def learner_shape(config: RayConfig, learners: LearnersConfig) -> Shape:
    """One Ray Train worker's resources (``learners``: a :class:`LearnersConfig`)."""
    return actor_shape(config, cpus=learners.cpus_per_worker,
                       gpus=learners.gpus_per_worker if learners.use_gpu else 0.0)  # fmt: skip


def learners_request(config: RayConfig, learners: LearnersConfig) -> Request:
    return Request("learners", learner_shape(config, learners), learners.num_workers,
                   packed=learners.placement == "strict_pack")  # fmt: skip

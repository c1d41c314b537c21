"""deploy/kubernetes/: the KubeRay RayJob (the pipeline) and RayService (Serve) validate
against KubeRay's CRDs (deploy/kubernetes/crds/, v1.7.0), match cluster.yaml's node types,
run the Dockerfile's image at pyproject's version, take credentials from a Secret only, and
the RayService serves configs/cluster/serve.yaml as it is. Each check is a function that
returns its problems; every test of a real manifest has a twin that breaks a copy and
expects the check to name the break."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mmrad import kubernetes
from mmrad.jobs import job_arguments
from mmrad.placement import (
    NodeType,
    PlacementError,
    Request,
    check_placement,
    launcher_node_types,
)
from mmrad.serve.config import validate_serve_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy/kubernetes"
RAYJOB = DEPLOY / "rayjob.yaml"
RAYSERVICE = DEPLOY / "rayservice.yaml"
CRDS = {"RayJob": DEPLOY / "crds/ray.io_rayjobs.yaml",
        "RayService": DEPLOY / "crds/ray.io_rayservices.yaml"}  # fmt: skip
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MMRAD_SERVE_TOKEN")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
# Ray resources go in the group's `resources`; KubeRay refuses them in both places.
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
MAX_NAME_LENGTH = 47  # KubeRay's MaxRayJobNameLength and MaxRayServiceNameLength
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PIPELINE_MODULE = "ray_jobs.pipeline"


def read_yaml(path: Path) -> Any:
    """YAML through libyaml where PyYAML has it: the CRDs are megabytes."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return read_yaml(RAYJOB)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return read_yaml(RAYSERVICE)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return read_yaml(REPO / "cluster.yaml")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def cluster_spec(manifest: Mapping[str, Any]) -> dict:
    """The RayCluster spec inside a RayJob or a RayService."""
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]


def containers(manifest: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """(where, container) for every container the manifest's pods run."""
    spec = cluster_spec(manifest)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield f"{name}/{container['name']}", container
    submitter = manifest["spec"].get("submitterPodTemplate")
    for container in (submitter or {}).get("spec", {}).get("containers", []):
        yield f"submitter/{container['name']}", container


# -- (b) KubeRay's CRDs ----------------------------------------------------------------


def openapi_to_json_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON Schema with the API server's meaning:

    - ``x-kubernetes-int-or-string``: an integer or a string (KubeRay v1.7.0's CRDs also
      spell it as ``anyOf`` everywhere; where a schema does not, the union is added);
    - ``nullable``: null allowed too;
    - an object with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` refuses other keys, as the API server's
      strict field validation (kubectl's default) does; without it a misspelt key would be
      silently pruned, not reported;
    - ``x-kubernetes-list-type: set``: unique items; ``map`` (with
      ``x-kubernetes-list-map-keys``) is checked by :func:`list_map_keys`;
    - ``x-kubernetes-embedded-resource``: ``apiVersion``, ``kind`` and ``metadata`` allowed.

    ``x-kubernetes-validations`` (CEL) cannot be evaluated here:
    :func:`test_the_manifests_use_no_field_that_only_cel_rules_check` keeps the manifests
    away from the fields that carry them.
    """
    if isinstance(node, list):
        return [openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: openapi_to_json_schema(value) for key, value in node.items()}
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource"):
        schema.setdefault("properties", {}).update(
            {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
             "metadata": {"type": "object"}})  # fmt: skip
    closed = "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields")
    if closed and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    if schema.get("x-kubernetes-list-type") == "set":
        schema["uniqueItems"] = True
    return schema


def list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-map-keys``: no two items of a list share their key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        key = tuple(repr(item.get(name)) for name in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate item for keys {keys}: {item!r}")
        seen.add(key)


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": list_map_keys}
)


def crd_schema(kind: str) -> dict:
    """The ``v1`` openAPIV3Schema of ``kind``'s CRD (as shipped, untranslated)."""
    crd = read_yaml(CRDS[kind])
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Validator]:
    return {kind: KubernetesValidator(openapi_to_json_schema(crd_schema(kind)))
            for kind in CRDS}  # fmt: skip


def schema_errors(manifest: Mapping[str, Any], validators: Mapping[str, Any]) -> list[str]:
    """What KubeRay's CRD schema refuses in ``manifest``, one line per error."""
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") not in validators:
        return [f"not a ray.io/v1 RayJob or RayService: {manifest.get('apiVersion')}"]
    errors = validators[manifest["kind"]].iter_errors(manifest)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def kuberay_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Rules KubeRay's operator enforces outside the CRD schema (utils/validation.go) that
    these manifests could break."""
    problems = []
    name = manifest["metadata"]["name"]
    if len(name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.match(name):
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of <= {MAX_NAME_LENGTH}")
    spec = cluster_spec(manifest)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
    for group_name, group in groups:
        both = set(RESOURCE_START_PARAMS) & set(group.get("rayStartParams", {}))
        if both and group.get("resources"):
            problems.append(f"{group_name}: {sorted(both)} in rayStartParams and resources")
        if "labels" in group.get("rayStartParams", {}):
            problems.append(f"{group_name}: rayStartParams.labels (use the group's labels)")
        restart = group["template"]["spec"].get("restartPolicy", "Never")
        if spec.get("autoscalerOptions", {}).get("version") == "v2" and restart != "Never":
            problems.append(f"{group_name}: restartPolicy must be Never with autoscaler v2")
    for group in spec["workerGroupSpecs"]:
        low, high = group["minReplicas"], group["maxReplicas"]
        if not 0 <= low <= group.get("replicas", low) <= high:
            problems.append(f"{group['groupName']}: replicas outside {low}..{high}")
    return problems


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_the_manifests_validate_against_kuberays_crds(path, validators):
    manifest = read_yaml(path)
    assert schema_errors(manifest, validators) == []
    assert kuberay_errors(manifest) == []


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict], None]:
    """A change to a manifest: set the value at ``path`` (keys and list indexes)."""

    def change(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


GROUP = ("spec", "rayClusterSpec", "workerGroupSpecs", 1)  # the p5.48xlarge group
CONTAINER = (*GROUP, "template", "spec", "containers", 0)
HEAD = ("spec", "rayClusterSpec", "headGroupSpec")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set((*GROUP, "maxReplica"), 2), "'maxReplica' was unexpected"),  # a typo
        (_set((*GROUP, "maxReplicas"), "2"), "'2' is not of type 'integer'"),
        (_set((*CONTAINER, "resources", "limits", "memory"), "1800 GB"), "does not match"),
        (
            _set((*CONTAINER, "ports"), [{"containerPort": 8000}, {"containerPort": 8000}]),
            "duplicate item",
        ),
        (
            _set((*CONTAINER, "env", 0, "valueFrom", "secretKeyRef"), {"name": "x"}),
            "'key' is a required",
        ),
        (
            _set(("spec", "rayClusterSpec", "autoscalerOptions", "version"), "v3"),
            "'v3' is not one of",
        ),
        (
            _set((*HEAD, "template", "spec", "containers", 0, "ports", 0, "containerPort"), "6379"),
            "'6379' is not of type 'integer'",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-quantity",
        "list-map-keys",
        "required",
        "enum",
        "not-int",
    ],
)
def test_a_broken_manifest_fails_the_crd_schema(rayjob, validators, change, expected):
    broken = copy.deepcopy(rayjob)
    change(broken)
    assert any(expected in error for error in schema_errors(broken, validators)), expected


def test_int_or_string_fields_take_both_and_nothing_else(rayjob, validators):
    """``x-kubernetes-int-or-string`` (here a quantity of the pod's requests)."""
    for value, valid in [(8, True), ("8", True), ([8], False), ({"gpus": 8}, False)]:
        changed = copy.deepcopy(rayjob)
        _set((*CONTAINER, "resources", "requests", "nvidia.com/gpu"), value)(changed)
        errors = schema_errors(changed, validators)
        assert (errors == []) == valid, (value, errors)


def test_kuberays_own_rules_catch_a_resource_given_twice(rayjob):
    broken = copy.deepcopy(rayjob)
    _set((*GROUP, "rayStartParams", "num-gpus"), "8")(broken)
    assert kuberay_errors(broken) == [
        "gpu-p5-48xlarge: ['num-gpus'] in rayStartParams and resources"
    ]


def cel_rule_paths(schema: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths (property names, ``*`` for any item or value) whose schema has CEL rules."""
    if not isinstance(schema, dict):
        return
    if "x-kubernetes-validations" in schema:
        yield path
    for name, child in schema.get("properties", {}).items():
        yield from cel_rule_paths(child, (*path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from cel_rule_paths(schema[key], (*path, "*"))


def present(manifest: Any, path: tuple[str, ...]) -> bool:
    """Whether ``manifest`` sets something at ``path`` (as :func:`cel_rule_paths` gives it)."""
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        values = manifest.values() if isinstance(manifest, dict) else manifest or []
        return any(present(value, rest) for value in values)
    return isinstance(manifest, dict) and head in manifest and present(manifest[head], rest)


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_the_manifests_use_no_field_that_only_cel_rules_check(path):
    manifest = read_yaml(path)
    paths = list(cel_rule_paths(crd_schema(manifest["kind"])))
    assert ("spec", "managedBy") in paths  # the CRDs do carry rules, on fields we leave out
    assert [p for p in paths if present(manifest, p)] == []


# -- (a) serveConfigV2 is configs/cluster/serve.yaml ------------------------------------


def test_serve_config_v2_is_the_generated_one(rayservice):
    serve_yaml = (REPO / kubernetes.SERVE_CONFIG).read_text()
    block = rayservice["spec"]["serveConfigV2"]
    assert block == kubernetes.serve_config_text(serve_yaml)
    assert yaml.safe_load(block) == yaml.safe_load(serve_yaml)
    assert not kubernetes.stale(RAYSERVICE, REPO / kubernetes.SERVE_CONFIG)
    validated = validate_serve_config(yaml.safe_load(block), "serveConfigV2")  # Ray's schema
    assert list(validated.apps) == ["mmrad"]


def test_a_changed_serve_config_makes_check_fail_until_written(tmp_path, capsys):
    serve = tmp_path / "serve.yaml"
    manifest = tmp_path / "rayservice.yaml"
    serve.write_text((REPO / kubernetes.SERVE_CONFIG).read_text().replace(
        "max_replicas: 4", "max_replicas: 6"))  # fmt: skip
    manifest.write_text(RAYSERVICE.read_text())
    paths = ["--manifest", str(manifest), "--serve-config", str(serve)]

    assert kubernetes.main(["--check", *paths]) == 1
    assert f"{manifest}: serveConfigV2 is out of date" in capsys.readouterr().err
    assert kubernetes.main(["--write", *paths]) == 0
    assert kubernetes.main(["--check", *paths]) == 0

    app = yaml.safe_load(read_yaml(manifest)["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 6
    # only the block moved: rendering the repository's serve.yaml gives the file back,
    # comments and layout included
    original = (REPO / kubernetes.SERVE_CONFIG).read_text()
    assert kubernetes.render_rayservice(manifest.read_text(), original) == RAYSERVICE.read_text()


def test_the_cli_runs_as_a_module_from_the_repository_root():
    checked = subprocess.run([sys.executable, "-m", "mmrad.kubernetes", "--check"], cwd=REPO,
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_a_manifest_without_the_block_is_refused(tmp_path, capsys):
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text("apiVersion: ray.io/v1\nkind: RayService\n")
    assert kubernetes.main(["--check", "--manifest", str(manifest)]) == 2
    assert "no 'serveConfigV2: |' block" in capsys.readouterr().err


# -- (c) worker groups are cluster.yaml's node types ------------------------------------


def as_number(quantity: str | int | float) -> float:
    """A plain Kubernetes quantity ("8", "0.5", 8) as a number; suffixed ones fail."""
    return float(quantity)


def ray_resources(group: Mapping[str, Any]) -> dict[str, float]:
    """A group's Ray resources (its ``resources`` field) as numbers."""
    return {key: as_number(value) for key, value in group.get("resources", {}).items()}


def node_type_of(group: Mapping[str, Any]) -> str:
    """cluster.yaml's node type for a worker group (``gpu-p5-48xlarge``: ``gpu_p5_48xlarge``)."""
    return group["groupName"].replace("-", "_")


def start_flags(commands: list[str]) -> dict[str, str]:
    """``--flag=value`` of the ``ray start`` among cluster.yaml's start commands."""
    start = next(command for command in commands if "ray start" in command)
    return dict(re.findall(r"--([a-z-]+)=(\S+)", start))


def start_param_conflicts(group: Mapping[str, Any], flags: Mapping[str, str]) -> list[str]:
    """rayStartParams that cluster.yaml's ``ray start`` gives another value."""
    params = group.get("rayStartParams", {})
    return [
        f"rayStartParams.{key}={value!r}, cluster.yaml --{key}={flags[key]}"
        for key, value in params.items()
        if key in flags and str(value) != flags[key]
    ]


def group_mismatches(manifest: Mapping[str, Any], cluster: Mapping[str, Any]) -> list[str]:
    """Where the manifest's head and worker groups differ from cluster.yaml's node types."""
    spec = cluster_spec(manifest)
    types = cluster["available_node_types"]
    head = spec["headGroupSpec"]
    head_resources = ray_resources(head)
    problems = [] if head_resources == types[cluster["head_node_type"]]["resources"] else [
        f"head resources {head_resources} != cluster.yaml's"]  # fmt: skip
    problems += start_param_conflicts(head, start_flags(cluster["head_start_ray_commands"]))
    idle = spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds")
    if not spec.get("enableInTreeAutoscaling") or idle != cluster["idle_timeout_minutes"] * 60:
        problems.append(f"autoscaling on with idleTimeoutSeconds {idle}, as cluster.yaml")
    worker_flags = start_flags(cluster["worker_start_ray_commands"])
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        type_name = node_type_of(group)
        node_type = types.get(type_name)
        if node_type is None or type_name == cluster["head_node_type"]:
            problems.append(f"{name}: no worker node type {type_name}")
            continue
        problems += [f"{name}: {p}" for p in worker_mismatches(group, node_type)]
        problems += [f"{name}: {p}" for p in start_param_conflicts(group, worker_flags)]
    return problems


def worker_mismatches(group: Mapping[str, Any], node_type: Mapping[str, Any]) -> list[str]:
    """A worker group against its node type: Ray resources (GPU, CPU, custom), the pod's
    GPUs and CPUs, the instance type it is scheduled on and the replica bounds."""
    problems = []
    if ray_resources(group) != node_type["resources"]:
        problems.append(f"resources {ray_resources(group)} != {node_type['resources']}")
    pod = group["template"]["spec"]
    container = pod["containers"][0]  # KubeRay's Ray container
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    gpus = node_type["resources"]["GPU"]
    if as_number(limits.get("nvidia.com/gpu", 0)) != gpus:
        problems.append(f"nvidia.com/gpu limit {limits.get('nvidia.com/gpu')} != {gpus}")
    if as_number(requests.get("cpu", 0)) > node_type["resources"]["CPU"]:
        problems.append(f"cpu request {requests['cpu']} > the node's vCPUs")
    instance = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
    if instance != node_type["node_config"]["InstanceType"]:
        problems.append(f"nodeSelector instance type {instance}")
    bounds = (group["minReplicas"], group["maxReplicas"])
    if bounds != (node_type["min_workers"], node_type["max_workers"]):
        problems.append(f"replicas {bounds} != min_workers/max_workers")
    return problems


def test_the_rayjob_has_every_node_type_of_cluster_yaml(rayjob, cluster):
    assert group_mismatches(rayjob, cluster) == []
    groups = {node_type_of(g) for g in cluster_spec(rayjob)["workerGroupSpecs"]}
    assert groups == set(cluster["available_node_types"]) - {cluster["head_node_type"]}


def test_the_rayservices_groups_are_cluster_yamls_node_types(rayservice, cluster):
    assert group_mismatches(rayservice, cluster) == []
    assert cluster_spec(rayservice)["workerGroupSpecs"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set((*GROUP, "resources", "GPU"), "4"), "gpu-p5-48xlarge: resources"),
        (_set((*GROUP, "resources", "CPU"), "96"), "gpu-p5-48xlarge: resources"),
        (_set((*GROUP, "resources", "mmrad_worker"), "1"), "gpu-p5-48xlarge: resources"),
        (
            _set((*CONTAINER, "resources", "limits", "nvidia.com/gpu"), "4"),
            "nvidia.com/gpu limit 4 != 8",
        ),
        (_set((*GROUP, "template", "spec", "nodeSelector"), {}), "nodeSelector instance type None"),
        (_set((*GROUP, "maxReplicas"), 8), "replicas (0, 8)"),
        (_set((*GROUP, "rayStartParams", "metrics-export-port"), "9090"), "--metrics-export-port"),
        (_set((*HEAD, "resources"), {"CPU": "8"}), "head resources"),
        (_set((*GROUP, "groupName"), "gpu-p4d"), "no worker node type gpu_p4d"),
    ],
)
def test_a_group_unlike_cluster_yaml_is_named(rayjob, cluster, change, expected):
    broken = copy.deepcopy(rayjob)
    change(broken)
    assert any(expected in problem for problem in group_mismatches(broken, cluster)), expected


def test_serve_replicas_fit_a_rayservice_worker_group_never_its_head(rayservice):
    """What configs/cluster/serve.yaml asks for, by mmrad's own placement check."""
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    deployment = serve["applications"][0]["deployments"][0]
    options = deployment["ray_actor_options"]
    replica = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"],
               "accelerator_type:" + options["accelerator_type"]: 0.001}  # fmt: skip
    request = Request("Serve replicas", replica, deployment["autoscaling_config"]["max_replicas"])
    spec = cluster_spec(rayservice)
    node_types = {"head": {"resources": ray_resources(spec["headGroupSpec"])}}
    for group in spec["workerGroupSpecs"]:
        node_types[group["groupName"]] = {
            "max_workers": group["maxReplicas"],
            "resources": ray_resources(group),
        }
    launcher = {"head_node_type": "head", "available_node_types": node_types}
    types: list[NodeType] = launcher_node_types(launcher)
    check_placement([request], [t for t in types if t.name != "node type head"])
    with pytest.raises(PlacementError, match="mmrad_worker"):
        check_placement([request], [t for t in types if t.name == "node type head"])


# -- (d) credentials come from a Secret --------------------------------------------------


def secret_problems(manifest: Mapping[str, Any], text: str) -> list[str]:
    """Literal credentials: a secret-looking variable with a ``value`` (or with no
    ``secretKeyRef``), an AWS key id anywhere in the file, or a runtime env that sets one."""
    problems = []
    for where, container in containers(manifest):
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{where}: {env['name']} is not from a secretKeyRef")
        for source in container.get("envFrom", []):
            if "secretRef" not in source:
                problems.append(f"{where}: envFrom {source} is not a Secret")
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}")
    env_vars = runtime_env.get("env_vars", {})
    problems += [f"runtimeEnvYAML sets {name}" for name in env_vars if SECRET_NAME.search(name)]
    problems += [
        f"an AWS access key id: {key}" for key in re.findall(r"\bAKIA[0-9A-Z]{16}\b", text)
    ]
    serve = yaml.safe_load(manifest["spec"].get("serveConfigV2") or "{}")
    for app in serve.get("applications", []):
        if (app.get("args") or {}).get("auth_token") is not None:
            problems.append(f"serveConfigV2: application {app['name']} has a literal auth_token")
    return problems


def secret_env(container: Mapping[str, Any]) -> set[str]:
    return {env["name"] for env in container.get("env", []) if "valueFrom" in env}


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_credentials_come_from_the_secret_only(path):
    manifest = read_yaml(path)
    assert secret_problems(manifest, path.read_text()) == []
    for where, container in containers(manifest):
        if where.startswith("gpu-"):  # workers read S3 and run Serve replicas
            assert secret_env(container) == set(SECRET_ENV), where


def test_replicas_find_the_token_the_serve_config_names(rayservice):
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    token_env = serve["applications"][0]["args"]["auth_token_env"]
    for where, container in containers(rayservice):
        if where.startswith("gpu-"):
            assert token_env in secret_env(container), where


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}, "not from a secretKeyRef"),
        ({"name": "MMRAD_SERVE_TOKEN", "value": "t0ken"}, "not from a secretKeyRef"),
        ({"name": "AWS_KEY", "value": "AKIAABCDEFGHIJKLMNOP"}, "AKIAABCDEFGHIJKLMNOP"),
    ],
)
def test_a_literal_secret_is_found(rayjob, env, expected):
    broken = copy.deepcopy(rayjob)
    cluster_spec(broken)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(env)
    problems = secret_problems(broken, yaml.safe_dump(broken))
    assert any(expected in problem for problem in problems), problems


# -- (e) the entrypoint is the pipeline job's command line --------------------------------


def dockerfile_value(pattern: str) -> str:
    return re.search(pattern, (REPO / "Dockerfile").read_text(), re.M).group(1)


def entrypoint_problems(manifest: Mapping[str, Any]) -> list[str]:
    """The RayJob's entrypoint: the image's python (configs/cluster/job_env.yaml's
    py_executable) running ``-m ray_jobs.pipeline`` with arguments that the job's own parser
    takes and a config file of this repository; the working dir is where the image keeps
    the configs."""
    job_env = read_yaml(REPO / "configs/cluster/job_env.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    problems = []
    if argv[:3] != [job_env["py_executable"], "-m", PIPELINE_MODULE]:
        problems.append(f"entrypoint starts {argv[:3]}")
    try:
        args = job_arguments(None).parse_intermixed_args(argv[3:])
    except SystemExit:
        return [*problems, f"the job's parser refuses {argv[3:]}"]
    if not args.config or not (REPO / args.config).is_file():
        problems.append(f"--config {args.config}: no such file in the repository")
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    if runtime_env.get("py_executable") != job_env["py_executable"]:
        problems.append(f"runtimeEnvYAML py_executable {runtime_env.get('py_executable')}")
    source = dockerfile_value(r"^WORKDIR (/\S+/src)$")  # where configs/ is copied
    if runtime_env.get("working_dir") != source:
        problems.append(f"runtimeEnvYAML working_dir {runtime_env.get('working_dir')} != {source}")
    return problems


def test_the_entrypoint_is_the_pipeline_jobs_command_line(rayjob):
    assert entrypoint_problems(rayjob) == []
    assert "COPY --chown=ray configs ./configs" in (REPO / "Dockerfile").read_text()


def test_the_pipeline_job_resolves_the_entrypoints_config_without_ray(rayjob):
    """The job's own loader: ``--print-config`` validates every stage's config, starts nothing."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])[3:]
    shown = subprocess.run([sys.executable, "-m", PIPELINE_MODULE, *argv, "--print-config"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "storage_path: s3://" in shown.stdout


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        (
            "/opt/mmrad/venv/bin/python -m ray_jobs.pipeline --config configs/cluster/nope.yaml",
            "no such file",
        ),
        ("/opt/mmrad/venv/bin/python -m ray_jobs.pipeline --configs x.yaml", "parser refuses"),
        (
            "python -m ray_jobs.pipeline --config configs/cluster/pipeline.yaml",
            "entrypoint starts",
        ),
        (
            "/opt/mmrad/venv/bin/python -m ray_jobs.sft --config configs/cluster/sft.yaml",
            "entrypoint starts",
        ),
    ],
)
def test_a_wrong_entrypoint_is_named(rayjob, entrypoint, expected):
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypoint"] = entrypoint
    assert any(expected in problem for problem in entrypoint_problems(broken))


# -- (f) the image and Ray versions ------------------------------------------------------


def version_problems(manifest: Mapping[str, Any], pyproject: Mapping[str, Any]) -> list[str]:
    """Every container runs ``<registry>/mmrad:<pyproject's version>`` (the Dockerfile's
    tag) and the cluster's rayVersion is the Ray that pyproject pins."""
    image = f"<registry>/mmrad:{pyproject['project']['version']}"
    problems = [f"{where}: image {c['image']} != {image}"
                for where, c in containers(manifest) if c["image"] != image]  # fmt: skip
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    ray_version = ray_pin.split("==")[1]
    if cluster_spec(manifest)["rayVersion"] != ray_version:
        problems.append(f"rayVersion {cluster_spec(manifest)['rayVersion']} != {ray_version}")
    return problems


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_the_image_is_the_dockerfiles_at_pyprojects_version(path, pyproject):
    tag = f"<registry>/mmrad:{pyproject['project']['version']}"
    assert f"docker build -t {tag} ." in (REPO / "Dockerfile").read_text()  # its build line
    assert version_problems(read_yaml(path), pyproject) == []


def test_another_version_is_named(rayjob, pyproject):
    bumped = copy.deepcopy(pyproject)
    bumped["project"]["version"] = "0.2.0"
    problems = version_problems(rayjob, bumped)
    assert len(problems) == len(list(containers(rayjob)))
    assert all(problem.endswith("!= <registry>/mmrad:0.2.0") for problem in problems)
    bumped["project"]["dependencies"] = ["ray[serve]==2.61.0"]
    assert "rayVersion 2.60.0 != 2.61.0" in version_problems(rayjob, bumped)

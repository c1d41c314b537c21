"""The Serve config file: Ray Serve's own schema, with mmrad's application ``args`` checked.

One file serves ``serve run FILE``, ``serve deploy FILE``, ``mmrad serve --config FILE``
and ``python -m ray_jobs.serve --config FILE``::

    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: mmrad
        route_prefix: /
        import_path: mmrad.serve.app:app_builder
        args: {model_dir: runs/sft/sft-tiny/export, ...}        # ServeArgs below
        deployments:
          - name: MMRADServer
            max_ongoing_requests: 16
            autoscaling_config: {min_replicas: 1, max_replicas: 2, ...}
            ray_actor_options: {num_cpus: 0.5}

:func:`load_serve_file` validates the whole file with Ray's ``ServeDeploySchema`` and
every mmrad application's ``args`` with :class:`ServeArgs`, before Ray starts; errors
name the file and the key. Overrides address lists by index or by an item's ``name``:
``applications.mmrad.args.model_dir=s3://...`` or
``applications.mmrad.deployments.MMRADServer.autoscaling_config.max_replicas=4``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from mmrad.config import (
    ConfigError,
    EngineConfig,
    NodeCacheField,
    NodeFolder,
    PathField,
    PromptOverrides,
    Section,
    StorageConfig,
    null_is_no_overrides,
    parse_override,
    read_yaml,
    validate_config,
)

IMPORT_PATH = "mmrad.serve.app:app_builder"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEPLOYMENT_NAME = "MMRADServer"


class ServeArgs(Section):
    """The ``args`` of an mmrad application in a Ray Serve config file."""

    model_dir: str = PathField(
        ...,
        "Exported model: local directory or s3:// prefix. Its mmrad.json decides the "
        "prompt variant, pixel budget and domain knowledge, as in training.",
    )
    model_name: str = Field(
        "mmrad", min_length=1, description="The model name clients see and send (`model`)."
    )
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(kv_cache_bytes=128 * 2**20, max_num_seqs=32),
        description="The vLLM engine of each replica.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    cache_dir: NodeFolder = NodeCacheField()
    prompt: PromptOverrides = Field(
        default_factory=PromptOverrides,
        description="Unset keys: the export's mmrad.json (mmrad.model.contract); set keys "
        "override it, with a warning in the log and the change in GET /v1/models.",
    )
    auth_token_env: str | None = Field(
        None,
        description="Name of the environment variable (on the replicas' nodes) that holds "
        "the bearer token clients must send. Preferred over auth_token.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="The bearer token itself. Never logged, but Serve shows application "
        "args in its config, so prefer auth_token_env. Neither: no authentication.",
    )
    max_upload_bytes: int = Field(
        20 * 2**20, ge=1024, description="Largest request body (413 above)."
    )
    max_pixels: int = Field(
        40_000_000,
        ge=28 * 28,
        description="Most decoded pixels per image, checked from the header before decoding "
        "(decompression bombs; 413 above). The default takes 40 MP camera photos.",
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description="Images a replica decodes at once; each is shrunk to its model grid "
        "before the next may start, so peak decode memory per replica is this x "
        "max_pixels x 8 bytes (logged at start), however many requests are in flight.",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Default /v1/detect threshold on P(Yes) (e.g. the F1-best one of a val "
        "evaluation); None: `anomalous` is the model's own Yes/No.",
    )
    max_tokens: int = Field(
        512, ge=1, description="Tokens /v1/detect generates; chat's default max_tokens."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters over the one base model, by name: {production-line: "
        "local folder or s3:// prefix of a peft adapter}. A request names one in `model` "
        "(chat, completions) or the `model` field (/v1/detect); loaded on first use.",
    )
    max_loaded_adapters: int = Field(
        4,
        ge=1,
        description="Adapters each replica keeps loaded (and batches together); the least "
        "recently used is dropped beyond it and reloaded when asked for again.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=0,
        description="Sequences a replica holds waiting beyond the engine.max_num_seqs it "
        "runs; more get 503 (JSON, Retry-After). None: no bound. Takes effect while the "
        "deployment's max_ongoing_requests lets more than max_num_seqs + this in.",
    )

    _null_prompt = field_validator("prompt", mode="before")(null_is_no_overrides)

    @model_validator(mode="before")
    @classmethod
    def _moved_pixels(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "pixels" not in data:
            return data
        if data["pixels"] is not None:
            raise ValueError(
                "args.pixels moved: write args.prompt.pixels (an override of the export's "
                "pixel budget, or the budget of a model without one)"
            )
        return {key: value for key, value in data.items() if key != "pixels"}  # old dumps

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeArgs:
        if self.auth_token_env is not None and self.auth_token is not None:
            raise ValueError("give auth_token_env or auth_token, not both")
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, uri in adapters.items():
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_', '-'")
            if not uri:
                raise ValueError(f"adapter {name!r}: empty folder")
        return adapters

    @model_validator(mode="after")
    def _adapters_not_the_base(self) -> ServeArgs:
        if self.model_name in self.adapters:
            raise ValueError(f"adapter {self.model_name!r} has the base model's name (model_name)")
        return self


def resolve_auth_token(args: ServeArgs) -> str | None:
    """The bearer token this replica checks, or ``None`` (no authentication). A named
    environment variable that is unset or empty is an error: a server meant to be
    protected must not start open."""
    if args.auth_token is not None:
        return args.auth_token.get_secret_value()
    if args.auth_token_env is None:
        return None
    token = os.environ.get(args.auth_token_env, "")
    if not token:
        raise ValueError(
            f"auth_token_env names {args.auth_token_env!r}, which is unset or empty on this node"
        )
    return token


# -- the file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeFile:
    """A validated Serve config: ``config`` is the file (after overrides) in Ray's schema,
    ``apps`` the mmrad applications' checked args by application name."""

    origin: str
    config: dict[str, Any]
    apps: dict[str, ServeArgs]

    def app_urls(self) -> dict[str, str]:
        """``{application: base URL}`` as clients on this machine reach it."""
        http = self.config.get("http_options") or {}
        host = http.get("host") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        port = http.get("port") or 8000
        urls = {}
        for app in self.config.get("applications") or []:
            prefix = app.get("route_prefix") or "/"
            urls[app["name"]] = f"http://{host}:{port}{prefix.rstrip('/')}"
        return urls


def load_serve_file(path: str | Path | None, overrides: Sequence[str] = ()) -> ServeFile:
    """Read a Serve config file, apply ``overrides`` and validate it (see the module)."""
    if path is None:
        raise ConfigError("--config FILE: a Serve config file (Ray Serve's schema) is required")
    data = read_yaml(path)
    origin = str(path) + (f" with overrides {' '.join(overrides)}" if overrides else "")
    try:
        data = apply_serve_overrides(data, overrides)
    except (KeyError, IndexError, TypeError) as err:
        raise ConfigError(f"{origin}: {err.args[0] if err.args else err}") from None
    return validate_serve_config(data, origin)


def validate_serve_config(data: Mapping[str, Any], origin: str = "<serve config>") -> ServeFile:
    """Ray's schema for the whole config, :class:`ServeArgs` for mmrad applications."""
    from ray.serve.schema import ServeDeploySchema

    data = copy.deepcopy(dict(data))
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        lines = [f"key {_dotted(e['loc'], data)!r}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(lines)) from None
    _check_known_keys(data, origin)
    _check_autoscaling(data, origin)
    apps = {}
    for app in data.get("applications") or []:
        if app.get("import_path") != IMPORT_PATH:
            continue
        where = f"{origin}: applications.{app['name']}"
        for deployment in app.get("deployments") or []:
            if deployment.get("name") != DEPLOYMENT_NAME:
                raise ConfigError(
                    f"{where}.deployments: unknown deployment {deployment.get('name')!r} "
                    f"(this application has one: {DEPLOYMENT_NAME!r})"
                )
        apps[app["name"]] = validate_config(ServeArgs, app.get("args") or {}, f"{where}.args")
    return ServeFile(origin=origin, config=data, apps=apps)


def _check_known_keys(data: Mapping[str, Any], origin: str) -> None:
    """Ray's schema ignores keys it does not know, so a typo (``autoscaling_confg``)
    would silently do nothing; here it is an error naming the key."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def check(node: Mapping[str, Any], schema: Any, where: str) -> None:
        allowed = set(schema.model_fields) | {
            f.alias for f in schema.model_fields.values() if f.alias
        }
        for key in node:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"{origin}: key {where + key!r}: unknown key{did_you_mean}")

    check(data, ServeDeploySchema, "")
    for app in data.get("applications") or []:
        prefix = f"applications.{app.get('name')}."
        check(app, ServeApplicationSchema, prefix)
        for deployment in app.get("deployments") or []:
            check(deployment, DeploymentSchema, f"{prefix}deployments.{deployment.get('name')}.")


def _check_autoscaling(data: Mapping[str, Any], origin: str) -> None:
    """Ray's schema keeps ``autoscaling_config`` a plain dict until deploy time; check it
    now with Ray's own model, so a bad value fails before anything starts."""
    from ray.serve.config import AutoscalingConfig

    for app in data.get("applications") or []:
        for deployment in app.get("deployments") or []:
            config = deployment.get("autoscaling_config")
            if not isinstance(config, dict):
                continue
            where = f"applications.{app['name']}.deployments.{deployment.get('name')}"
            try:
                AutoscalingConfig.model_validate(config)
            except ValidationError as err:
                keys = [
                    ".".join([where, "autoscaling_config", *map(str, e["loc"])])
                    for e in err.errors()
                ]
                lines = [f"key {k!r}: {e['msg']}" for k, e in zip(keys, err.errors(), strict=True)]
                raise ConfigError(f"{origin}: " + "; ".join(lines)) from None


def apply_serve_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` overrides where a list is entered by index or item ``name``."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            node = _enter(node, part, path[: depth + 1])
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        else:
            node[last] = value
    return data


def _enter(node: Any, part: str, where: Sequence[str]) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise TypeError(f"override {'.'.join(where)}: {where[-2]!r} is not a mapping")
    child = node.get(part)
    if not isinstance(child, dict | list):
        child = node[part] = {}
    return child


def _list_index(items: list, part: str, where: Sequence[str]) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise KeyError(f"override {'.'.join(where)}: no item {part!r} (names: {names})")


def _dotted(loc: Sequence[Any], data: Mapping[str, Any]) -> str:
    """A pydantic error location with list indices shown as the items' names."""
    parts: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            item = node[part]
            name = item.get("name") if isinstance(item, dict) else None
            parts.append(str(name) if name else str(part))
            node = item
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


# -- building configs in code (tests, benchmarks) ------------------------------------------


def application(
    args: Mapping[str, Any],
    *,
    name: str = "mmrad",
    route_prefix: str = "/",
    autoscaling: Mapping[str, Any] | None = None,
    num_cpus: float = 0.5,
    max_ongoing_requests: int = 16,
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One mmrad application entry of a Serve config."""
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_ongoing_requests,
        "autoscaling_config": dict(autoscaling or {"min_replicas": 1, "max_replicas": 1}),
        "ray_actor_options": {"num_cpus": num_cpus},
    }
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": dict(args),
        "deployments": [deployment],
    }
    if env_vars:
        app["runtime_env"] = {"env_vars": dict(env_vars)}
    return app


def serve_config(
    applications: Sequence[Mapping[str, Any]], *, host: str = "127.0.0.1", port: int = 8000
) -> dict[str, Any]:
    """A whole Serve config (Ray's schema) around ``applications``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [dict(app) for app in applications],
    }

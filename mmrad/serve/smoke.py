"""A serving smoke test: deploy the mmrad application of a Serve config, send a few test
images through ``/v1/detect`` as an inspection system would (multipart uploads over
HTTP), and delete it again.

The pipeline's last stage; it fails loudly when the app does not come up or a request
does not return a well-formed detection. The app is built as ``mmrad serve`` builds it
(:func:`mmrad.serve.deploy.app_target`) and added under its own name and route
(``serve.run``), so applications already running on the cluster are left alone.

When the app's args turn authentication on, the requests carry the bearer token the
replicas check, found as they find it (:func:`mmrad.serve.config.resolve_auth_token`,
with the application's ``runtime_env`` ``env_vars`` as the replica sees them); the token
is never logged. The app is deleted however the test ends; a driver killed mid-test
cannot do that, so the next pipeline run deletes the leftover app by its name
(:func:`smoke_app_name`, :func:`remove_leftover`) before any stage starts.
"""

from __future__ import annotations

import logging
import mimetypes
from typing import Any

from mmrad.storage import Storage

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 300.0
SPLIT_READ = ("test", "the smoke test sends its images")
"""The split whose images the smoke test sends, and why; the pipeline checks it before
any training."""


SMOKE_SUFFIX = "-smoke"
"""The smoke app is the served application's name plus this (and routed there)."""


class SmokeTestError(RuntimeError):
    """The deployment answered a smoke request wrongly; the message names the image."""


def smoke_test(
    serve_config: dict[str, Any], manifest: str, images: int, storage: Storage
) -> list[dict[str, Any]]:
    """Deploy the mmrad application of ``serve_config`` as ``<name>-smoke``, POST the
    first ``images`` test records' images (with reference and category, and the bearer
    token when the app requires one) to its ``/v1/detect``, delete it (also when
    deploying or a request fails), and return one summary per request."""
    import httpx
    from ray import serve

    from mmrad.data.manifest import read_manifest, records_of_split
    from mmrad.serve.deploy import app_target

    split, purpose = SPLIT_READ
    records = records_of_split(read_manifest(storage, manifest), split, manifest, purpose)
    records = records[:images]
    entry = mmrad_entry(serve_config)
    target = app_target(entry, "the serve stage's config")
    headers = auth_headers(entry)  # before deploying: an unset variable fails fast
    http = serve_config.get("http_options") or {}
    serve.start(http_options=http)
    name = smoke_app_name(serve_config)
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/{name}"
    try:
        serve.run(target.app, name=name, **{**target.run_options, "route_prefix": f"/{name}"})
        with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers) as client:
            return [_detect(client, url, record, storage) for record in records]
    finally:
        serve.delete(name)


def mmrad_entry(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The config's (first) mmrad application entry."""
    from mmrad.serve.config import IMPORT_PATH

    return next(a for a in serve_config["applications"] if a.get("import_path") == IMPORT_PATH)


def smoke_app_name(serve_config: dict[str, Any]) -> str:
    """The name (and route, after ``/``) of the smoke app of ``serve_config``."""
    return f"{mmrad_entry(serve_config)['name']}{SMOKE_SUFFIX}"


def remove_leftover(serve_config: dict[str, Any]) -> bool:
    """Delete the smoke app of ``serve_config`` if one is deployed (a killed run's);
    starts nothing when Serve is not running. True when one was deleted."""
    from ray import serve

    name = smoke_app_name(serve_config)
    if name not in serve.status().applications:
        return False
    log.warning("deleting the Serve app %s that an interrupted smoke test left", name)
    serve.delete(name)
    return True


def auth_headers(entry: dict[str, Any]) -> dict[str, str]:
    """The ``Authorization`` header the app's replicas require, or none. The token is
    resolved as a replica resolves it, in the environment a replica has: this process's
    (a local cluster's workers inherit it) with the app's ``runtime_env`` ``env_vars``
    over it."""
    from pydantic import SecretStr

    from mmrad.serve.config import ServeArgs, resolve_auth_token
    from mmrad.serve.deploy import deployment_options

    args = ServeArgs.model_validate(entry.get("args") or {})
    if args.auth_token_env is not None:
        runtime_env = (deployment_options(entry, "the serve stage's config")
                       .get("ray_actor_options", {}).get("runtime_env", {}))  # fmt: skip
        given = (runtime_env.get("env_vars") or {}).get(args.auth_token_env)
        if given:
            args = args.model_copy(update={"auth_token_env": None, "auth_token": SecretStr(given)})
    token = resolve_auth_token(args)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _detect(client: Any, url: str, record: dict[str, Any], storage: Storage) -> dict[str, Any]:
    files = {"image": _upload(record["image_uri"], storage)}
    if record.get("reference_uri"):
        files["reference"] = _upload(record["reference_uri"], storage)
    response = client.post(f"{url}/v1/detect", files=files, data={"category": record["category"]})
    if response.status_code != 200:
        raise SmokeTestError(
            f"record {record['id']}: /v1/detect answered {response.status_code}: "
            f"{response.text[:500]}"
        )
    body = response.json()
    missing = {"anomalous", "score", "boxes", "labels", "latency_ms"} - set(body)
    if missing:
        raise SmokeTestError(f"record {record['id']}: response lacks {sorted(missing)}")
    log.info("smoke %s: anomalous=%s score=%s", record["id"], body["anomalous"], body["score"])
    summary = {key: body[key] for key in ("anomalous", "score", "boxes", "labels", "latency_ms")}
    return {"id": record["id"], "is_anomalous": record.get("is_anomalous"), **summary}


def _upload(uri: str, storage: Storage) -> tuple[str, bytes, str]:
    filename = uri.rsplit("/", 1)[-1]
    content_type = mimetypes.guess_type(filename)[0] or "image/png"
    return filename, storage.read_bytes(uri), content_type

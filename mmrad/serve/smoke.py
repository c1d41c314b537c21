"""A serving smoke test: deploy the mmrad application of a Serve config, send a few test
images through ``/v1/detect`` as an inspection system would (multipart uploads over
HTTP), and delete it again.

The pipeline's last stage; it fails loudly when the app does not come up or a request
does not return a well-formed detection. The app is built as ``mmrad serve`` builds it
(:func:`mmrad.serve.deploy.app_target`) and added under its own name and route
(``serve.run``), so applications already running on the cluster are left alone.
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


class SmokeTestError(RuntimeError):
    """The deployment answered a smoke request wrongly; the message names the image."""


def smoke_test(
    serve_config: dict[str, Any], manifest: str, images: int, storage: Storage
) -> list[dict[str, Any]]:
    """Deploy the mmrad application of ``serve_config`` as ``<name>-smoke``, POST the
    first ``images`` test records' images (with reference and category) to its
    ``/v1/detect``, delete it, and return one summary per request."""
    import httpx
    from ray import serve

    from mmrad.data.manifest import read_manifest, records_of_split
    from mmrad.serve.config import IMPORT_PATH
    from mmrad.serve.deploy import app_target

    split, purpose = SPLIT_READ
    records = records_of_split(read_manifest(storage, manifest), split, manifest, purpose)
    records = records[:images]
    entry = next(a for a in serve_config["applications"] if a.get("import_path") == IMPORT_PATH)
    target = app_target(entry, "the serve stage's config")
    http = serve_config.get("http_options") or {}
    serve.start(http_options=http)
    name = f"{entry['name']}-smoke"
    serve.run(target.app, name=name, **{**target.run_options, "route_prefix": f"/{name}"})
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/{name}"
    try:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            return [_detect(client, url, record, storage) for record in records]
    finally:
        serve.delete(name)


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

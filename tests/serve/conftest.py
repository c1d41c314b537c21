"""The Serve deployment the tests in this folder talk to: Serve's own API, and the
evaluation and annotation jobs using it as an OpenAI-compatible target. It is
package-scoped (this folder has an ``__init__.py`` for that): one deployment for the
folder's tests, shut down after its last one."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class ServeEndpoint:
    """Where the package's Serve deployment answers: OpenAI clients use
    ``base_url + "/v1"``, ``model`` and ``api_key`` (sent as a bearer token)."""

    base_url: str
    model: str
    api_key: str
    app: str = "mmrad"


SERVE_TOKEN_ENV = "MMRAD_TEST_SERVE_TOKEN"


@pytest.fixture(scope="package")
def serve_endpoint(ray_cluster, sft_trained):
    """The mmrad Serve application on the session's Ray, serving ``sft_trained``'s export,
    with a bearer token and autoscaling between 1 and 2 replicas on short delays (so the
    autoscaling test shares it). Serve is shut down after the folder's last test: an idle
    replica's engine still polls, and would take CPU from the tests that follow."""
    from ray import serve

    from mmrad.serve.config import application, serve_config, validate_serve_config
    from mmrad.serve.deploy import deploy

    token = secrets.token_hex(16)
    args = {
        "model_dir": sft_trained.export_uri,
        "model_name": "mmrad-test",
        "auth_token_env": SERVE_TOKEN_ENV,
        "max_tokens": 256,
        "max_upload_bytes": 2 * 2**20,
        "max_pixels": 4_000_000,
        "engine": {"kv_cache_bytes": 96 * 2**20, "max_num_seqs": 16, "max_model_len": 4096},
    }
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                   "target_ongoing_requests": 2, "upscale_delay_s": 1.0,
                   "downscale_delay_s": 4.0, "look_back_period_s": 12.0}  # fmt: skip
    app = application(args, autoscaling=autoscaling, num_cpus=0.5, max_ongoing_requests=8,
                      env_vars={SERVE_TOKEN_ENV: token})  # fmt: skip
    urls = deploy(validate_serve_config(serve_config([app]), "serve_endpoint"), timeout_s=900)
    yield ServeEndpoint(base_url=urls["mmrad"], model=args["model_name"], api_key=token)
    serve.shutdown()

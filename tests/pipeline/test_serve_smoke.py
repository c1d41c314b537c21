"""The pipeline's serve stage against an app that requires a bearer token, and the
smoke app a killed run leaves behind (real Ray, real Serve, the tiny model)."""

from __future__ import annotations

import secrets

import pytest

from mmrad.pipeline import plan, remove_leftover_smoke_app
from mmrad.serve.config import load_serve_file
from mmrad.serve.smoke import smoke_test
from mmrad.storage import Storage
from tests.pipeline.test_stages import pipeline_config

SMOKE_APP = "mmrad-smoke"  # configs/local/serve.yaml's app "mmrad", + smoke.SMOKE_SUFFIX


@pytest.mark.integration
def test_smoke_stage_sends_the_token_and_a_killed_runs_app_is_removed(
    tmp_path, ray_cluster, tiny_model, synthetic_local
):
    from ray import serve

    token = f"t{secrets.token_hex(16)}"  # a string to YAML, whatever the digits
    served = [  # the replica finds its token in MMRAD_SERVE_TOKEN, as on the cluster
        "applications.mmrad.args.auth_token_env=MMRAD_SERVE_TOKEN",
        f"applications.mmrad.runtime_env={{env_vars: {{MMRAD_SERVE_TOKEN: {token}}}}}",
        "applications.mmrad.args.max_tokens=32",
        "applications.mmrad.deployments.MMRADServer.autoscaling_config.max_replicas=1",
    ]
    serve_config = load_serve_file(
        "configs/local/serve.yaml", [*served, f"applications.mmrad.args.model_dir={tiny_model}"]
    ).config  # what the pipeline's serve stage gets (add_serve)
    serve_was_running = bool(serve.status().applications)
    try:
        # The stage's work: the app requires the token, so every request must carry it.
        (answer,) = smoke_test(serve_config, synthetic_local, 1, Storage())
        assert {"anomalous", "score", "boxes", "labels"} <= set(answer)
        assert SMOKE_APP not in serve.status().applications  # deleted when it passed

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
        class Leftover:
            def __call__(self, request) -> str:
                return "left by a killed run"

        serve.run(Leftover.bind(), name=SMOKE_APP, route_prefix=f"/{SMOKE_APP}")
        serve.run(Leftover.bind(), name="other", route_prefix="/other")
        # The next pipeline run removes it before any stage (run_pipeline calls this
        # right after Ray starts), whether or not its serve stage runs.
        stage = ["serve.enabled=true", "serve.config=configs/local/serve.yaml",
                 "sft.enabled=true", "sft.config=configs/local/sft.yaml"]  # fmt: skip
        remove_leftover_smoke_app(plan(pipeline_config(tmp_path, *stage), str(tmp_path / "p")))
        assert SMOKE_APP not in serve.status().applications
        assert "other" in serve.status().applications  # removed by its name only
    finally:
        if serve_was_running:
            for name in {SMOKE_APP, "other"} & set(serve.status().applications):
                serve.delete(name)
        else:
            serve.shutdown()

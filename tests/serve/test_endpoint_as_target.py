"""The evaluation and annotation jobs with our own Serve deployment as their
OpenAI-compatible target, reached over HTTP on 127.0.0.1 with its bearer token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrad.config import load_config
from mmrad.eval.config import EvalJobConfig
from mmrad.eval.job import run_eval
from mmrad.storage import Storage
from tests.annotate.test_annotate_job import TEST_RUN, assert_counts_add_up, job
from tests.eval.test_eval_job import read_json, read_predictions

pytestmark = pytest.mark.integration


def endpoint_teacher(endpoint, monkeypatch) -> str:
    """The override that makes the Serve deployment the teacher (a whole ``teacher``
    section: the file's model keys do not apply). Its key goes through an environment
    variable: a config never holds a key."""
    teacher = {"kind": "endpoint", "url": f"{endpoint.base_url.rstrip('/')}/v1",
               "model": endpoint.model, "retries": 2, "api_key_env": None}  # fmt: skip
    if endpoint.api_key:
        monkeypatch.setenv("MMRAD_TEST_TEACHER_KEY", endpoint.api_key)
        teacher["api_key_env"] = "MMRAD_TEST_TEACHER_KEY"
    return f"teacher={json.dumps(teacher)}"


def test_serve_deployment_as_teacher(
    ray_cluster, serve_endpoint, synthetic_local, tmp_path, monkeypatch
):
    """Our own Serve deployment, reached as an OpenAI-compatible endpoint on 127.0.0.1."""
    from mmrad.annotate.job import run_annotate

    annotate_job = job(
        f"input={synthetic_local}", f"output={tmp_path}/out", f"run.storage_path={tmp_path}",
        "run.name=serve", "select.max_images=4", "on_rejected=keep", *TEST_RUN,
        "sampling.max_tokens=160", endpoint_teacher(serve_endpoint, monkeypatch),
    )  # fmt: skip
    result = run_annotate(annotate_job)
    summary = assert_counts_add_up(result, tmp_path / "out", images=4, n=2)
    assert summary["rejected"]["error"] == 0  # every request was answered
    assert summary["manifest"]["records"] == 144  # on_rejected=keep: nothing dropped
    assert Path(result.report_uri).exists()


def test_evaluates_through_our_serve_endpoint(serve_endpoint, sft_trained, synthetic_local,
                                              tmp_path, monkeypatch):  # fmt: skip
    """An OpenAI-compatible target: our own Ray Serve deployment on 127.0.0.1 (serving the
    same export), with its bearer token passed through an environment variable."""
    from mmrad.model.export import read_export_info

    monkeypatch.setenv("MMRAD_TEST_EVAL_KEY", serve_endpoint.api_key)
    info = read_export_info(sft_trained.export_uri, Storage())  # prompt as the export's
    prompt = [f"prompt.{key}={str(value).lower()}" for key, value in info["prompt"].items()]
    prompt += [f"prompt.pixels.{key}={value}" for key, value in info["pixels"].items()]
    job = load_config(EvalJobConfig, "configs/local/eval.yaml", [
        "target={kind: endpoint}", f"target.url={serve_endpoint.base_url}/v1",
        f"target.model={serve_endpoint.model}", "target.api_key_env=MMRAD_TEST_EVAL_KEY",
        "target.max_concurrency=4", "target.retries=2", f"data.manifest={synthetic_local}",
        "data.limit=6", f"run.storage_path={tmp_path}", "run.name=endpoint", *prompt,
        "sampling.max_tokens=128", "predictors.cpus_per_actor=0.25", "predictors.batch_size=6",
    ])  # fmt: skip
    result = run_eval(job)
    assert result.samples == 6 and result.errors == 0 and result.labelled
    rows = read_predictions(result.run_uri)
    assert all(r["completion"] and r["latency_ms"] > 0 for r in rows)
    assert sum(r["format_ok"] for r in rows) >= 4  # the SFT'd model answers in format
    scored = [r["score"] for r in rows if r["score"] is not None]
    assert len(scored) >= 4 and all(0.0 <= s <= 1.0 for s in scored)  # from top_logprobs
    metrics = read_json(str(tmp_path / "endpoint" / "metrics.json"))
    assert metrics["n_images"] == 6 and serve_endpoint.model in metrics["extra"]["target"]
    assert serve_endpoint.api_key not in Storage().read_text(
        str(tmp_path / "endpoint" / "config.yaml")
    )

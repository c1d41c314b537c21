"""Config of ``mmrad detect`` / ``python -m ray_jobs.detect``: inspect a folder (or
``s3://`` prefix) of new images.

The target, its sampling, prompt overrides, engine, predictor pool and error budget are
the evaluation job's own sections under the same names (:mod:`mmrad.eval.config`),
``data.fetch_threads`` too: detect runs the same batch inference, on files instead of a
manifest. ``threshold`` means what it means for Serve's ``/v1/detect``.
"""

from __future__ import annotations

import json

from pydantic import Field, model_validator

from mmrad.config import ConfigError, EngineConfig, PathField, RayConfig, Section, StorageConfig
from mmrad.eval.config import (
    ModelTarget,
    PredictorsConfig,
    PromptOverrides,
    SamplingConfig,
    Target,
)


class DetectDataConfig(Section):
    fetch_threads: int = Field(8, ge=1, le=64, description="Concurrent image reads per batch.")


class OverlayConfig(Section):
    max_side: int | None = Field(
        1024,
        ge=32,
        description="Longest side of an overlay PNG, in pixels (larger images are scaled "
        "down, boxes with them); null: the image's own size.",
    )


class DetectJobConfig(Section):
    """`mmrad detect` / `python -m ray_jobs.detect`: every image under a folder or s3://
    prefix through a model or an endpoint; writes detections.parquet, detections.csv,
    overlay PNGs and an HTML contact sheet."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    input: str = PathField(
        ...,
        "Folder or s3:// prefix of the images (listed recursively; hidden files skipped), "
        "or one image. Files that are no image become error rows.",
    )
    output: str = PathField(
        "runs/detect",
        "Folder or s3:// prefix for detections.parquet, detections.csv, overlays/ and "
        "index.html (files in it are never inspected).",
    )
    category: str | None = Field(
        None, description="Category of every image; null: each image's parent folder's name."
    )
    reference: str | None = PathField(
        None,
        "A normal image for every category, or a folder with one per category named after "
        "it (refs/bottle.png). Needed when the model's prompt shows a reference.",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="anomalous = score (P(Yes)) >= threshold (e.g. the F1-best one of a val "
        "evaluation); null: the model's own Yes/No.",
    )
    target: Target = Field(
        default_factory=ModelTarget,
        description="A model directory (kind: model) or an OpenAI-compatible endpoint "
        "(kind: endpoint).",
    )
    data: DetectDataConfig = Field(default_factory=DetectDataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt: PromptOverrides = Field(default_factory=PromptOverrides)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    predictors: PredictorsConfig = Field(default_factory=PredictorsConfig)
    overlay: OverlayConfig = Field(default_factory=OverlayConfig)
    max_error_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Share of images whose prediction may fail (engine or endpoint errors; "
        "unreadable files do not count); above it the job fails and writes FAILED instead "
        "of the detections.",
    )

    @model_validator(mode="after")
    def _checks(self) -> DetectJobConfig:
        if self.sampling.n != 1:
            raise ValueError("sampling.n: detect keeps one answer per image; set it to 1")
        if self.threshold is not None and self.sampling.logprobs is None:
            raise ValueError(
                "threshold needs the score, which needs sampling.logprobs (e.g. 5), not null"
            )
        return self


def target_overrides(model: str | None, endpoint: str | None, model_name: str | None) -> list[str]:
    """``--model`` / ``--endpoint`` / ``--model-name`` as overrides that replace the whole
    ``target`` (a config file's target may be of the other kind); ``target.*`` overrides
    placed after them still apply on top."""
    if model and endpoint:
        raise ConfigError("--model and --endpoint: give one of them")
    if model_name and not endpoint:
        raise ConfigError("--model-name names the model an --endpoint serves; give --endpoint")
    if model:
        return ["target=" + json.dumps({"kind": "model", "path": model})]
    if endpoint:
        target = {"kind": "endpoint", "url": endpoint, "model": model_name or "mmrad"}
        return ["target=" + json.dumps(target)]
    return []

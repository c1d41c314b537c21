"""Config of the annotation job (`mmrad annotate`, `python -m ray_jobs.annotate`).

The teacher, its sampling, prompt overrides, engine and predictor pool are the
evaluation job's own sections (:mod:`mmrad.eval.config`): annotation runs the same batch
inference, only with hinted inputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmrad.config import EngineConfig, PathField, RayConfig, Section, StorageConfig
from mmrad.eval.config import (
    ModelTarget,
    PredictorsConfig,
    PromptOverrides,
    SamplingConfig,
    Target,
)
from mmrad.storage import absolute


class AnnotateSelect(Section):
    """Which records of the input manifest are sent to the teacher; the others are copied
    into the new manifest unchanged."""

    splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train", "val", "test"], description="Splits to annotate."
    )
    categories: list[str] = Field(
        default_factory=list, description="Categories to annotate (empty: all)."
    )
    max_images: int | None = Field(
        None, ge=1, description="At most this many images (the first by id), for trial runs."
    )


class AnnotateFilterConfig(Section):
    """The consistency filter (mmrad.eval.consistency): stricter than the metrics."""

    iou_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="IoU a predicted box needs to match a ground-truth box."
    )


class AnnotateRunSection(Section):
    """Where the run's config, run info and report go."""

    storage_path: str = PathField("runs/annotate", "Local folder or s3:// prefix.")
    name: str = Field("annotate-tiny", description="Run name (its folder under storage_path).")


class AnnotateReportConfig(Section):
    max_examples: int = Field(
        12, ge=0, description="Accepted and rejected examples on the figure page."
    )


def _annotation_sampling() -> SamplingConfig:
    """Several samples at a warm temperature, so the filter has some to choose from; no
    log-probs (annotation needs no P(Yes) score)."""
    return SamplingConfig(n=4, temperature=0.8, max_tokens=768, logprobs=None)


class AnnotateJobConfig(Section):
    """`mmrad annotate` / `python -m ray_jobs.annotate`: chain-of-thought annotation of a
    manifest by a teacher model shown the ground truth (MMR-AD's data construction)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    input: str = PathField(
        "runs/data/synthetic/manifest.parquet",
        "Manifest to annotate (data set folder or manifest URI); never modified.",
    )
    output: str = PathField(
        "runs/data/annotated",
        "Folder (or .parquet URI) of the new manifest; images are referenced "
        "by absolute URI, not copied. rejected.parquet and acceptance.json go beside it.",
    )
    teacher: Target = Field(
        default_factory=lambda: ModelTarget(path="runs/models/tiny"),
        description="A model directory (kind: model) or an OpenAI-compatible endpoint "
        "(kind: endpoint).",
    )
    sampling: SamplingConfig = Field(
        default_factory=_annotation_sampling,
        description="n samples per image, temperature, max_tokens (as in evaluation).",
    )
    prompt: PromptOverrides = Field(default_factory=PromptOverrides)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    predictors: PredictorsConfig = Field(default_factory=PredictorsConfig)
    filter: AnnotateFilterConfig = Field(default_factory=AnnotateFilterConfig)
    mode: Literal["fill_missing", "replace"] = Field(
        "fill_missing",
        description="fill_missing: annotate records without reasoning only; replace: all.",
    )
    on_rejected: Literal["drop", "keep"] = Field(
        "drop",
        description="Images with no accepted sample: drop them from the new manifest, or "
        "keep them without reasoning.",
    )
    select: AnnotateSelect = Field(default_factory=AnnotateSelect)
    run: AnnotateRunSection = Field(default_factory=AnnotateRunSection)
    report: AnnotateReportConfig = Field(default_factory=AnnotateReportConfig)

    @model_validator(mode="after")
    def _checks(self) -> AnnotateJobConfig:
        if self.prompt.reasoning is False:
            raise ValueError("prompt.reasoning: annotation asks the teacher for reasoning")
        if self.prompt.box_units == "cells":
            raise ValueError(
                "prompt.box_units: annotation gives the teacher its boxes in pixels (the "
                "student's answers in cells come from the records' boxes at training)"
            )
        if same_manifest(self.input, self.output):
            raise ValueError(
                f"output {self.output!r} is the input manifest: the original is never "
                "modified, choose another folder"
            )
        return self


def manifest_file(uri: str) -> str:
    """The manifest file of a data set folder or manifest URI (absolute)."""
    from mmrad.data.manifest import manifest_uri

    return absolute(manifest_uri(uri))


def same_manifest(a: str, b: str) -> bool:
    return manifest_file(a).rstrip("/") == manifest_file(b).rstrip("/")

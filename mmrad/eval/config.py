"""Configuration of the evaluation job (``mmrad eval run`` / ``python -m ray_jobs.evaluate``).

The sections ``target``, ``sampling``, ``prompt``, ``engine`` and ``predictors`` are the
batch-inference core's (:mod:`mmrad.eval.inference`); annotation embeds the same ones.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from mmrad.config import (
    EngineConfig,
    NodeCacheField,
    NodeFolder,
    PathField,
    PromptOverrides,
    RayConfig,
    Section,
    StorageConfig,
    TrackedRunSection,
)


class ModelTarget(Section):
    """A model directory: local or ``s3://``, an mmrad export (its ``mmrad.json`` decides
    the prompt variant and pixel budget) or any plain Hugging Face directory."""

    kind: Literal["model"] = "model"
    path: str = PathField(
        "runs/sft/sft-tiny/export", "Model directory (local or s3://) or hub id.", "local_or_hub"
    )
    adapter: str | None = PathField(
        "auto",
        "LoRA adapter: auto = the export's own (mmrad.json lora: adapter), "
        "none = base weights only, or an adapter directory (local or s3://).",
        "local_or_hub",
    )
    cache_dir: NodeFolder = NodeCacheField()


class EndpointTarget(Section):
    """Any OpenAI-compatible chat completions endpoint (generalist baselines, or a Serve
    deployment). Images go out already resized to the model grid; the prompt states it."""

    kind: Literal["endpoint"] = "endpoint"
    url: str = Field(description="Base URL up to /v1, e.g. https://api.openai.com/v1.")
    model: str = Field(description="Model name the endpoint expects.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (the key itself "
        "is never read from config or logged); null = no key.",
    )
    max_concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight per actor.")
    retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries per sample (the openai SDK's max_retries) after a timeout, "
        "connection error, 408, 409, 429 or 5xx; the SDK waits a server's Retry-After (up to "
        "120 s) or backs off from 0.5 s, doubling up to 8 s.",
    )
    timeout_s: float = Field(120.0, gt=0, description="Timeout of each try.")

    removed_keys: ClassVar[dict[str, str]] = dict.fromkeys(
        ("backoff_s", "max_backoff_s"), "the openai SDK's backoff applies (see retries); drop it"
    )
    """Keys that no longer exist, with what to do instead (old configs get told)."""


TARGET_KINDS: dict[str, type[Section]] = {"model": ModelTarget, "endpoint": EndpointTarget}
SWITCH_KIND_HINT = "target={kind: endpoint} target.url=... target.model=..."


def _keys_fit_kind(value: Any) -> Any:
    """``kind`` defaults to ``model``; keys of the other kind get an error that says how
    to switch kinds (an override ``target.kind=endpoint`` on a config file that sets
    ``target.path`` would otherwise fail obscurely)."""
    if not isinstance(value, dict):
        return value
    value = {"kind": "model", **value}
    fields = TARGET_KINDS.get(value["kind"])
    if fields is None:
        return value  # the union reports the unknown kind
    unknown = sorted(set(value) - set(fields.model_fields))
    if not unknown:
        return value
    removed = getattr(fields, "removed_keys", {})
    if set(unknown) <= set(removed):
        raise ValueError("; ".join(f"{key} was removed: {removed[key]}" for key in unknown))
    allowed = ", ".join(fields.model_fields)
    message = f"{', '.join(unknown)} not allowed for kind {value['kind']!r} (allowed: {allowed})"
    others = {name for kind in TARGET_KINDS.values() for name in kind.model_fields}
    if set(unknown) <= others:
        message += f"; to switch kinds replace the whole target, e.g. {SWITCH_KIND_HINT}"
    else:
        hint = difflib.get_close_matches(unknown[0], list(fields.model_fields), n=1)
        message += f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(message)


Target = Annotated[
    ModelTarget | EndpointTarget, BeforeValidator(_keys_fit_kind), Field(discriminator="kind")
]
"""A model directory or an endpoint, picked by ``kind`` (default ``model``)."""


class SamplingConfig(Section):
    """Greedy by default; ``logprobs`` top alternatives give P(Yes) (the AUROC score)."""

    n: int = Field(1, ge=1, le=64, description="Completions per image.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    logprobs: int | None = Field(
        5, ge=1, le=20, description="Top log-probs per token for the score; null = no score."
    )
    seed: int | None = Field(0, description="Sampling seed (n completions get seed, seed+1, ...).")

    def to_sampling(self):
        from mmrad.engine.sampling import Sampling

        return Sampling(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            logprobs=self.logprobs,
            seed=self.seed,
        )


class PredictorsConfig(Section):
    """The Ray Data actor pool: one vLLM engine (or endpoint client) per actor."""

    num_actors: int = Field(1, ge=1, description="Predictor actors (e.g. one per GPU).")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="1 per actor on GPU nodes.")
    batch_size: int = Field(8, ge=1, description="Rows per map_batches call (one engine call).")


class EvalDataConfig(Section):
    manifest: str = PathField("runs/data/synthetic/manifest.parquet", "Manifest URI.")
    split: Literal["test", "val", "all"] = Field(
        "test", description="val also finds the F1-maximising score threshold."
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate N records of the split (a fixed subset by id hash)."
    )
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="skip = the row gets an error and no prediction; fail = stop."
    )
    fetch_threads: int = Field(8, ge=1, le=64, description="Concurrent image reads per batch.")


class ReportConfig(Section):
    title: str | None = Field(None, description="Report title (default: the run name).")
    max_examples: int = Field(12, ge=0, description="Images in the examples figure.")


class EvalRunSection(TrackedRunSection):
    storage_path: str = PathField("runs/eval", "Local folder or s3:// prefix.")
    name: str = Field("eval-tiny", description="Run directory name under storage_path.")


class EvalJobConfig(Section):
    """`mmrad eval run` / `python -m ray_jobs.evaluate`."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    target: Target = Field(default_factory=ModelTarget)
    data: EvalDataConfig = Field(default_factory=EvalDataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt: PromptOverrides = Field(default_factory=PromptOverrides)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    predictors: PredictorsConfig = Field(default_factory=PredictorsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    run: EvalRunSection = Field(default_factory=EvalRunSection)
    max_error_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description=(
            "Share of samples whose prediction may fail (engine or endpoint errors); above "
            "it the run fails and writes FAILED with the counts instead of metrics.json."
        ),
    )

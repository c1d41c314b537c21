"""Batch inference, the core that evaluation and annotation share: a Ray Dataset of
records → a Ray Dataset of prediction rows.

Records are decoded and resized to the model grid by Ray Data tasks
(:func:`record_dataset`, :func:`mmrad.data.loading.decode_batch`), then ``map_batches``
runs them through an actor pool (:func:`predict`): one :class:`mmrad.engine.Engine` per
actor for a model directory, or one OpenAI-compatible client per actor for an endpoint.
Each actor turns a row into what it sends with a hook (``to_input``): the standard
inspection prompt by default, a hinted one (``InspectionInput.hint``) for annotation. One bad sample
(unreadable image, a prompt the engine refuses, an endpoint that keeps failing) gives
that row an ``error``; it never stops the run.

Why not ``ray.data.llm``: on CPU-only nodes its vLLM stage reserves a GPU per engine
(the job waits forever for ``{'CPU': 1, 'GPU': 1}``), and it would be a second vLLM
wrapper beside :mod:`mmrad.engine`, without its CPU settings, LoRA handling or P(Yes)
scoring. See the closing note of the evaluation issue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import SecretStr

from mmrad.config import EngineConfig, PixelBudget, RayConfig
from mmrad.engine.requests import (
    ImageLike,
    InspectionInput,
    build_messages_for,
    uses_reference,
)
from mmrad.engine.sampling import Sampling
from mmrad.eval.config import (
    EndpointTarget,
    ModelTarget,
    PredictorsConfig,
    PromptOverrides,
    SamplingConfig,
)
from mmrad.model.contract import Contract, model_info, resolve_contract
from mmrad.placement import Request, actor_shape, ray_options, worker_resources
from mmrad.storage import Storage, is_remote, join
from mmrad.task.answer import Verdict, parse_answer
from mmrad.task.geometry import answer_scale
from mmrad.task.prompt import PromptVariant

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "reference")
OUTPUT_SCHEMA = {
    "completions": pa.list_(pa.string()),
    "scores": pa.list_(pa.float64()),
    "finish_reasons": pa.list_(pa.string()),
    "latency_ms": pa.float64(),
    "error": pa.string(),
    "bad_image": pa.bool_(),
}
"""Columns :func:`predict` adds (``error`` replaces the decode step's; ``bad_image``: the
error is the image's, not the prediction's)."""


# -- what is sent -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    """A prompt as chat messages plus images, as endpoints take it. ``messages`` are
    HF/OpenAI-style; each image part is a ``{"type": "image", ...}`` placeholder, filled
    in order from ``images`` (PIL images or uint8 arrays, resized to the model grid when
    sent)."""

    messages: list[dict[str, Any]]
    images: list[ImageLike] = field(default_factory=list)


ToInput = Callable[[dict[str, Any]], InspectionInput]
"""Row (record columns + decoded ``image``/``reference`` arrays) → the inspection to send
(annotation sets its ``hint`` and draws on its image)."""


def default_input(row: Mapping[str, Any]) -> InspectionInput:
    """The standard inspection of a decoded row (the prompt training used)."""
    reference = row.get("reference")
    has_reference = reference is not None and np.asarray(reference).size > 0
    return InspectionInput(
        image=np.asarray(row["image"]),
        reference=np.asarray(reference) if has_reference else None,
        category=row.get("category"),
    )


def chat_prompt(item: InspectionInput, variant: PromptVariant, pixels: PixelBudget) -> ChatPrompt:
    """``item``'s prompt as the engine would send it (same text, hint included, and the
    images in :func:`~mmrad.engine.requests.build_request`'s order: ``[reference,]
    query``), for an endpoint."""
    messages = build_messages_for(item, variant, pixels)
    images = [item.reference, item.image] if uses_reference(item, variant) else [item.image]
    return ChatPrompt(messages=messages, images=images)


# -- the spec every actor gets ------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSpec:
    """Everything a predictor actor needs; small and picklable.

    ``target`` is resolved: a :class:`ModelTarget` with an absolute local or ``s3://``
    ``path`` and ``adapter`` (``None`` = base weights), or an :class:`EndpointTarget`.
    ``contract`` says how to prompt it (:mod:`mmrad.model.contract`).
    """

    target: ModelTarget | EndpointTarget
    sampling: Sampling
    contract: Contract
    engine: EngineConfig
    predictors: PredictorsConfig
    storage: Storage
    placement: RayConfig = field(default_factory=RayConfig)  # rules of mmrad.placement

    @property
    def variant(self) -> PromptVariant:
        return self.contract.variant

    @property
    def pixels(self) -> PixelBudget:
        return self.contract.pixels

    @classmethod
    def build(
        cls,
        target: ModelTarget | EndpointTarget,
        sampling: SamplingConfig,
        prompt: PromptOverrides,
        engine: EngineConfig,
        predictors: PredictorsConfig,
        storage: Storage,
        placement: RayConfig | None = None,
    ) -> InferenceSpec:
        """Resolve the target and the prompt: a model's ``mmrad.json`` gives the prompt
        variant, pixel budget, domain knowledge and LoRA adapter unless ``prompt``/``target``
        override them. Runs in the driver, so a bad path fails before any actor starts."""
        info = None
        if isinstance(target, ModelTarget):
            info = model_info(target.path, storage, "target.path")
            target = target.model_copy(update={"adapter": resolve_adapter(target, info)})
        where = target.path if isinstance(target, ModelTarget) else target.url
        return cls(
            target=target,
            sampling=sampling.to_sampling(),
            contract=resolve_contract(where, info, prompt, storage, "prompt"),
            engine=engine,
            predictors=predictors,
            storage=storage,
            placement=placement or RayConfig(),
        )


def resolve_adapter(target: ModelTarget, info: dict | None) -> str | None:
    """``auto``: the export's own adapter directory when it kept LoRA apart."""
    if target.adapter in (None, "none"):
        return None
    if target.adapter != "auto":
        return target.adapter
    if info and info.get("lora") == "adapter" and info.get("adapter_dir"):
        return join(target.path, info["adapter_dir"])
    return None


# -- Ray Data ---------------------------------------------------------------------------


def record_dataset(
    records: Sequence[Mapping[str, Any]],
    storage: Storage,
    pixels: PixelBudget,
    *,
    batch_size: int = 16,
    on_bad_image: str = "skip",
    fetch_threads: int = 8,
    placement: RayConfig | None = None,
):
    """An ordered Ray Dataset of ``records`` with images decoded onto the model grid
    (``image``, ``reference``, ``grid_width``, ``grid_height``, ``error``), by tasks that
    ask for ``placement``'s worker resources, as the predictors after them do."""
    from mmrad.data.loading import DecodeSpec, build_dataset

    spec = DecodeSpec(storage, pixels, on_bad_image, fetch_threads)  # type: ignore[arg-type]
    rows = [{**record, "position": index} for index, record in enumerate(records)]
    return build_dataset(rows, spec, batch_size, worker_resources(placement or RayConfig()))


def predict(dataset, spec: InferenceSpec, *, to_input: ToInput = default_input):
    """Prediction rows: the input columns without the images, plus
    :data:`OUTPUT_SCHEMA`'s. Lazy; order is kept."""
    import ray.data

    from mmrad.data import idle_wait

    idle_wait.install()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    predictors = spec.predictors
    arguments: dict[str, Any] = {"spec": spec, "to_input": to_input}
    if isinstance(spec.target, ModelTarget):
        predictor: type[_Predictor] = EnginePredictor
    else:
        from mmrad.eval.endpoint import api_key

        predictor = EndpointPredictor
        # read here: actors do not see variables set in the driver after Ray started
        arguments["key"] = SecretStr(api_key(spec.target))
    return dataset.map_batches(
        predictor,
        fn_constructor_kwargs=arguments,
        batch_size=predictors.batch_size,
        batch_format="pyarrow",
        concurrency=predictors.num_actors,
        **ray_options(predictors_request(spec.placement, predictors).shape),
    )


def predictors_request(placement: RayConfig, predictors: PredictorsConfig) -> Request:
    """The predictor actors' resources (:mod:`mmrad.placement`)."""
    shape = actor_shape(placement, cpus=predictors.cpus_per_actor, gpus=predictors.gpus_per_actor)
    return Request("predictors", shape, predictors.num_actors)


def collect_rows(dataset) -> list[dict[str, Any]]:
    """Materialise prediction rows as plain dicts (lists, not arrays), in order."""
    tables = [pa.Table.from_batches([batch]) for batch in _arrow_batches(dataset)]
    rows: list[dict[str, Any]] = []
    for table in tables:
        rows.extend(table.to_pylist())
    return rows


def _arrow_batches(dataset):
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_batches()


def verdicts_of(
    row: Mapping[str, Any], *, require_think: bool = True, answer_unit: int = 1
) -> list[Verdict]:
    """Each completion of a prediction row parsed, boxes (``answer_unit`` model-grid
    pixels per coordinate) in the original image's pixels, ``score`` set from the row's
    ``scores``. Empty for a row with an error."""
    completions = row.get("completions") or []
    scores = row.get("scores") or [None] * len(completions)
    scale = answer_scale_of(row, answer_unit)
    size = (int(row["width"]), int(row["height"]))
    return [
        replace(parse_answer(text, scale=scale, size=size, require_think=require_think),
                score=score)
        for text, score in zip(completions, scores, strict=True)
    ]  # fmt: skip


def answer_scale_of(row: Mapping[str, Any], answer_unit: int = 1) -> tuple[float, float]:
    """Answer coordinates → original pixels, from the row's original and grid sizes."""
    grid_w, grid_h = row.get("grid_width") or 0, row.get("grid_height") or 0
    if not grid_w or not grid_h:
        return float(answer_unit), float(answer_unit)
    size = (int(row["width"]), int(row["height"]))
    return answer_scale(size, (int(grid_w), int(grid_h)), answer_unit)


# -- predictors (Ray Data actors) -----------------------------------------------------------


@dataclass
class Outputs:
    """One batch's new columns, filled row by row."""

    completions: list[list[str]]
    scores: list[list[float | None]]
    finish_reasons: list[list[str | None]]
    latency_ms: list[float]
    error: list[str | None]
    bad_image: list[bool]

    @classmethod
    def empty(cls, size: int) -> Outputs:
        return cls([[] for _ in range(size)], [[] for _ in range(size)],
                   [[] for _ in range(size)], [0.0] * size, [None] * size,
                   [False] * size)  # fmt: skip

    def append_to(self, batch: pa.Table) -> pa.Table:
        for name in (*IMAGE_COLUMNS, "error"):
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        for name, kind in OUTPUT_SCHEMA.items():
            batch = batch.append_column(name, pa.array(getattr(self, name), kind))
        return batch


class _Predictor:
    """Shared by both predictors: rows out of an Arrow batch, the hook, error rows."""

    def __init__(self, spec: InferenceSpec, to_input: ToInput):
        self.spec = spec
        self.to_input = to_input

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch_rows(batch)
        outputs = Outputs.empty(len(rows))
        todo: list[tuple[int, InspectionInput]] = []
        for index, row in enumerate(rows):
            if row.get("error"):
                outputs.error[index] = str(row["error"])
                outputs.bad_image[index] = True
                continue
            try:
                todo.append((index, self.with_knowledge(self.to_input(row))))
            except Exception as err:  # the hook's problem with this one row
                outputs.error[index] = f"preparing the prompt failed: {type(err).__name__}: {err}"
        if todo:
            self.run(todo, outputs)
        for index, error in enumerate(outputs.error):
            if error:
                log.warning("id %s: %s", rows[index].get("id"), error)
        return outputs.append_to(batch)

    def with_knowledge(self, item: InspectionInput) -> InspectionInput:
        """The category's knowledge from the contract, never from the row."""
        return replace(item, knowledge=self.spec.contract.knowledge_of(item.category))

    def run(self, todo: list[tuple[int, Any]], outputs: Outputs) -> None:
        raise NotImplementedError


class EnginePredictor(_Predictor):
    """One vLLM engine (:class:`mmrad.engine.Engine`) per actor, with the LoRA adapter
    when the target has one. A batch is one ``generate`` call; when vLLM rejects it, its
    rows are retried one by one so only the bad one gets the error."""

    def __init__(self, spec: InferenceSpec, to_input: ToInput):
        super().__init__(spec, to_input)
        from mmrad.engine.engine import Engine

        target = spec.target
        assert isinstance(target, ModelTarget)
        model_dir = local_model_dir(target.path, spec.storage, target.cache_dir)
        engine_config = spec.engine
        adapter_dir = None
        if target.adapter:
            adapter_dir = local_adapter_dir(target, model_dir, spec.storage)
            rank = adapter_rank(adapter_dir)
            engine_config = engine_config.model_copy(
                update={"enable_lora": True,
                        "max_lora_rank": max(engine_config.max_lora_rank, rank)}
            )  # fmt: skip
        self.engine = Engine(model_dir, engine_config, spec.pixels, spec.variant)
        self.lora = self.engine.load_lora(adapter_dir, version=1) if adapter_dir else None

    def run(self, todo: list[tuple[int, Any]], outputs: Outputs) -> None:
        try:
            self._generate(todo, outputs)
        except Exception as err:
            if len(todo) == 1:
                outputs.error[todo[0][0]] = f"generation failed: {type(err).__name__}: {err}"
                return
            for one in todo:  # find the row that broke the batch
                self.run([one], outputs)

    def _generate(self, todo: list[tuple[int, Any]], outputs: Outputs) -> None:
        prompts = [item for _, item in todo]
        start = time.perf_counter()
        results = self.engine.generate(prompts, self.spec.sampling, lora=self.lora)
        elapsed_ms = 1000 * (time.perf_counter() - start)
        for (index, _), completions in zip(todo, results, strict=True):
            outputs.completions[index] = [c.text for c in completions]
            outputs.scores[index] = [c.score for c in completions]
            outputs.finish_reasons[index] = [c.finish_reason for c in completions]
            outputs.latency_ms[index] = elapsed_ms  # the rows of a batch run together

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class EndpointPredictor(_Predictor):
    """An OpenAI-compatible client per actor; the rows of a batch go out concurrently,
    at most ``max_concurrency`` at a time, each retried on its own."""

    def __init__(self, spec: InferenceSpec, to_input: ToInput, key: SecretStr):
        super().__init__(spec, to_input)
        from mmrad.eval.endpoint import EndpointClient

        assert isinstance(spec.target, EndpointTarget)
        self.client = EndpointClient(spec.target, spec.pixels, key=key)

    def run(self, todo: list[tuple[int, Any]], outputs: Outputs) -> None:
        prompts = [chat_prompt(item, self.spec.variant, self.spec.pixels) for _, item in todo]
        results = self.client.complete_many(prompts, self.spec.sampling)
        for (index, _), result in zip(todo, results, strict=True):
            outputs.completions[index] = list(result.completions)
            outputs.scores[index] = list(result.scores)
            outputs.finish_reasons[index] = list(result.finish_reasons)
            outputs.latency_ms[index] = result.latency_ms
            outputs.error[index] = result.error


def batch_rows(batch: pa.Table) -> list[dict[str, Any]]:
    """An Arrow batch as row dicts; image columns as ``H x W x 3`` uint8 arrays."""
    images = {
        name: column_arrays(batch, name) for name in IMAGE_COLUMNS if name in batch.schema.names
    }
    others = batch.drop_columns(list(images)).to_pylist()
    for index, row in enumerate(others):
        for name, arrays in images.items():
            row[name] = arrays[index]
    return others


def column_arrays(batch: pa.Table, name: str) -> list[np.ndarray]:
    """A (possibly ragged) tensor column as one array per row."""
    arrays: list[np.ndarray] = []
    for chunk in batch.column(name).chunks:
        values = chunk.to_numpy(zero_copy_only=False)
        arrays.extend(np.asarray(value, dtype=np.uint8) for value in values)
    return arrays


def local_model_dir(path: str, storage: Storage, cache_dir: str) -> str:
    from mmrad.model.loading import resolve_model_path

    return resolve_model_path(path, storage, cache_dir)


def local_adapter_dir(target: ModelTarget, model_dir: str, storage: Storage) -> str:
    """The adapter on this node: inside the downloaded export, or downloaded itself."""
    from pathlib import Path

    adapter = str(target.adapter)
    if adapter.startswith(target.path.rstrip("/") + "/"):
        return str(Path(model_dir) / adapter[len(target.path.rstrip("/")) + 1 :])
    if not is_remote(adapter):
        return adapter
    from mmrad.model.loading import download_to_node_cache

    return str(download_to_node_cache(adapter, storage, target.cache_dir,
                                      required="adapter_config.json"))  # fmt: skip


def adapter_rank(adapter_dir: str) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return int(config.get("r") or 1)

"""The export contract: how a model is prompted, resolved the same way by every job.

An export's ``mmrad.json`` records how training prompted the model: the prompt variant,
the pixel budget and the domain knowledge per category (:mod:`mmrad.task.knowledge`).
GRPO, evaluation, batch inspection (``mmrad detect``) and Serve all call
:func:`resolve_contract`, with one rule for overrides: a ``prompt.*`` key set in the job's
config replaces the export's value, is logged as a warning and is recorded in the run
(:meth:`Contract.record`, written to ``run_info.json``). A model without ``mmrad.json`` (a
base model, a hub id, an endpoint) is prompted as its config says, with ``PromptConfig``'s
and ``PixelBudget``'s defaults for unset keys.

Domain knowledge comes from a knowledge file or from the training images' labels
(:func:`training_knowledge`), never from the records a job evaluates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mmrad.config import ConfigError, PixelBudget, PromptConfig, PromptOverrides
from mmrad.storage import Storage, StorageError, is_remote, join
from mmrad.task.knowledge import (
    CategoryKnowledge,
    KnowledgeError,
    from_defect_types,
    knowledge_digest,
    knowledge_json,
    parse_knowledge,
)
from mmrad.task.prompt import PromptVariant

log = logging.getLogger(__name__)

TRAINING_LABELS = "training labels"
"""The knowledge origin recorded when no knowledge file was given."""


@dataclass(frozen=True)
class Contract:
    """How to prompt one model, and where each part came from."""

    prompt: PromptConfig
    pixels: PixelBudget
    knowledge: dict[str, CategoryKnowledge] = field(default_factory=dict)
    knowledge_origin: str | None = None
    from_export: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``key -> {"export": value, "used": value}`` for each override of the export."""

    @property
    def variant(self) -> PromptVariant:
        return PromptVariant(**self.prompt.variant_dict())

    @property
    def answer_unit(self) -> int:
        """Model-grid pixels per coordinate of the model's answer boxes."""
        return self.variant.answer_unit(self.pixels.factor)

    def knowledge_of(self, category: str | None) -> CategoryKnowledge | None:
        return self.knowledge.get(category) if category else None

    def record(self) -> dict[str, Any]:
        """What a run records of its contract (``run_info.json``'s ``contract``)."""
        return {
            "prompt": self.prompt.variant_dict(),
            "pixels": self.pixels.model_dump(mode="json"),
            "knowledge_origin": self.knowledge_origin,
            "knowledge_sha256": knowledge_digest(self.knowledge),
            "knowledge_categories": sorted(self.knowledge),
            "from_export": self.from_export,
            "overrides": self.overrides,
        }


def model_info(path: str, storage: Storage, setting: str) -> dict | None:
    """The export's ``mmrad.json``, or ``None`` for a plain Hugging Face directory or a
    hub id (a generalist baseline run through vLLM); ``setting`` names the path's key in
    the error for an empty path."""
    from mmrad.model.export import EXPORT_INFO, ExportError, read_export_info
    from mmrad.model.loading import looks_like_hub_id

    if not is_remote(path) and looks_like_hub_id(path):
        return None
    if not storage.exists(join(path, EXPORT_INFO)):
        if not storage.exists(join(path, "config.json")):
            raise ExportError(f"{setting} {path}: no model there (no config.json or mmrad.json)")
        return None
    return read_export_info(path, storage)


def resolve_contract(
    model: str,
    info: Mapping[str, Any] | None,
    overrides: PromptOverrides,
    storage: Storage,
    who: str,
) -> Contract:
    """The contract of the model at ``model`` (its ``mmrad.json`` as ``info``, ``None``
    without one) under the job's ``prompt`` overrides; ``who`` names the config section
    in the log and in errors (e.g. ``"eval prompt"``)."""
    exported = _exported(model, info)
    chosen = {k: v for k in PromptConfig.VARIANT_KEYS if (v := getattr(overrides, k)) is not None}
    prompt = exported.prompt.model_copy(update=chosen)
    pixels = overrides.pixels or exported.pixels
    knowledge, origin = exported.knowledge, exported.knowledge_origin
    if overrides.knowledge_file:
        knowledge = read_knowledge_file(overrides.knowledge_file, storage)
        origin = overrides.knowledge_file
    used = Contract(prompt, pixels, knowledge, origin, exported.from_export)
    changed = _differences(exported, used) if exported.from_export else {}
    for key, change in changed.items():
        log.warning("%s overrides %s of %s's mmrad.json: %s (the export's: %s)",
                    who, key, model, change["used"], change["export"])  # fmt: skip
    if prompt.domain_knowledge and not knowledge:
        log.warning("%s: %s is prompted with domain knowledge but has none (none in its "
                    "mmrad.json, no prompt.knowledge_file): no prompt describes a category",
                    who, model)  # fmt: skip
    return Contract(prompt, pixels, knowledge, origin, exported.from_export, changed)


def _exported(model: str, info: Mapping[str, Any] | None) -> Contract:
    """The contract as the export states it (defaults for a model without ``mmrad.json``)."""
    if info is None:
        return Contract(PromptConfig(), PixelBudget())
    where = f"{model}/mmrad.json"
    try:
        prompt = PromptConfig(**info["prompt"])
        pixels = PixelBudget(**info["pixels"])
        stated = info.get("knowledge") or {}
        knowledge = parse_knowledge(stated.get("categories") or {}, f"{where} knowledge")
    except (KeyError, TypeError, ValueError) as err:
        from mmrad.model.export import ExportError

        raise ExportError(f"{where}: not a valid export contract: {err}") from None
    return Contract(prompt, pixels, knowledge, stated.get("origin"), from_export=True)


def _differences(exported: Contract, used: Contract) -> dict[str, dict[str, Any]]:
    pairs = {f"prompt.{k}": (getattr(exported.prompt, k), getattr(used.prompt, k))
             for k in PromptConfig.VARIANT_KEYS}  # fmt: skip
    pairs["prompt.pixels"] = (exported.pixels.model_dump(), used.pixels.model_dump())
    pairs["prompt.knowledge"] = (exported.knowledge_origin, used.knowledge_origin)
    return {key: {"export": old, "used": new} for key, (old, new) in pairs.items() if old != new}


def read_knowledge_file(uri: str, storage: Storage) -> dict[str, CategoryKnowledge]:
    """A knowledge file (JSON, or YAML for hand-written ones); errors name the file."""
    try:
        text = storage.read_text(uri)
    except (StorageError, OSError) as err:
        raise ConfigError(f"knowledge_file {uri}: cannot be read: {err}") from None
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
        return parse_knowledge(data, f"knowledge_file {uri}")
    except (ValueError, yaml.YAMLError) as err:
        raise KnowledgeError(f"knowledge_file {uri}: {err}") from None


def training_knowledge(
    prompt: PromptConfig, train_records: Sequence[Mapping[str, Any]], storage: Storage
) -> tuple[dict[str, CategoryKnowledge], str]:
    """A training job's knowledge and its origin: ``prompt.knowledge_file`` when its
    prompt uses domain knowledge, else the labels of its training records (never of the
    records it evaluates)."""
    from mmrad.data.manifest import defect_types_by_category

    if prompt.knowledge_file and prompt.domain_knowledge:
        return read_knowledge_file(prompt.knowledge_file, storage), prompt.knowledge_file
    return from_defect_types(defect_types_by_category(train_records)), TRAINING_LABELS


def export_knowledge(
    knowledge: Mapping[str, CategoryKnowledge], origin: str | None
) -> dict[str, Any]:
    """``mmrad.json``'s ``knowledge`` entry: the knowledge itself, copied, its origin and
    its digest."""
    return {"origin": origin, "sha256": knowledge_digest(knowledge),
            "categories": knowledge_json(knowledge)}  # fmt: skip

"""Domain knowledge: what a domain-knowledge prompt may tell the model about a category.

Each category's known defect types and a one-line description, as in MMAD's
``domain_knowledge.json``. It comes from a knowledge file (``prompt.knowledge_file``, the
format of :func:`parse_knowledge`) or from the labels of training images, never from the
images being evaluated: for a category with one defect type those labels would hand the
model its answer. Training copies it into the export's ``mmrad.json``
(:mod:`mmrad.model.contract`), so evaluation, batch inspection and Serve prompt as training
did.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MMAD_NOT_DEFECTS = ("good", "combined")
"""Keys of an MMAD category entry that name no defect type."""


@dataclass(frozen=True)
class CategoryKnowledge:
    defect_types: tuple[str, ...] = ()
    description: str = ""


Knowledge = Mapping[str, CategoryKnowledge]
"""Category name -> its knowledge."""


class KnowledgeError(ValueError):
    """A knowledge file or an export's knowledge is malformed; the message names where."""


def from_defect_types(defect_types: Mapping[str, list[str]]) -> dict[str, CategoryKnowledge]:
    """Knowledge from labels alone (``category -> defect types``), with no descriptions."""
    return {
        category: CategoryKnowledge(defect_types=tuple(types))
        for category, types in defect_types.items()
    }


def parse_knowledge(data: Any, where: str) -> dict[str, CategoryKnowledge]:
    """``{category: {"defect_types": [str, ...], "description": str}}`` (both keys
    optional, nothing else allowed), or MMAD's ``domain_knowledge.json`` (:func:`from_mmad`),
    as knowledge; ``where`` names the file in errors."""
    if not isinstance(data, Mapping):
        raise KnowledgeError(f"{where}: expected a mapping of category -> knowledge")
    if data and all(_is_mmad_dataset(entry) for entry in data.values()):
        return from_mmad(data, where)
    return {
        str(category): _category(entry, f"{where}: {category}") for category, entry in data.items()
    }


def _is_mmad_dataset(entry: Any) -> bool:
    """``{category: {defect name: text}}``: a data set's entry in MMAD's file."""
    return (
        isinstance(entry, Mapping)
        and bool(entry)
        and all(_is_mmad_category(defects) for defects in entry.values())
    )


def _is_mmad_category(defects: Any) -> bool:
    return (
        isinstance(defects, Mapping)
        and bool(defects)
        and "defect_types" not in defects
        and all(isinstance(text, str) for text in defects.values())
    )


def from_mmad(data: Mapping[str, Any], where: str) -> dict[str, CategoryKnowledge]:
    """MMAD's ``{data set: {category: {defect name: "Title\\n Description: ..."}}}``: the
    defect names less ``good`` and ``combined``, and the first line of the ``good`` entry's
    description as the category's. A category in two data sets is an error."""
    found: dict[str, CategoryKnowledge] = {}
    owner: dict[str, str] = {}
    for dataset, categories in data.items():
        for category, defects in categories.items():
            if category in found:
                raise KnowledgeError(
                    f"{where}: category {category!r} is in both {owner[category]!r} and {dataset!r}"
                )
            types = [name for name in defects if name.lower() not in MMAD_NOT_DEFECTS]
            good = next((text for name, text in defects.items() if name.lower() == "good"), "")
            found[category] = CategoryKnowledge(tuple(types), _mmad_description(good))
            owner[category] = dataset
    return found


def _mmad_description(text: str) -> str:
    """The first line after ``Description:`` (else the first line after the title) of an
    MMAD entry."""
    _, marker, rest = text.partition("Description:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    if not marker:
        lines = lines[1:]  # the title
    return lines[0] if lines else ""


def _category(entry: Any, where: str) -> CategoryKnowledge:
    if not isinstance(entry, Mapping):
        raise KnowledgeError(f"{where}: expected {{defect_types: [...], description: ...}}")
    unknown = sorted(set(entry) - {"defect_types", "description"})
    if unknown:
        raise KnowledgeError(f"{where}: unknown field(s) {unknown}")
    types = entry.get("defect_types", [])
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        raise KnowledgeError(f"{where}: defect_types must be a list of non-empty strings")
    description = entry.get("description", "")
    if not isinstance(description, str) or "\n" in description.strip():
        raise KnowledgeError(f"{where}: description must be one line of text")
    return CategoryKnowledge(defect_types=tuple(types), description=description.strip())


def knowledge_digest(knowledge: Knowledge) -> str:
    """sha256 of the knowledge's canonical JSON: which version of a file a run used."""
    text = json.dumps(knowledge_json(knowledge), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def knowledge_json(knowledge: Knowledge) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`parse_knowledge`, categories sorted."""
    return {
        category: {"defect_types": list(entry.defect_types), "description": entry.description}
        for category, entry in sorted(knowledge.items())
    }

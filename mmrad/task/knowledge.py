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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    optional, nothing else allowed) as knowledge; ``where`` names the file in errors."""
    if not isinstance(data, Mapping):
        raise KnowledgeError(f"{where}: expected a mapping of category -> knowledge")
    return {
        str(category): _category(entry, f"{where}: {category}") for category, entry in data.items()
    }


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


def knowledge_json(knowledge: Knowledge) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`parse_knowledge`, categories sorted."""
    return {
        category: {"defect_types": list(entry.defect_types), "description": entry.description}
        for category, entry in sorted(knowledge.items())
    }

"""Split assignment for general anomaly detection, in two modes (``data.split.mode``):

- ``published``: every image keeps its data set's own split; ``val`` is carved from the
  published training images.
- ``unseen``: only held-out categories and sources test; the other categories' images,
  published test images included, are cut into train and val (and ``test_fraction``).

In both modes a held-out category or source sends its published test images to ``test``
(every image when the source has no published split, as synthetic data) and its published
training images to no split: nothing trains on them and the published test set stays
exactly as published. They may still be another image's reference.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from mmrad.config import SplitConfig


def category_key(record: Mapping[str, Any]) -> str:
    return f"{record['source']}/{record['category']}"


def in_categories(record: Mapping[str, Any], names: Collection[str]) -> bool:
    """Whether ``names`` (``name`` or ``source/name`` items) names the record's category."""
    return record["category"] in names or category_key(record) in names


def is_held_out(record: Mapping[str, Any], config: SplitConfig) -> bool:
    """Whether the record's category or source is held out for testing."""
    return in_categories(record, config.test_categories) or record["source"] in config.test_sources


def is_unused(record: Mapping[str, Any], published: str | None, config: SplitConfig) -> bool:
    """A held-out category's published training image: it goes to no split."""
    return published == "train" and is_held_out(record, config)


def unmatched_held_out(
    config: SplitConfig, sources: Collection[str], categories: Collection[str]
) -> list[str]:
    """``field: name`` for every held-out name that matches nothing in the data:
    ``categories`` holds ``source/category`` keys."""
    names = {key.split("/", 1)[1] for key in categories}
    problems = [
        f"{field}: {name!r}"
        for field in ("test_categories", "val_categories")
        for name in getattr(config, field)
        if name not in names and name not in categories
    ]
    problems += [f"test_sources: {name!r}" for name in config.test_sources if name not in sources]
    return problems


def assign_splits(
    records: list[dict[str, Any]],
    config: SplitConfig,
    seed: int,
    *,
    mode: str = "unseen",
    published: Mapping[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """Set ``split`` on every record, deterministically for ``seed``.

    ``published`` maps ids to the data set's own split. Held-out records, and in
    ``published`` mode the published test images, go to ``test``; the validation
    categories' other images go to ``val``. In every other category
    the images are shuffled (seeded by the category's name, so adding a category does not
    reshuffle the others) and cut into ``test_fraction`` / ``val_fraction`` / the rest for
    ``train``, normal and anomalous images apart so each split keeps both kinds.
    """
    published = published or {}
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        own_test = mode == "published" and published.get(record["id"]) == "test"
        if is_held_out(record, config) or own_test:
            record["split"] = "test"
        elif in_categories(record, config.val_categories):
            record["split"] = "val"
        else:
            groups[(category_key(record), bool(record["is_anomalous"]))].append(record)
    for (key, anomalous), members in sorted(groups.items()):
        members.sort(key=lambda r: r["id"])
        random.Random(f"{seed}/{key}/{anomalous}").shuffle(members)
        n_test = round(len(members) * config.test_fraction)
        n_val = round(len(members) * config.val_fraction)
        for position, record in enumerate(members):
            if position < n_test:
                record["split"] = "test"
            elif position < n_test + n_val:
                record["split"] = "val"
            else:
                record["split"] = "train"
    return records


def leaked_categories(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Categories present in both train and test: not 'unseen' in the general-AD sense."""
    splits: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits[category_key(record)].add(record["split"])
    return sorted(key for key, found in splits.items() if {"train", "test"} <= found)

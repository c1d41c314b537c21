"""Split assignment for general anomaly detection: whole categories or sources can be held
out for testing, so the test split measures categories the model never saw."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from mmrad.config import SplitConfig


def category_key(record: Mapping[str, Any]) -> str:
    return f"{record['source']}/{record['category']}"


def assign_splits(
    records: list[dict[str, Any]], config: SplitConfig, seed: int
) -> list[dict[str, Any]]:
    """Set ``split`` on every record, deterministically for ``seed``.

    Records of a held-out category or source go to ``test``. In every other category the
    images are shuffled (seeded by the category's name, so adding a category does not
    reshuffle the others) and cut into ``test_fraction`` / ``val_fraction`` / the rest for
    ``train``, normal and anomalous images apart so each split keeps both kinds.
    """
    held_out_categories = set(config.test_categories)
    held_out_sources = set(config.test_sources)
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        unseen = (
            record["category"] in held_out_categories
            or category_key(record) in held_out_categories
            or record["source"] in held_out_sources
        )
        if unseen:
            record["split"] = "test"
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


def seen_categories(records: Iterable[Mapping[str, Any]]) -> set[str]:
    """``source/category`` keys that have training images."""
    return {category_key(r) for r in records if r["split"] == "train"}

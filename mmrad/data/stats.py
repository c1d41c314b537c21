"""``mmrad data stats``: what a manifest holds, and whether its test split is really unseen."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from mmrad.data.schema import SPLITS
from mmrad.data.splits import category_key, leaked_categories


def manifest_stats(
    records: Iterable[Mapping[str, Any]], split: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Per ``source/category``: images per split, anomaly ratio, boxes per anomalous image;
    plus totals, the categories present in both train and test, and ``split``: how the
    splits were made (the manifest's metadata; None when it does not say)."""
    records = list(records)
    groups: dict[str, dict[str, Any]] = defaultdict(
        lambda: {**{split: 0 for split in SPLITS}, "images": 0, "anomalous": 0, "boxes": 0}
    )
    for record in records:
        group = groups[category_key(record)]
        group[record["split"]] += 1
        group["images"] += 1
        group["anomalous"] += int(bool(record["is_anomalous"]))
        group["boxes"] += len(record["boxes"])
    categories = {}
    for key, group in sorted(groups.items()):
        categories[key] = {
            **{split: group[split] for split in SPLITS},
            "images": group["images"],
            "anomaly_ratio": group["anomalous"] / group["images"],
            "boxes_per_anomalous_image": group["boxes"] / group["anomalous"]
            if group["anomalous"]
            else 0.0,
        }
    totals = {split: sum(g[split] for g in groups.values()) for split in SPLITS}
    anomalous = sum(g["anomalous"] for g in groups.values())
    return {
        "images": len(records),
        "splits": totals,
        "sources": sorted({r["source"] for r in records}),
        "anomaly_ratio": anomalous / len(records) if records else 0.0,
        "boxes_per_anomalous_image": sum(g["boxes"] for g in groups.values()) / anomalous
        if anomalous
        else 0.0,
        "categories": categories,
        "train_test_overlap": leaked_categories(records),
        "split": dict(split) if split is not None else None,
    }

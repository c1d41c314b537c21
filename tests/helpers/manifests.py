"""Small hand-made manifests for tests of what jobs read (no images behind them)."""

from __future__ import annotations


def normal_record(id: str, split: str, reasoning: str | None = "Nothing stands out.") -> dict:
    """A valid record of a normal 64x64 image."""
    return {
        "id": id, "source": "s", "category": "c", "split": split,
        "image_uri": f"images/{id}.png", "reference_uri": None, "width": 64, "height": 64,
        "is_anomalous": False, "boxes": [], "labels": [], "defect_type": "good",
        "reasoning": reasoning,
    }  # fmt: skip

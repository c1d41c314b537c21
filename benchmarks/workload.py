"""What several benchmarks train on: the tiny model and a small synthetic set."""

from __future__ import annotations

from mmrad.config import DataBuildConfig
from mmrad.data.build import build_dataset
from mmrad.model.tiny import build_tiny_model
from mmrad.storage import Storage


def tiny_model_and_data(work: str) -> tuple[str, str]:
    """The tiny model and a synthetic set of 112 px images under ``work``: their paths
    (the model folder, the manifest)."""
    model = str(build_tiny_model(f"{work}/tiny"))
    manifest = build_dataset(
        DataBuildConfig(out=f"{work}/data", synthetic={"image_size": 112}),
        Storage(),
        progress=False,
    ).manifest_uri
    return model, manifest

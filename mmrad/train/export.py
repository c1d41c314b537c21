"""Export a saved training checkpoint as a plain Hugging Face directory (+ ``mmrad.json``),
on one node without a process group (the checkpoint's DCP shards are read whole)."""

from __future__ import annotations

from pathlib import Path

from mmrad.model.export import export_model, load_training_state
from mmrad.model.loading import load_model, load_processor, resolve_model_path
from mmrad.model.lora import apply_lora
from mmrad.storage import Storage
from mmrad.train.building import keep_trained_in_float32
from mmrad.train.checkpoint import load_weights_without_process_group, trainable_keys


def export_checkpoint(job, folder: Path, out_uri: str, knowledge: dict) -> str:
    """Rebuild ``job``'s training model on CPU (its ``model``, ``lora``, ``prompt`` and
    ``export`` sections), read the checkpoint's weights (the adapter, or every weight in
    full fine-tuning) and export it with ``knowledge`` (``mmrad.json``'s entry); returns
    the export's URI."""
    storage = Storage.from_config(job.storage)
    path = resolve_model_path(job.model.path, storage, job.model.cache_dir)
    model = apply_lora(load_model(path, job.model.dtype), job.lora)
    keep_trained_in_float32(model)  # as trained: the checkpoint's master weights
    wanted = trainable_keys(model)
    template = {key: value for key, value in model.state_dict().items() if key in wanted}
    load_training_state(model, load_weights_without_process_group(folder, template))
    return export_model(
        model,
        load_processor(path, job.model.pixels),
        out_uri,
        storage,
        merge_lora=job.export.merge_lora,
        prompt=job.prompt,
        pixels=job.model.pixels,
        base_model=job.model.path,
        in_place=True,
        dtype=job.model.dtype,
        extra={"checkpoint": str(folder.name), "run": job.run.name},
        knowledge=knowledge,
    )

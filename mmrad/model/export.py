"""Exports: a plain Hugging Face directory plus ``mmrad.json``.

The directory (``config.json``, ``model.safetensors``, ``generation_config.json``,
tokenizer and processor files) loads in transformers and vLLM without mmrad. LoRA is
either merged into the weights or kept beside the base weights in ``adapter/``
(``adapter_config.json``, ``adapter_model.safetensors``). ``mmrad.json`` records what
evaluation and serving need to prompt as training did (:mod:`mmrad.model.contract`): the
prompt variant, the pixel budget (also written into the saved processor), the model grid
rule and a copy of the domain knowledge with its origin.

Nobody sees half an export. A local export is built in a hidden directory beside the
target and renamed into place. On object stores there is no rename: a marker
(:data:`~mmrad.model.loading.EXPORT_IN_PROGRESS`) goes up first and the old ``mmrad.json``
is removed, then the files, then ``mmrad.json``, and the marker is removed last;
:func:`read_export_info` needs ``mmrad.json`` and model downloads refuse the marker.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmrad.config import LoraConfig, PixelBudget, PromptConfig
from mmrad.model.loading import EXPORT_IN_PROGRESS, load_model, load_processor
from mmrad.model.lora import ADAPTER_NAME, apply_lora, is_peft
from mmrad.model.names import clean_name
from mmrad.storage import Storage, StorageError, is_remote, join, local_path

EXPORT_INFO = "mmrad.json"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1


class ExportError(OSError):
    """A path holds no mmrad export, or an export would overwrite something else."""


def export_model(
    model,
    processor,
    out_uri: str,
    storage: Storage,
    *,
    merge_lora: bool,
    prompt: PromptConfig,
    pixels: PixelBudget,
    extra: dict | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
    in_place: bool = False,
    knowledge: dict | None = None,
) -> str:
    """Export ``model`` (a peft model or a plain one) to ``out_uri`` and return it.

    The training model is not changed: merging and casting happen on a copy, unless
    ``in_place`` (for a model built only to be exported: no copy of its weights).
    ``base_model`` (recorded in ``mmrad.json``) defaults to the path the model was loaded
    from; pass the configured one (hub id or object-store URI) rather than a node's cache
    path.
    ``dtype`` casts the exported weights (e.g. ``"bfloat16"`` for serving).
    ``knowledge`` is ``mmrad.json``'s knowledge entry
    (:func:`~mmrad.model.contract.export_knowledge`).
    """
    changes = is_peft(model) or (dtype is not None and _dtype_of(model) != dtype)
    needs_copy = changes and not in_place
    work = copy.deepcopy(model) if needs_copy else model
    return _export(work, processor, out_uri, storage, merge_lora, prompt, pixels, extra,
                   base_model, dtype, knowledge)  # fmt: skip


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    base_model_path: str,
    out_uri: str,
    storage: Storage,
    *,
    lora: LoraConfig,
    merge_lora: bool,
    prompt: PromptConfig,
    pixels: PixelBudget,
    extra: dict | None = None,
    base_model: str | None = None,
    processor=None,
    dtype: str | None = None,
    knowledge: dict | None = None,
) -> str:
    """Export a full (unsharded) state dict of the training model, as FSDP gathers it.

    The base architecture is loaded on CPU from ``base_model_path`` (a local directory,
    see :func:`~mmrad.model.loading.resolve_model_path`), wrapped with LoRA when
    ``lora.enabled``, and ``state_dict`` loaded into it: keys as the training model's
    ``state_dict()`` names them (peft's ``base_model.model.…`` with LoRA). Frozen base
    weights may be left out (a LoRA-only state dict); trainable ones may not.
    """
    model = load_model(base_model_path, _state_dtype(state_dict))
    model = apply_lora(model, lora)
    load_training_state(model, state_dict)
    if processor is None:
        processor = load_processor(base_model_path, pixels)
    return export_model(model, processor, out_uri, storage, merge_lora=merge_lora,
                        prompt=prompt, pixels=pixels, extra=extra,
                        base_model=base_model or base_model_path, dtype=dtype,
                        in_place=True, knowledge=knowledge)  # fmt: skip


def read_export_info(path_or_uri: str, storage: Storage) -> dict[str, Any]:
    """The ``mmrad.json`` of an export."""
    uri = join(path_or_uri, EXPORT_INFO)
    try:
        return json.loads(storage.read_text(uri))
    except StorageError:
        raise ExportError(f"{path_or_uri}: not an mmrad export (no {EXPORT_INFO})") from None
    except ValueError as err:
        raise ExportError(f"{uri}: not valid JSON: {err}") from None


def load_training_state(model, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model``; every key must be known, every trainable
    parameter present (frozen ones may be missing: they are the base weights)."""
    clean = {clean_name(key): value for key, value in state_dict.items()}
    missing, unexpected = model.load_state_dict(clean, strict=False)
    if unexpected:
        raise ValueError(
            f"state dict has {len(unexpected)} keys the model does not, e.g. {unexpected[:3]}"
        )
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    lacking = [key for key in missing if key in trainable]
    if lacking:
        raise ValueError(
            f"state dict lacks {len(lacking)} trainable parameters, e.g. {lacking[:3]}"
        )


def _state_dtype(state_dict: Mapping[str, torch.Tensor]) -> str:
    for value in state_dict.values():
        if torch.is_floating_point(value):
            return str(value.dtype).removeprefix("torch.")
    return "float32"


def _dtype_of(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _export(
    model,
    processor,
    out_uri: str,
    storage: Storage,
    merge_lora: bool,
    prompt: PromptConfig,
    pixels: PixelBudget,
    extra: dict | None,
    base_model: str | None,
    dtype: str | None,
    knowledge: dict | None,
) -> str:
    """Write ``model`` (which this function may change) and publish it at ``out_uri``."""
    out_uri = out_uri.rstrip("/")
    staging = _staging_dir(out_uri)
    try:
        plain, lora_mode, base_model = _plain_model(model, staging, merge_lora, base_model)
        if dtype is not None:
            plain = plain.to(getattr(torch, dtype))
        plain.save_pretrained(staging)
        _save_processor(processor, pixels, staging)
        info = {
            "format_version": FORMAT_VERSION,
            "prompt": prompt.variant_dict(),
            "knowledge": knowledge,
            "pixels": pixels.model_dump(mode="json"),
            "model_grid": f"qwen2.5-vl smart_resize factor {pixels.factor}",
            "base_model": base_model,
            "lora": lora_mode,
            "adapter_dir": ADAPTER_DIR if lora_mode == "adapter" else None,
            "dtype": _dtype_of(plain),
            "versions": _versions(),
            "extra": extra or {},
        }
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _publish(staging, out_uri, storage)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_uri


def _plain_model(model, staging: Path, merge_lora: bool, base_model: str | None):
    """``(transformers model, "merged" | "adapter" | "none", base model path)``; the
    adapter, when kept, is saved under ``staging/adapter``."""
    if not is_peft(model):
        return model, "none", base_model or getattr(model, "name_or_path", None)
    config = model.peft_config[ADAPTER_NAME]
    base_model = base_model or config.base_model_name_or_path
    if merge_lora:
        return model.merge_and_unload(), "merged", base_model
    config.base_model_name_or_path = base_model  # not a node's cache path
    model.save_pretrained(staging / ADAPTER_DIR, save_embedding_layers=False)
    return model.unload(), "adapter", base_model


def _save_processor(processor, pixels: PixelBudget, staging: Path) -> None:
    """The processor with the export's pixel budget, so vLLM and transformers size
    images like training did."""
    from transformers.image_utils import SizeDict

    processor = copy.deepcopy(processor)
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        if part is not None and hasattr(part, "size"):
            part.size = SizeDict(**pixels.processor_size())
    processor.save_pretrained(staging)


def _versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing peft for its version
    would cost a full-weight export seconds)."""
    from importlib.metadata import version

    return {"torch": torch.__version__, "transformers": version("transformers"),
            "peft": version("peft")}  # fmt: skip


def _staging_dir(out_uri: str) -> Path:
    """Beside a local target (same filesystem, so the final rename is atomic)."""
    if is_remote(out_uri):
        return Path(tempfile.mkdtemp(prefix="mmrad-export-"))
    out = local_path(out_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))


def _publish(staging: Path, out_uri: str, storage: Storage) -> None:
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    if is_remote(out_uri):
        _publish_remote(staging, files, out_uri, storage)
    else:
        _publish_local(staging, local_path(out_uri))


def _publish_local(staging: Path, out: Path) -> None:
    if out.exists() and not (out / EXPORT_INFO).exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and holds no mmrad export; not replacing it")
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 hides it from others
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, out)


def _publish_remote(staging: Path, files: list[str], out_uri: str, storage: Storage) -> None:
    existing = {item[len(out_uri) + 1 :] for item in storage.list(out_uri)}
    if existing and not existing & {EXPORT_INFO, EXPORT_IN_PROGRESS}:
        raise ExportError(f"{out_uri} holds objects but no mmrad export; not replacing them")
    marker = join(out_uri, EXPORT_IN_PROGRESS)
    storage.write_text(marker, "export in progress\n")
    storage.delete(join(out_uri, EXPORT_INFO))
    for relative in files:
        if relative != EXPORT_INFO:
            storage.upload_file(staging / relative, join(out_uri, relative))
    for stale in existing - set(files) - {EXPORT_INFO, EXPORT_IN_PROGRESS}:
        storage.delete(join(out_uri, stale))
    storage.upload_file(staging / EXPORT_INFO, join(out_uri, EXPORT_INFO))
    storage.delete(marker)

"""The model a replica serves: the export's files on this node, and how training
prompted it (``mmrad.json``: prompt variant, pixel budget)."""

from __future__ import annotations

from dataclasses import dataclass

from mmrad.config import PixelBudget, PromptConfig
from mmrad.serve.config import ServeArgs
from mmrad.storage import Storage
from mmrad.task.prompt import PromptVariant


class ServedModelError(ValueError):
    """The model directory cannot be served as configured."""


@dataclass(frozen=True)
class ServedModel:
    path: str
    """A local directory vLLM can open (s3:// exports are downloaded to the node cache)."""
    prompt: PromptConfig
    pixels: PixelBudget

    @property
    def variant(self) -> PromptVariant:
        return PromptVariant(**self.prompt.model_dump())


def load_served_model(args: ServeArgs) -> ServedModel:
    """Resolve ``args.model_dir`` on this node and read its ``mmrad.json``.

    An export's ``mmrad.json`` decides the prompt and the pixel budget; giving
    ``args.prompt`` / ``args.pixels`` as well is an error (they could only disagree).
    A directory without one (a base model) needs both in the args.
    """
    from mmrad.model.export import ExportError, read_export_info
    from mmrad.model.loading import resolve_model_path

    storage = Storage.from_config(args.storage)
    path = resolve_model_path(args.model_dir, storage, args.cache_dir)
    try:
        info = read_export_info(path, storage)
    except ExportError:
        info = None
    if info is None:
        if args.prompt is None or args.pixels is None:
            raise ServedModelError(
                f"{args.model_dir}: no mmrad.json; give args.prompt and args.pixels for a "
                "model that is not an mmrad export"
            )
        return ServedModel(path=path, prompt=args.prompt, pixels=args.pixels)
    if args.prompt is not None or args.pixels is not None:
        raise ServedModelError(
            f"{args.model_dir}: its mmrad.json decides the prompt and pixel budget; "
            "remove args.prompt and args.pixels"
        )
    if info.get("lora") == "adapter":
        raise ServedModelError(
            f"{args.model_dir}: the LoRA adapter is not merged; export with "
            "export.merge_lora=true to serve it"
        )
    return ServedModel(
        path=path,
        prompt=PromptConfig.model_validate(info["prompt"]),
        pixels=PixelBudget.model_validate(info["pixels"]),
    )

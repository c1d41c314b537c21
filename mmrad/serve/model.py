"""The model a replica serves: the export's files on this node, and how to prompt it (its
contract, :mod:`mmrad.model.contract`: prompt variant, pixel budget, domain knowledge)."""

from __future__ import annotations

from dataclasses import dataclass

from mmrad.model.contract import Contract
from mmrad.serve.config import ServeArgs
from mmrad.storage import Storage


class ServedModelError(ValueError):
    """The model directory cannot be served as configured."""


@dataclass(frozen=True)
class ServedModel:
    path: str
    """A local directory vLLM can open (s3:// exports are downloaded to the node cache)."""
    contract: Contract

    @property
    def variant(self):
        return self.contract.variant

    @property
    def pixels(self):
        return self.contract.pixels


def load_served_model(args: ServeArgs) -> ServedModel:
    """Resolve ``args.model_dir`` on this node and its contract: the export's
    ``mmrad.json`` under ``args.prompt``'s overrides (logged), or, for a directory without
    one (a base model), ``args.prompt`` with defaults for unset keys."""
    from mmrad.model.contract import model_info, resolve_contract
    from mmrad.model.loading import resolve_model_path

    storage = Storage.from_config(args.storage)
    path = resolve_model_path(args.model_dir, storage, args.cache_dir)
    info = model_info(path, storage, "args.model_dir")
    if info is not None and info.get("lora") == "adapter":
        raise ServedModelError(
            f"{args.model_dir}: the LoRA adapter is not merged; export with "
            "export.merge_lora=true to serve it"
        )
    contract = resolve_contract(args.model_dir, info, args.prompt, storage, "args.prompt")
    return ServedModel(path=path, contract=contract)

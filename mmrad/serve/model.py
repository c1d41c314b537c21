"""The model a replica serves: the export's files on this node, and how to prompt it (its
contract, :mod:`mmrad.model.contract`: prompt variant, pixel budget, domain knowledge)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrad.config import EngineConfig
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


def served_engine(args: ServeArgs) -> EngineConfig:
    """The replica's engine: ``args.engine``, with LoRA on when adapters are configured
    (``max_loaded_adapters`` of them loaded and batched together, plus the identity
    adapter's slot on CPUs, see :mod:`mmrad.serve.adapters`)."""
    if not args.adapters:
        return args.engine
    from mmrad.engine.settings import on_gpu_default

    slots = args.max_loaded_adapters + (0 if on_gpu_default() else 1)
    return args.engine.model_copy(update={"enable_lora": True, "max_loras": slots})


def in_flight_limit(args: ServeArgs) -> int | None:
    """Sequences a replica holds (running + queued) before it refuses new ones."""
    if args.max_queued_requests is None:
        return None
    return args.engine.max_num_seqs + args.max_queued_requests


async def served_adapters(args: ServeArgs, model: ServedModel, serving_models: Any) -> Any:
    """The replica's :class:`~mmrad.serve.adapters.Adapters`; on CPUs with adapters
    configured, base requests go through an identity adapter written to the node cache."""
    from mmrad.engine.settings import on_gpu_default
    from mmrad.model.loading import node_cache_dir
    from mmrad.serve.adapters import Adapters, identity_adapter

    storage = Storage.from_config(args.storage)
    adapters = Adapters(serving_models, args.model_name, args.adapters, storage, args.cache_dir)
    if args.adapters and not on_gpu_default():
        key = hashlib.sha256(model.path.encode()).hexdigest()[:16]
        folder = Path(node_cache_dir(args.cache_dir)) / "identity-adapters" / key
        written = await asyncio.to_thread(identity_adapter, model.path, folder)
        await adapters.use_identity(str(written))
    return adapters

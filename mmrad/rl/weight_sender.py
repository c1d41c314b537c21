"""The learners' side of the weight channel: the policy's weights, gathered from the FSDP
shards one tensor at a time and broadcast by learner rank 0 in bounded buckets.

What is sent are HF checkpoint names in the engines' dtype:

- ``full``: every weight of the model;
- ``lora`` (merged): every weight with the adapter folded in, ``W + scale * B @ A`` for
  each adapted projection, so the engines sample the policy with no adapter at all.

Every learner rank iterates :func:`policy_tensors` in step (each tensor is an all-gather
over the learners); rank 0 alone packs and broadcasts, copying each tensor into the
bucket as it arrives, so it holds one bucket and one gathered tensor beyond its shard.
FSDP2 (or an unsharded model) only: FSDP1's flat parameters have no per-tensor gather
(the job config refuses the pair).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmrad.engine.channel import (
    SENDER_RANK,
    Channel,
    ChannelSpec,
    MembersCheck,
    SendPlan,
    TensorMeta,
    channel_device,
    dtype_name,
    open_sender_store,
    pack,
    plan_sends,
)
from mmrad.model.names import clean_name

if TYPE_CHECKING:
    import torch
    from torch import nn

PEFT_PREFIX = "base_model.model."
LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


@dataclass(frozen=True)
class ChannelUpdate:
    """Weights of ``version`` announced to the engines; the bytes follow over the channel.
    ``host``/``port`` are where learner rank 0 would host a new channel's store (the pool
    decides whether one is needed)."""

    version: int
    plan: dict[str, Any]  # a SendPlan as a dict
    host: str
    port: int
    backend: str  # "nccl" or "gloo"
    sender: str  # the WeightSender's id: a restarted learner needs a new channel

    @property
    def send_plan(self) -> SendPlan:
        return SendPlan.from_dict(self.plan)


@dataclass(frozen=True)
class ResendWeights:
    """The coordinator's answer to a learner asking for a batch when replacement engines
    need the learners' current weights over the channel first (``request`` counts)."""

    request: int


def hf_name(name: str) -> str:
    """A learner parameter's HF checkpoint name: no FSDP/compile wrappers, no peft prefix,
    no ``.base_layer``."""
    return clean_name(name).removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _is_lora_part(name: str) -> bool:
    return any(part in name for part in LORA_PARTS)


def policy_metas(model: nn.Module, dtype: torch.dtype) -> list[TensorMeta]:
    """What :func:`policy_tensors` yields, by name, dtype and full shape, in the same
    order (known on every rank without gathering anything)."""
    return [
        TensorMeta(hf_name(name), dtype_name(dtype), tuple(param.shape))
        for name, param in model.named_parameters()
        if not _is_lora_part(name)
    ]


def policy_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: ``(HF name, full tensor)`` for every weight of the policy, adapters
    merged, in :func:`policy_metas` order, on this rank's device."""
    lora_layers = _lora_layers(model)
    for name, param in model.named_parameters():
        if _is_lora_part(name):
            continue
        full = _full(param)
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in lora_layers and name.endswith(".weight"):
            full = merged_weight(full, lora_layers[owner])
        yield hf_name(name), full.detach().to(dtype)


def merged_weight(base: torch.Tensor, layer: Any) -> torch.Tensor:
    """``W + scale * B @ A`` for a peft LoRA linear layer's active adapters (in fp32)."""
    merged = base.float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a = _full(layer.lora_A[adapter].weight).float()
        b = _full(layer.lora_B[adapter].weight).float()
        merged = merged + layer.scaling[adapter] * (b @ a)
    return merged


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    """Modules holding LoRA adapters by their ``named_modules`` name."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }


def channel_backend(learners_on_gpu: bool, engine_gpus: float) -> str:
    """NCCL when learners and engines each hold whole GPUs; gloo otherwise, through host
    memory: on CPUs, and where engines share a GPU (``engine_gpus < 1``), possibly with a
    learner, since NCCL refuses two ranks on one GPU."""
    return "nccl" if learners_on_gpu and engine_gpus >= 1 else "gloo"


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param


class WeightSender:
    """Learner rank 0's member of the weight channel (every rank makes one; the others
    only take part in the gathers)."""

    def __init__(
        self,
        rank: int,
        backend: str,
        host: str,
        bucket_bytes: int,
        device: torch.device | None = None,
    ):
        """``device``: this learner's GPU for NCCL (else the current CUDA device)."""
        self.rank = rank
        self.backend = backend
        self.device = device
        self.host = host
        self.bucket_bytes = bucket_bytes
        self.id = uuid.uuid4().hex[:12]
        self._channel: Channel | None = None
        self._announced_store: Any | None = None  # a new channel's store, open already

    def announce(self, model: nn.Module, dtype: torch.dtype, version: int) -> ChannelUpdate:
        """Rank 0: what the engines are to receive, and where a new channel would meet: a
        store opened now, so that engines asked to join find it open (or the sender
        gone) at once."""
        plan = plan_sends(version, policy_metas(model, dtype), self.bucket_bytes)
        self._announced_store = open_sender_store(self.host)
        port = self._announced_store.port
        return ChannelUpdate(version, plan.to_dict(), self.host, port, self.backend, self.id)

    def send(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        update: ChannelUpdate | None,
        spec: dict[str, Any] | None,
        members_alive: MembersCheck | None = None,
    ) -> None:
        """Collective over the learners: stream the policy. Rank 0 joins ``spec`` first
        when it is a new channel (waiting for the engines while ``members_alive`` finds
        nothing wrong), then broadcasts each bucket of ``update``'s plan as its tensors
        are gathered; the other ranks pass ``None`` for all three. When the channel does
        not form or breaks, rank 0 still takes part in every gather, then raises
        :class:`~mmrad.engine.channel.ChannelFailed`."""
        tensors = policy_tensors(model, dtype)
        if self.rank != SENDER_RANK:
            for _ in tensors:  # the gathers only
                pass
            return
        assert update is not None and spec is not None
        try:
            channel = self._join(ChannelSpec.from_dict(spec), members_alive)
            plan = update.send_plan
            for index in range(len(plan.buckets)):
                metas = plan.bucket(index)
                gathered = (_checked(next(tensors), meta) for meta in metas)
                channel.broadcast(pack(gathered, metas, channel.device))
        except BaseException:
            self.close()
            for _ in tensors:  # the other ranks gather on: keep the collectives in step
                pass
            raise

    def _join(self, spec: ChannelSpec, members_alive: MembersCheck | None) -> Channel:
        store, self._announced_store = self._announced_store, None  # unused: it closes
        if self._channel is None or self._channel.spec != spec:
            self.close()
            device = channel_device(self.backend, self.device)
            self._channel = Channel(spec, SENDER_RANK, device, members_alive, store)
        return self._channel

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


def _checked(item: tuple[str, torch.Tensor], meta: TensorMeta) -> torch.Tensor:
    name, tensor = item
    if name != meta.name or tuple(tensor.shape) != meta.shape:
        raise RuntimeError(
            f"weight channel: sending {name} {tuple(tensor.shape)} where the plan has "
            f"{meta.name} {meta.shape}"
        )
    return tensor

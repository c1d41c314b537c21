"""The weight channel's pure parts: bucket plans, packing, names, the merged LoRA stream;
and one broadcast between two processes over gloo."""

from __future__ import annotations

import pytest
import torch

from mmrad.engine.channel import (
    ChannelSpec,
    SendPlan,
    TensorMeta,
    bucket_nbytes,
    dtype_name,
    free_port,
    local_address,
    pack,
    plan_sends,
    unpack,
)
from mmrad.rl.weight_sender import channel_backend, hf_name, policy_metas, policy_tensors


def metas(*sizes: int) -> list[TensorMeta]:
    return [TensorMeta(f"t{i}", "float32", (size,)) for i, size in enumerate(sizes)]


def test_buckets_are_bounded_and_cover_every_tensor_in_order():
    plan = plan_sends(3, metas(8, 8, 8, 40, 5), bucket_bytes=64)
    assert plan.buckets == ((0, 2), (2, 3), (3, 4), (4, 5))  # 40 floats: alone, over the bound
    assert [m.name for i in range(len(plan.buckets)) for m in plan.bucket(i)] == [
        "t0", "t1", "t2", "t3", "t4",
    ]  # fmt: skip
    assert plan.nbytes == 69 * 4
    assert plan_sends(0, metas(3, 3), 24).buckets == ((0, 1), (1, 2))  # 12 bytes take 16
    assert plan_sends(0, [], 10).buckets == ()
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_sends(0, metas(1), 0)


def test_plan_survives_msgpack_types():
    """What crosses vLLM's RPC: lists, strings and ints only."""
    plan = plan_sends(7, [TensorMeta("a.weight", "bfloat16", (2, 3))], 1 << 20)
    data = plan.to_dict()
    assert data == {
        "version": 7,
        "tensors": [["a.weight", "bfloat16", [2, 3]]],
        "buckets": [[0, 1]],
    }
    assert SendPlan.from_dict(data) == plan
    spec = ChannelSpec("127.0.0.1", 1234, 3, "gloo", "x")
    assert ChannelSpec.from_dict(spec.to_dict()) == spec


def test_pack_and_unpack_round_trip_mixed_dtypes():
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3).t(),  # not contiguous
    }
    described = [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    buffer = pack(iter(tensors.values()), described, torch.device("cpu"))
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == bucket_nbytes(described) == 48 + 16 + 48  # b: 10 bytes, padded
    for (name, got), want in zip(unpack(buffer, described), tensors.values(), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    with pytest.raises(ValueError, match="bytes for"):
        list(unpack(buffer[:-16], described))
    with pytest.raises(ValueError, match="a: 48 bytes where the plan has 4"):
        pack([tensors["a"]], [TensorMeta("a", "float32", (1,))], torch.device("cpu"))


def test_hf_names_drop_wrappers_peft_prefix_and_base_layer():
    assert hf_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "model.language_model.layers.0.mlp.up_proj.weight"
    )
    assert hf_name(
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
    ) == ("model.language_model.layers.0.self_attn.q_proj.weight")
    assert hf_name("_fsdp_wrapped_module.lm_head.weight") == "lm_head.weight"


def test_channel_backend_needs_whole_gpus_on_both_sides():
    assert channel_backend(True, 1) == "nccl"
    assert channel_backend(True, 0.5) == "gloo"  # a shared GPU: NCCL refuses 2 ranks on it
    assert channel_backend(False, 1) == "gloo"
    assert channel_backend(True, 0) == "gloo"


def test_merged_lora_stream_is_what_peft_computes():
    """The stream's weights equal peft's own merge, named as the base model's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    described = policy_metas(model, torch.float32)
    streamed = dict(policy_tensors(model, torch.float32))
    assert [m.name for m in described] == list(streamed) == [
        "0.weight", "0.bias", "2.weight", "2.bias",
    ]  # fmt: skip
    merged = {n: p.detach() for n, p in model.merge_and_unload().state_dict().items()}
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, merged[name])
        assert tuple(tensor.shape) == next(m.shape for m in described if m.name == name)


def _receive(spec: ChannelSpec, queue) -> None:
    from mmrad.engine.channel import Channel

    channel = Channel(spec, 1, torch.device("cpu"))
    buffer = torch.empty(16, dtype=torch.uint8)
    channel.broadcast(buffer)
    queue.put(buffer.tolist())
    channel.close()


@pytest.mark.integration
def test_broadcast_between_processes_on_loopback():
    import multiprocessing

    from mmrad.engine.channel import Channel

    host = local_address("127.0.0.1")
    assert host == "127.0.0.1"
    spec = ChannelSpec(host, free_port(host), 2, "gloo", "two-processes", timeout_s=60)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    receiver = context.Process(target=_receive, args=(spec, queue))
    receiver.start()
    channel = Channel(spec, 0, torch.device("cpu"))
    channel.broadcast(torch.arange(16, dtype=torch.uint8))
    assert queue.get(timeout=60) == list(range(16))
    receiver.join(timeout=60)
    channel.close()
    with pytest.raises(ValueError, match="outside channel"):
        Channel(spec, 2, torch.device("cpu"))

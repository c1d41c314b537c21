"""mmrad's reductions take tensors on the process group's device, and the guard that the
SFT and GRPO tests run under refuses any that NCCL would not take (a real gloo group of
one process here)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mmrad.train import collective_guard
from mmrad.train.distributed import all_max, all_mean, all_sum, device_for_backend

# What mmrad's all_sum was before it built its tensor on the group's device: fine on gloo,
# a crash on NCCL. Compiled as if it lived in mmrad, where the guard looks.
CPU_REDUCTION = """
import torch, torch.distributed as dist
def old_all_sum(value):
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())
"""


@pytest.fixture
def guarded_group(tmp_path, monkeypatch):
    monkeypatch.setenv(collective_guard.ENV_FLAG, "1")
    originals = {name: getattr(dist, name) for name in collective_guard.TENSOR_COLLECTIVES}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert collective_guard.install()
    yield
    dist.destroy_process_group()
    for name, collective in originals.items():
        setattr(dist, name, collective)


def test_mmrad_reductions_pass_the_guard(guarded_group):
    assert all_sum(2.5) == 2.5
    assert all_max(-1.0) == -1.0
    assert all_mean({"b": 1.0, "a": 3.0}) == {"a": 3.0, "b": 1.0}


def test_a_cpu_tensor_from_mmrad_code_is_refused(guarded_group):
    namespace: dict = {}
    exec(compile(CPU_REDUCTION, collective_guard.MMRAD_DIR + "train/old.py", "exec"), namespace)
    with pytest.raises(collective_guard.CollectiveOnWrongDevice, match="all_reduce.*NCCL"):
        namespace["old_all_sum"](1.0)


def test_collectives_from_outside_mmrad_are_left_alone(guarded_group):
    tensor = torch.ones(3)  # as FSDP's own calls: their tensors follow the parameters
    dist.all_reduce(tensor)
    assert tensor.tolist() == [1.0, 1.0, 1.0]


def test_without_the_flag_nothing_is_wrapped(monkeypatch):
    monkeypatch.delenv(collective_guard.ENV_FLAG, raising=False)
    before = dist.all_reduce
    assert not collective_guard.install()
    assert dist.all_reduce is before


def test_nccl_groups_reduce_on_this_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # fake: no GPU here
    assert device_for_backend("nccl") == torch.device("cuda", 3)
    assert device_for_backend("gloo") == torch.device("cpu")

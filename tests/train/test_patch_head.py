"""The auxiliary vision objective (``objective.patch_loss``): cell targets from the
records' boxes, a head fed by the vision tower that reaches the vision weights, learns,
and trains under FSDP on 2 real ranks (gloo, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmrad.config import PixelBudget
from mmrad.model.collate import SFTCollator
from mmrad.model.loading import load_processor
from mmrad.task.prompt import PromptVariant
from tests.helpers.spawn import run_ranks
from tests.train.test_building import _nll, job

INPUTS_ONLY = ("labels", "sample_ids", "patch_targets")


def rows() -> list[dict]:
    """A 224 px anomalous query with a reference (a box over cells 1-2 x 0) and a 112 px
    normal query without one, both on their model grid."""
    rng = np.random.default_rng(0)
    image = lambda side: rng.integers(0, 256, (side, side, 3), dtype=np.uint8)  # noqa: E731
    base = {"source": "synthetic", "split": "train", "error": "", "position": 0,
            "reasoning": None, "category": "brick"}  # fmt: skip
    return [
        {**base, "id": "a", "width": 448, "height": 448, "grid_width": 224, "grid_height": 224,
         "is_anomalous": True, "defect_type": "scratch", "boxes": [[60.0, 10.0, 150.0, 50.0]],
         "labels": ["scratch"], "image": image(224), "reference": image(224)},
        {**base, "id": "b", "width": 112, "height": 112, "grid_width": 112, "grid_height": 112,
         "is_anomalous": False, "defect_type": "good", "boxes": [], "labels": [],
         "image": image(112), "reference": None},
    ]  # fmt: skip


def collated(model_path: str) -> dict:
    processor = load_processor(model_path, PixelBudget())
    return SFTCollator(processor, PromptVariant(), patch_targets=True)(rows())


def test_cell_targets_follow_the_images_and_the_boxes(tiny_model):
    batch = collated(tiny_model)
    targets = batch["patch_targets"]
    # one target per merged token: 4 patches of pixel_values each
    assert targets.shape == (batch["pixel_values"].shape[0] // 4,)
    reference, query, normal = targets[:64], targets[64:128], targets[128:]
    assert reference.sum() == 0 and normal.sum() == 0 and normal.numel() == 16
    # [60, 10, 150, 50] on 448 px is grid [30, 5, 75, 25]: columns 1-2 of row 0 of 8 x 8
    assert query.view(8, 8).nonzero().tolist() == [[0, 1], [0, 2]]


def patch_only_grads(model_path: str, lora: bool) -> tuple[torch.nn.Module, float]:
    """A model prepared with the head; the patch loss alone backpropagated."""
    from mmrad.model.hf import load_model
    from mmrad.train.building import prepare_for_training
    from mmrad.train.patch_head import patch_head_of, patch_loss

    model = prepare_for_training(load_model(model_path, "float32"), job(lora=lora), True)
    batch = collated(model_path)
    model(**{k: v for k, v in batch.items() if k not in INPUTS_ONLY})
    loss = patch_loss(patch_head_of(model), batch["patch_targets"])
    loss.backward()
    return model, float(loss)


def test_the_patch_loss_reaches_the_vision_tower_and_the_head_trains_under_lora(tiny_model):
    model, loss = patch_only_grads(tiny_model, lora=False)
    assert 0.3 < loss < 1.5  # a fresh head's BCE is near log 2
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert any("visual.blocks" in name and g.abs().sum() > 0 for name, g in grads.items())
    assert not any("language_model.layers" in name for name in grads)  # vision only
    adapter, _ = patch_only_grads(tiny_model, lora=True)
    trained = {name for name, p in adapter.named_parameters() if p.requires_grad}
    assert {name for name in trained if "mmrad_patch_head" in name} == {
        "base_model.model.mmrad_patch_head.linear.weight",
        "base_model.model.mmrad_patch_head.linear.bias",
    }


def test_a_bf16_model_feeds_its_float32_head(tiny_model):
    from mmrad.model.hf import load_model
    from mmrad.train.building import prepare_for_training
    from mmrad.train.patch_head import patch_head_of, patch_loss

    spec = job(lora=True, dtype="bfloat16")
    model = prepare_for_training(load_model(tiny_model, "bfloat16"), spec, True)
    head, batch = patch_head_of(model), collated(tiny_model)
    assert head.linear.weight.dtype == torch.float32  # trained: a float32 master weight
    model(**{k: v for k, v in batch.items() if k not in INPUTS_ONLY})
    patch_loss(head, batch["patch_targets"]).backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_the_head_learns_which_cells_hold_the_defect(tiny_model):
    from mmrad.model.hf import load_model
    from mmrad.train.building import prepare_for_training
    from mmrad.train.patch_head import patch_head_of, patch_loss

    model = prepare_for_training(load_model(tiny_model, "float32"), job(lora=False), True)
    head, batch = patch_head_of(model), collated(tiny_model)
    inputs = {k: v for k, v in batch.items() if k not in INPUTS_ONLY}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        model(**inputs)
        loss = patch_loss(head, batch["patch_targets"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    defective = batch["patch_targets"] == 1
    assert head.logits[defective].min() > head.logits[~defective].max()


def test_sft_refuses_the_head_under_fsdp1():
    from mmrad.config import ConfigError, SFTJobConfig, load_config

    overrides = ["objective.patch_loss=0.5", "learners.fsdp.version=1"]
    with pytest.raises(ConfigError, match="objective.patch_loss needs learners.fsdp.version 2"):
        load_config(SFTJobConfig, "configs/local/sft.yaml", overrides)
    assert load_config(SFTJobConfig, "configs/local/sft.yaml", overrides[:1]).objective.patch_loss


def moments(optimizer) -> list[torch.Tensor]:
    """This rank's AdamW first moments as plain tensors (FSDP2's are DTensors)."""
    local = [state["exp_avg"] for state in optimizer.state.values()]
    return [getattr(t, "to_local", lambda t=t: t)().clone() for t in local]


def _step_save_restore(rank: int, path: str, folder: str, spec) -> None:
    from mmrad.train.building import build_model
    from mmrad.train.checkpoint import full_model_state, load_checkpoint, save_checkpoint
    from mmrad.train.patch_head import patch_head_of, patch_loss

    def trainer():
        model = build_model(spec, path, torch.device("cpu"), rank, patch_head=True)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-2)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model, optimizer, scheduler = trainer()
    batch = collated(path)
    before = full_model_state(model, on_gpu=False)
    # as the SFT loop does: the answer's NLL plus the patch loss (FSDP1 finishes its
    # backward from the hooks on the root's outputs, so a patch loss alone would not do)
    nll = _nll(model, {k: v for k, v in batch.items() if k not in ("sample_ids", "patch_targets")})
    (nll + patch_loss(patch_head_of(model), batch["patch_targets"])).backward()
    optimizer.step()
    scheduler.step()
    checkpoint = Path(folder, "checkpoint")
    checkpoint.mkdir(exist_ok=True)
    save_checkpoint(checkpoint, model, optimizer, scheduler, 1, {}, rank, spec.lora.enabled)
    restored, restored_optimizer, restored_scheduler = trainer()
    load_checkpoint(checkpoint, restored, restored_optimizer, restored_scheduler, rank,
                    spec.lora.enabled)  # fmt: skip
    states = {
        "before": before,
        "after": full_model_state(model, on_gpu=False),
        "restored": full_model_state(restored, on_gpu=False),
        "moments": moments(optimizer),
        "restored_moments": moments(restored_optimizer),
    }
    torch.save(states, Path(folder, f"rank{rank}.pt"))


@pytest.mark.integration
@pytest.mark.parametrize(
    "spec", [job(lora=False), job(version=1)], ids=["fsdp2-full", "fsdp1-lora"]
)
def test_the_head_is_sharded_trained_and_restored_with_the_model(tiny_model, tmp_path, spec):
    """FSDP1 too: its sharded state leaves the head's small bias out of the rank holding
    none of it, which DCP's strict loading took for an old checkpoint
    (:func:`mmrad.train.checkpoint.load_every_key`). SFT still refuses the head under
    FSDP1: its resumed run does not continue exactly (tests/sft, a step after resuming)."""
    run_ranks(2, _step_save_restore, tiny_model, str(tmp_path), spec)
    for rank in (0, 1):
        states = torch.load(tmp_path / f"rank{rank}.pt")
        head = sorted(k for k in states["after"] if "mmrad_patch_head" in k)
        assert [k.rsplit(".", 2)[-2:] for k in head] == [["linear", "bias"], ["linear", "weight"]]
        for key in head:  # stepped, and restored exactly on every rank
            assert not torch.equal(states["before"][key], states["after"][key]), key
            assert torch.equal(states["restored"][key], states["after"][key]), key
        assert len(states["moments"]) == len(states["restored_moments"])
        for saved, restored in zip(states["moments"], states["restored_moments"], strict=True):
            assert torch.equal(saved, restored)

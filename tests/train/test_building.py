"""The trainer's model on 2 real ranks (gloo, FSDP, no Ray): built from rank 0's copy
alone, trained weights in float32 under bf16 compute, checkpointed activations that give
the same gradients, and a bf16 export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmrad.config import FSDPConfig, LoraConfig
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.integration


def job(*, lora=True, dtype="float32", mixed_precision="none", version=2, checkpointing=False):
    """What the trainer's model building reads of a job config."""
    return SimpleNamespace(
        model=SimpleNamespace(dtype=dtype),
        lora=LoraConfig(enabled=lora),
        schedule=SimpleNamespace(seed=0),
        learners=SimpleNamespace(
            activation_checkpointing=checkpointing, use_gpu=False,
            fsdp=FSDPConfig(version=version, mixed_precision=mixed_precision),
        ),
    )  # fmt: skip


def reference_model(path: str, spec) -> torch.nn.Module:
    """The model one process would build on its own: loaded, seeded LoRA, float32 trained."""
    from mmrad.model.hf import load_model
    from mmrad.model.lora import apply_lora
    from mmrad.train.building import keep_trained_in_float32

    model = load_model(path, spec.model.dtype)
    torch.manual_seed(spec.schedule.seed)
    model = apply_lora(model, spec.lora)
    keep_trained_in_float32(model)
    return model


def _build_and_gather(rank: int, path: str, out: str, spec) -> None:
    from mmrad.train.building import build_model
    from mmrad.train.checkpoint import clean_name, full_model_state

    model = build_model(spec, path, torch.device("cpu"), rank)
    state = full_model_state(model, on_gpu=False)
    buffers = {clean_name(name): b.clone() for name, b in model.named_buffers()}
    if rank == 1:  # the rank that never loaded the checkpoint
        torch.save({"state": state, "buffers": buffers}, out)


@pytest.mark.parametrize(
    "spec",
    [job(), job(version=1), job(lora=False, dtype="bfloat16", mixed_precision="bf16")],
    ids=["fsdp2-lora", "fsdp1-lora", "fsdp2-full-bf16"],
)
def test_a_rank_that_never_loaded_holds_the_loaded_model(tiny_model, tmp_path, spec):
    out = str(tmp_path / "rank1.pt")
    run_ranks(2, _build_and_gather, tiny_model, out, spec)
    got = torch.load(out)
    expected = reference_model(tiny_model, spec)
    state = expected.state_dict()
    assert sorted(got["state"]) == sorted(state)
    for name, tensor in state.items():
        assert got["state"][name].dtype == tensor.dtype, name
        assert torch.equal(got["state"][name], tensor), name
    for name, buffer in expected.named_buffers():  # not in the state dict: broadcast too
        assert torch.equal(got["buffers"][name].cpu(), buffer), name


def _nll(model, batch) -> torch.Tensor:
    from mmrad.train.token_logprobs import LOGP, ScoredTokens, score_tokens

    tokens = ScoredTokens.from_labels(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return -score_tokens(model, inputs, tokens, chunk_tokens=7)[:, LOGP].mean()


def text_batch(vocab: int, rank: int) -> dict:
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(10, vocab - 10, (2, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _bf16_step(rank: int, path: str, out: str) -> None:
    from mmrad.train.building import build_model
    from mmrad.train.checkpoint import full_model_state

    report = {}
    for name, spec in {
        "lora": job(dtype="bfloat16", mixed_precision="bf16"),
        "full": job(lora=False, dtype="bfloat16", mixed_precision="bf16"),
    }.items():
        model = build_model(spec, path, torch.device("cpu"), rank)
        trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
        before = full_model_state(model, on_gpu=False, only_trainable=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        loss = _nll(model, text_batch(model.config.text_config.vocab_size, rank))
        loss.backward()
        optimizer.step()
        after = full_model_state(model, on_gpu=False, only_trainable=True)
        moved = [k for k in after if not torch.equal(after[k], before[k])]
        text_side = [k for k in after if ".visual." not in k]  # the batch has no images
        changed = sum(int((after[k] != before[k]).sum()) for k in moved)
        lost_in_bf16 = sum(  # updates a bf16 weight would not have kept
            int(((after[k] != before[k]) & (after[k].bfloat16() == before[k].bfloat16())).sum())
            for k in moved
        )
        report[name] = {
            "trained_dtypes": sorted({str(d) for d in trained.values()}),
            "frozen_dtypes": sorted({str(d) for d in frozen.values()}),
            "loss": float(loss), "trained": len(text_side), "moved": len(moved),
            "lost_in_bf16_share": lost_in_bf16 / max(changed, 1),
        }  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(report))


def test_bf16_compute_keeps_float32_master_weights_whose_small_updates_survive(
    tiny_model, tmp_path
):
    out = tmp_path / "report.json"
    run_ranks(2, _bf16_step, tiny_model, str(out))
    report = json.loads(out.read_text())
    lora, full = report["lora"], report["full"]
    assert lora["trained_dtypes"] == ["torch.float32"]  # the adapter
    assert lora["frozen_dtypes"] == ["torch.bfloat16"]  # the base, as loaded
    assert full["trained_dtypes"] == ["torch.float32"] and full["frozen_dtypes"] == []
    for run in (lora, full):
        assert torch.isfinite(torch.tensor(run["loss"]))
        assert run["moved"] == run["trained"]  # every trained tensor took the lr-1e-5 step
    # Most of full fine-tuning's updates at lr 1e-5 are below bf16's resolution: a pure
    # bf16 model would have lost them; the float32 masters kept them.
    assert full["lost_in_bf16_share"] > 0.5


def _gradients(rank: int, path: str, out: str, lora: bool) -> None:
    from mmrad.train.building import build_model

    grads = {}
    for checkpointing in (False, True):
        model = build_model(job(lora=lora, checkpointing=checkpointing), path,
                            torch.device("cpu"), rank)  # fmt: skip
        model.train()
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _nll(model, text_batch(model.config.text_config.vocab_size, rank))
        loss.backward()
        state = {
            n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None
        }  # text-only batches: the vision tower gets none
        grads[checkpointing] = {"grads": state, "saved_bytes": sum(saved)}
    if rank == 0:
        torch.save(grads, out)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_saves_less_for_the_same_gradients(tiny_model, tmp_path, lora):
    out = str(tmp_path / "grads.pt")
    run_ranks(2, _gradients, tiny_model, out, lora)
    plain, checkpointed = torch.load(out)[False], torch.load(out)[True]
    # The tiny model's two layers are a small part of what it saves (embeddings, head).
    assert checkpointed["saved_bytes"] < 0.75 * plain["saved_bytes"]
    assert sorted(plain["grads"]) == sorted(checkpointed["grads"])
    assert any(grad.abs().sum() > 0 for grad in plain["grads"].values())
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, msg=name)


def test_a_float32_adapter_over_a_bf16_base_exports_merged_in_bf16(tiny_model, tmp_path):
    from mmrad.config import PixelBudget, PromptConfig
    from mmrad.model.export import export_state_dict
    from mmrad.model.hf import load_model
    from mmrad.storage import Storage
    from mmrad.train.checkpoint import trainable_keys

    spec = job(dtype="bfloat16")
    model = reference_model(tiny_model, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter (B starts at 0)
    adapter = {k: v for k, v in model.state_dict().items() if k in trainable_keys(model)}
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    out = export_state_dict(
        adapter, tiny_model, str(tmp_path / "export"), Storage(), lora=spec.lora,
        merge_lora=True, prompt=PromptConfig(), pixels=PixelBudget(), dtype="bfloat16",
    )  # fmt: skip
    exported = load_model(out, "float32")  # as stored, upcast for comparing
    assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
    # Merged in float32 over the checkpoint's own weights, rounded to bf16 once.
    expected = reference_model(tiny_model, job())
    expected.load_state_dict(adapter, strict=False)
    merged = expected.merge_and_unload().state_dict()
    for name, weight in exported.state_dict().items():
        assert torch.equal(weight, merged[name].bfloat16().float()), name

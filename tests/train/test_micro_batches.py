"""Micro-batches by a token budget, equal in number on every rank, weighted so that a
step over uneven ranks trains on the mean over all their tokens (2 real FSDP2 ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmrad.train.micro_batches import by_token_budget
from tests.helpers.spawn import run_ranks
from tests.train.test_building import job


def test_without_a_budget_micro_batches_are_runs_in_order():
    assert by_token_budget([5, 1, 9, 3, 2], 2, None) == [[0, 1], [2, 3], [4]]


def test_a_budget_packs_by_length_longest_first():
    lengths = [10, 50, 12, 48, 11, 100]
    groups = by_token_budget(lengths, max_samples=3, max_tokens=100)
    assert groups == [[5], [1, 3], [2, 4, 0]]
    for group in groups:  # samples x padded length within the budget, or one sample alone
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 100
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert by_token_budget(lengths, max_samples=1, max_tokens=1000) == [
        [5],
        [1],
        [3],
        [2],
        [4],
        [0],
    ]


LENGTHS = {0: [23, 17, 9], 1: [5, 4]}  # rank 0 has 49 tokens in 3 samples, rank 1 has 9


def sequences(vocab: int) -> dict[int, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return {rank: [torch.randint(10, vocab - 10, (n,), generator=generator) for n in lengths]
            for rank, lengths in LENGTHS.items()}  # fmt: skip


def padded(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = row, row, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def nll(model, batch) -> tuple[torch.Tensor, int]:
    from mmrad.train.token_logprobs import LOGP, ScoredTokens, score_tokens

    tokens = ScoredTokens.from_labels(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return -score_tokens(model, inputs, tokens, chunk_tokens=16)[:, LOGP].sum(), len(tokens)


def _one_step(rank: int, path: str, out: str) -> None:
    from mmrad.train.building import build_model
    from mmrad.train.micro_batches import accumulate_gradients, same_count, step_weights

    model = build_model(job(lora=False), path, torch.device("cpu"), rank)
    rows = sequences(model.config.text_config.vocab_size)[rank]
    groups = by_token_budget([len(r) for r in rows], max_samples=2, max_tokens=36)
    batches = [padded([rows[i] for i in group]) for group in groups]
    units = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    weighted = same_count(batches, step_weights(units), filler=batches[0])
    model.train()
    accumulate_gradients(model, weighted, lambda b: (lambda s, n: s / n)(*nll(model, b)))
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"grads": grads, "micro_batches": len(batches), "run": len(weighted)}, out)


@pytest.mark.integration
def test_uneven_ranks_train_on_the_mean_over_all_their_tokens(tiny_model, tmp_path):
    from mmrad.model.hf import load_model

    out = str(Path(tmp_path) / "grads.pt")
    run_ranks(2, _one_step, tiny_model, out)
    got = torch.load(out)
    assert got["micro_batches"] == 2 and got["run"] == 2  # rank 1 ran a filler
    model = load_model(tiny_model, "float32")
    everything = sequences(model.config.text_config.vocab_size)
    total, count = torch.zeros(()), 0
    for rows in everything.values():  # one pass per sample: no padding at all
        for row in rows:
            loss, n = nll(model, padded([row]))
            total, count = total + loss, count + n
    (total / count).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got["grads"]) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

"""Log-probs a chunk of tokens at a time: the same values and gradients as full logits,
and less memory the smaller the chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mmrad.rl.inputs import MODEL_INPUTS, completion_logprobs
from mmrad.train.token_logprobs import (
    ENTROPY,
    LOGP,
    RAW,
    ScoredTokens,
    score_tokens,
    token_statistics,
)


def test_chunks_give_the_full_logits_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = torch.log_softmax(hidden @ weight.T / 0.7, -1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    expected_entropy = -(full.exp() * full).sum(-1)
    (expected.sum() + expected_entropy.sum()).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    stats = token_statistics(hidden, weight, targets, temperature=0.7, chunk_tokens=8,
                             with_raw=True, with_entropy=True)  # fmt: skip
    torch.testing.assert_close(stats[:, LOGP], expected)
    torch.testing.assert_close(stats[:, ENTROPY], expected_entropy)
    raw = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(stats[:, RAW], raw)
    (stats[:, LOGP].sum() + stats[:, ENTROPY].sum()).backward()
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])


def test_labels_and_spans_pick_the_position_before_each_token():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, 8]])
    tokens = ScoredTokens.from_labels(labels)
    assert list(zip(tokens.rows.tolist(), tokens.positions.tolist(), tokens.targets.tolist(),
                    strict=True)) == [(0, 1, 5), (0, 2, 6), (1, 0, 7), (1, 2, 8)]  # fmt: skip
    ids = torch.tensor([[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 0]])
    tokens, mask = ScoredTokens.from_spans(ids, torch.tensor([3, 2]), torch.tensor([3, 2]))
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert tokens.positions.tolist() == [2, 3, 4, 1, 2]
    assert tokens.targets.tolist() == [3, 4, 0, 2, 3]


def test_the_model_scores_completions_as_its_full_logits_do(tiny_model):
    from mmrad.model.hf import load_model

    model = load_model(tiny_model, "float32")
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab - 10, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "starts": torch.tensor([5, 8]), "lengths": torch.tensor([7, 3])}  # fmt: skip
    with torch.no_grad():
        out = completion_logprobs(model, inputs, temperature=2.0, chunk_tokens=3,
                                  with_raw=True, with_entropy=True)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    tempered, raw = torch.log_softmax(logits / 2.0, -1), torch.log_softmax(logits, -1)
    for row, (start, length) in enumerate([(5, 7), (8, 3)]):
        for j in range(length):
            token = ids[row, start + j]
            assert out.logp[row, j] == pytest.approx(float(tempered[row, start + j - 1, token]))
            assert out.raw[row, j] == pytest.approx(float(raw[row, start + j - 1, token]))
    assert out.mask[1].tolist() == [True] * 3 + [False] * 4
    assert float(out.logp[1, 3:].abs().sum()) == 0.0
    untempered = completion_logprobs(model, inputs, chunk_tokens=3, with_raw=True)
    assert untempered.raw is None and torch.equal(untempered.untempered, untempered.logp)
    assert set(MODEL_INPUTS) >= {"input_ids", "attention_mask"}
    # The model's head is its own again afterwards.
    assert model(input_ids=ids).logits.shape == (2, 12, vocab)


PEAK = """
import json, sys, torch
from mmrad.train.token_logprobs import token_statistics

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

chunk = int(sys.argv[1])
torch.manual_seed(0)
hidden = torch.randn(4096, 64, requires_grad=True)
weight = torch.randn(32000, 64, requires_grad=True)
targets = torch.randint(0, 32000, (4096,))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
before = status_kb("VmRSS")
token_statistics(hidden, weight, targets, chunk_tokens=chunk)[:, 0].sum().backward()
print(json.dumps({"peak_growth_mb": (status_kb("VmHWM") - before) / 1024}))
"""


def peak_growth_mb(chunk: int) -> float:
    """Peak resident memory added by forward and backward, in a fresh process whose
    allocator maps every block over 64 KB on its own and unmaps it when freed, so that
    resident memory follows what is alive (glibc otherwise keeps freed heap). The peak is
    the kernel's VmHWM, reset just before: ``ru_maxrss`` would carry the parent's peak
    over ``exec`` (a pytest process that loaded vLLM)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", PEAK, str(chunk)], capture_output=True,
                          text=True, check=True, env=env)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def test_peak_memory_falls_with_the_chunk_size():
    # 4096 tokens x 32k vocab: 500 MB of float32 logits at once, 8 MB per 64-token chunk.
    whole, chunked = peak_growth_mb(4096), peak_growth_mb(64)
    assert whole > 400
    assert chunked < whole / 4


def test_score_tokens_leaves_no_gradient_graph_without_autograd(tiny_model):
    from mmrad.model.hf import load_model

    model = load_model(tiny_model, "float32")
    ids = torch.randint(10, 100, (1, 6))
    with torch.no_grad():
        stats = score_tokens(model, {"input_ids": ids}, ScoredTokens.from_labels(ids), 4)
    assert stats.shape == (5, 3) and not stats.requires_grad

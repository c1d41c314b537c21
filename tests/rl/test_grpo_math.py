"""GRPO's formulas against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from mmrad.rl.grpo import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    group_advantages,
    kl_penalty,
    logprob_mismatch,
    policy_loss,
    truncated_is_weights,
)

# -- group advantages ------------------------------------------------------------------


def test_std_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 6.0])
    # Group 1: mean 0.5, deviations ±0.5, unbiased variance 4 * 0.25 / 3 = 1/3.
    # Group 2: mean 3, deviations -2, -1, 0, 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3.
    std1, std2 = math.sqrt(1 / 3), math.sqrt(14 / 3)
    expected = [0.5 / std1, -0.5 / std1, -0.5 / std1, 0.5 / std1]
    expected += [-2 / std2, -1 / std2, 0.0, 3 / std2]
    got = group_advantages(rewards, group_size=4)
    assert got.shape == (8,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)  # eps=1e-6 moves the 6th digit
    exact = group_advantages(rewards, group_size=4, eps=0.0)
    assert exact[0].item() == pytest.approx(0.5 * math.sqrt(3), rel=1e-6)


def test_unscaled_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 6.0])
    got = group_advantages(rewards, group_size=4, scale="none")
    assert got.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, -2.0, -1.0, 0.0, 3.0])
    pairs = group_advantages(torch.tensor([3, 1]), group_size=2, scale="none")  # ints work
    assert pairs.dtype.is_floating_point and pairs.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("scale", ["std", "none"])
def test_zero_variance_group_has_zero_advantages(scale):
    # 0.9 three times: the float32 mean is off by an ulp (6e-8), and dividing by the
    # near-zero std would turn that into advantages of about 0.056.
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.0, 1.0, 0.5])
    got = group_advantages(rewards, group_size=3, scale=scale)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert got[3:].abs().sum() > 0


def test_advantages_take_no_gradient():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not group_advantages(rewards, 2).requires_grad


def test_advantage_errors():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="5 rewards are not a whole number of groups of 2"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError, match="unknown advantage scale 'mad'"):
        group_advantages(torch.zeros(4), group_size=2, scale="mad")


# -- aggregation -----------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregations_by_hand():
    # token-mean: (1 + 2 + 4) / 3 tokens.
    assert aggregate(VALUES, MASK, "token-mean").item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: sequence means 1.5 and 4, then their mean.
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(2.75)
    # seq-mean-token-sum-norm: sums 3 and 4 over T = 3, then their mean; or over 2.
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", 2).item() == pytest.approx(1.75)


def test_sequences_without_tokens_do_not_count():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # Only sequence 0 counts: mean 1.5, sum 3 / T = 1 (not divided by 2 sequences).
    assert aggregate(VALUES, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)
    assert aggregate(VALUES, mask, "seq-mean-token-sum-norm").item() == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_all_masked_aggregates_to_zero(aggregation):
    values = torch.full((2, 3), float("nan"), requires_grad=True)
    result = aggregate(values, torch.zeros(2, 3), aggregation)
    assert result.item() == 0.0
    result.backward()
    assert values.grad.abs().sum() == 0


def test_aggregation_errors():
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="shapes differ"):
        aggregate(VALUES, MASK[:, :2])
    with pytest.raises(ValueError, match="norm_length must be positive"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", 0)


# -- policy loss -----------------------------------------------------------------------

# Ratios exp(logp - old_logp) with old_logp = 0; sequence 1's last token is masked.
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
# Per token max(-A r, -A clip(r, 0.8, 1.2)):
#   sequence 0 (A = 1):  r=1.0 → -1;  r=1.5 → max(-1.5, -1.2) = -1.2 (clipped);
#                        r=0.5 → max(-0.5, -0.8) = -0.5 (pessimistic side: not clipped)
#   sequence 1 (A = -2): r=1.1 → 2.2;  r=0.7 → max(1.4, 1.6) = 1.6 (clipped)
TOKEN_LOSSES = [[-1.0, -1.2, -0.5], [2.2, 1.6]]


def inputs(requires_grad: bool = True):
    logp = RATIOS.log().clone().requires_grad_(requires_grad)
    old_logp = torch.zeros(2, 3, requires_grad=requires_grad)
    advantages = ADVANTAGES.clone().requires_grad_(requires_grad)
    return logp, old_logp, advantages


@pytest.mark.parametrize(
    ("aggregation", "norm_length", "expected"),
    [
        ("token-mean", None, (-1.0 - 1.2 - 0.5 + 2.2 + 1.6) / 5),  # 1.1 / 5 = 0.22
        ("seq-mean-token-mean", None, (-2.7 / 3 + 3.8 / 2) / 2),  # (-0.9 + 1.9) / 2 = 0.5
        ("seq-mean-token-sum-norm", None, (-2.7 / 3 + 3.8 / 3) / 2),  # 1.1 / 6
        ("seq-mean-token-sum-norm", 4, (-2.7 / 4 + 3.8 / 4) / 2),  # 1.1 / 8
    ],
    ids=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum-norm-4"],
)
def test_policy_loss_aggregations(aggregation, norm_length, expected):
    logp, old_logp, advantages = inputs()
    loss, _ = policy_loss(
        logp, old_logp, advantages, LOSS_MASK, aggregation=aggregation, norm_length=norm_length
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_policy_loss_metrics():
    logp, old_logp, advantages = inputs()
    _, metrics = policy_loss(logp, old_logp, advantages, LOSS_MASK)
    # low: r < 0.8 with A < 0 (sequence 1's r=0.7); high: r > 1.2 with A > 0 (r=1.5);
    # sequence 0's r=0.5 has A > 0, so its gradient is not clipped and it does not count.
    assert metrics["clip_fraction/low"] == pytest.approx(1 / 5)
    assert metrics["clip_fraction/high"] == pytest.approx(1 / 5)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    # k3(new, old) = exp(old - new) - (old - new) - 1 = 1/r + log r - 1 per token.
    kept = [1.0, 1.5, 0.5, 1.1, 0.7]
    expected_kl = sum(1 / r + math.log(r) - 1 for r in kept) / 5
    assert metrics["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert all(isinstance(value, float) for value in metrics.values())


def test_policy_loss_gradient_flows_through_logp_only():
    logp, old_logp, advantages = inputs()
    loss, _ = policy_loss(logp, old_logp, advantages, LOSS_MASK)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped and masked ones, over 5 tokens:
    # sequence 0: r=1 → -1, r=1.5 clipped → 0, r=0.5 → -0.5; sequence 1: r=1.1 → 2.2.
    expected = torch.tensor([[-1.0, 0.0, -0.5], [2.2, 0.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)
    assert old_logp.grad is None and advantages.grad is None


def test_per_token_advantages_and_is_weights():
    logp, old_logp, _ = inputs(requires_grad=False)
    per_token = ADVANTAGES.unsqueeze(-1).expand(2, 3)
    broadcast, _ = policy_loss(logp, old_logp, ADVANTAGES, LOSS_MASK)
    explicit, _ = policy_loss(logp, old_logp, per_token, LOSS_MASK)
    assert explicit.item() == pytest.approx(broadcast.item())
    weights = torch.tensor([[1.0, 1.0, 2.0], [0.5, 1.0, 9.0]])
    weighted, _ = policy_loss(logp, old_logp, ADVANTAGES, LOSS_MASK, is_weights=weights)
    # (-1 - 1.2 - 0.5 * 2 + 2.2 * 0.5 + 1.6) / 5; the masked token's weight 9 is ignored.
    assert weighted.item() == pytest.approx((-1.0 - 1.2 - 1.0 + 1.1 + 1.6) / 5)


def test_asymmetric_clip():
    logp, old_logp, _ = inputs(requires_grad=False)
    # clip_high 0.6: r=1.5 is inside [0.8, 1.6] now, so its loss is -1.5, not -1.2.
    loss, metrics = policy_loss(logp, old_logp, ADVANTAGES, LOSS_MASK, clip_high=0.6)
    assert loss.item() == pytest.approx((-1.0 - 1.5 - 0.5 + 2.2 + 1.6) / 5)
    assert metrics["clip_fraction/high"] == 0.0


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_all_masked_policy_loss_is_zero(aggregation):
    logp = torch.full((2, 3), -float("inf"), requires_grad=True)  # padding log-probs
    mask = torch.zeros(2, 3)
    loss, metrics = policy_loss(logp, torch.zeros(2, 3), ADVANTAGES, mask, aggregation=aggregation)
    assert loss.item() == 0.0
    assert set(metrics.values()) == {0.0}
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))  # finite: masked -inf never reaches exp


def test_policy_loss_errors():
    logp, old_logp, _ = inputs(requires_grad=False)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old_logp, torch.zeros(3), LOSS_MASK)
    with pytest.raises(ValueError, match="shapes differ"):
        policy_loss(logp, old_logp[:, :2], ADVANTAGES, LOSS_MASK)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old_logp, ADVANTAGES, LOSS_MASK, clip_low=1.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        policy_loss(logp, old_logp, ADVANTAGES, LOSS_MASK, aggregation="mean")


# -- KL penalty ------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]], requires_grad=True)
    log2 = math.log(2.0)
    # k1 = log 0.5 - log 0.25 = log 2;  k2 = 0.5 * (log 2)^2;
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + log 2 - 1.  Equal log-probs: all 0.
    expected = {"k1": log2, "k2": 0.5 * log2**2, "k3": 0.5 + log2 - 1.0}
    assert set(expected) == set(KL_ESTIMATORS)
    for kind, value in expected.items():
        penalty = kl_penalty(logp, ref, kind)
        assert penalty.tolist()[0] == pytest.approx([value, 0.0], abs=1e-7)
        aggregate(penalty, torch.ones(1, 2)).backward()
    assert ref.grad is None and logp.grad is not None
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


# -- train / inference mismatch ---------------------------------------------------------


def test_truncated_is_weights():
    learner = torch.tensor([math.log(0.5), math.log(0.9), math.log(0.1)], requires_grad=True)
    sampling = torch.tensor([math.log(0.25), math.log(0.9), math.log(0.5)])
    # Ratios 0.5/0.25 = 2 (capped at 1.5), 1, 0.1/0.5 = 0.2.
    weights = truncated_is_weights(learner, sampling, cap=1.5)
    assert weights.tolist() == pytest.approx([1.5, 1.0, 0.2])
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap must be positive"):
        truncated_is_weights(learner, sampling, cap=0.0)


def test_logprob_mismatch():
    learner = torch.tensor([[-1.0, -2.0, -3.0]])
    sampling = torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    got = logprob_mismatch(learner, sampling, mask)
    # Differences 0.5 and 0 (the masked 2.0 is ignored); k3(sampler || learner) per token
    # exp(learner - sampling) - (learner - sampling) - 1: exp(0.5) - 1.5 and 0.
    assert got["logprob_mismatch/mean_abs"] == pytest.approx(0.25)
    assert got["logprob_mismatch/max_abs"] == pytest.approx(0.5)
    assert got["logprob_mismatch/kl"] == pytest.approx((math.exp(0.5) - 1.5) / 2)
    empty = logprob_mismatch(learner, sampling, torch.zeros(1, 3))
    assert set(empty.values()) == {0.0}

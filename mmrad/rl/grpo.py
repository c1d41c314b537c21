"""GRPO's formulas, one small named function each, tensors in and tensors out.

Conventions are the ones verl (``core_algos.py``) and TRL (``GRPOTrainer``) share:

- Rollouts come in groups of ``G`` consecutive samples of the same prompt. A sample's
  advantage is its reward minus its group's mean, divided by the group's standard
  deviation (Bessel-corrected) or not (Dr. GRPO's ``"none"``).
- The policy loss is PPO's clipped surrogate per token, with separate low and high clip
  ranges (DAPO's "clip higher"), then reduced over the masked tokens by one of three
  aggregations (:data:`AGGREGATIONS`). A KL penalty to a reference policy is a per-token
  estimator (:data:`KL_ESTIMATORS`) reduced the same way, by :func:`aggregate`.
- Log-probs are per token, ``(B, T)``, with a ``(B, T)`` mask of the completion tokens
  that count. Gradients flow through ``logp`` only; everything else is detached.
- vLLM samples, the learner trains: the two compute slightly different log-probs for the
  same tokens (kernels, precision, batching). :func:`logprob_mismatch` measures the gap;
  :func:`truncated_is_weights` corrects for it (truncated importance sampling, as in
  "Your efficient RL framework secretly brings you off-policy RL training").

Variants live in registries, so configs name them and tests walk them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# -- group advantages ------------------------------------------------------------------


def group_std_normalised(groups: torch.Tensor, eps: float) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` per row of ``groups`` (G samples of one prompt), with
    the unbiased (Bessel-corrected, ``G - 1``) standard deviation: GRPO's advantage."""
    centred = group_centred(groups, eps)
    std = groups.std(dim=1, unbiased=True, keepdim=True)
    return centred / (std + eps)


def group_centred(groups: torch.Tensor, eps: float) -> torch.Tensor:
    """``r - mean`` per row (Dr. GRPO: no division by the std, which favours groups whose
    rewards hardly vary). A row of equal rewards gives exactly 0: the float mean of equal
    values can be off by an ulp, which the std scaling would blow up (to 0.056 for
    three rewards of 0.9 in float32)."""
    centred = groups - groups.mean(dim=1, keepdim=True)
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred)


ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "std": group_std_normalised,
    "none": group_centred,
}


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages ``(N,)`` of rewards ``(N,)`` whose consecutive runs of ``group_size``
    entries are one prompt's group each; ``scale`` names an :data:`ADVANTAGE_SCALES`
    entry. A group whose rewards are all equal gets advantages of exactly 0."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; known: {sorted(ADVANTAGE_SCALES)}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be at least 2 (a group compares samples), got {group_size}"
        )
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"{rewards.shape[0]} rewards are not a whole number of groups of {group_size}"
        )
    values = rewards.detach()
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    groups = values.reshape(-1, group_size)
    return ADVANTAGE_SCALES[scale](groups, eps).reshape(-1)


# -- aggregation -----------------------------------------------------------------------


def token_mean(values: torch.Tensor, mask: torch.Tensor, norm_length: int) -> torch.Tensor:
    """Sum over every masked token of the batch / their count: each token weighs the
    same, so long completions weigh more (DAPO's choice)."""
    return values.sum() / mask.sum().clamp(min=1)


def seq_mean_token_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    norm_length: int,
) -> torch.Tensor:
    """Mean over sequences that have tokens of each sequence's token mean: each
    completion weighs the same whatever its length (the original GRPO)."""
    counts = mask.sum(dim=-1)
    present = counts > 0
    per_sequence = values.sum(dim=-1) / counts.clamp(min=1)
    return (per_sequence * present).sum() / present.sum().clamp(min=1)


def seq_mean_token_sum_norm(
    values: torch.Tensor, mask: torch.Tensor, norm_length: int
) -> torch.Tensor:
    """Mean over sequences that have tokens of each one's token sum / ``norm_length``:
    a constant divisor, so no length bias either way (Dr. GRPO)."""
    present = mask.sum(dim=-1) > 0
    per_sequence = values.sum(dim=-1) / norm_length
    return (per_sequence * present).sum() / present.sum().clamp(min=1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` ``(B, T)`` over ``mask`` ``(B, T)`` to a scalar with the
    :data:`AGGREGATIONS` entry named ``aggregation``; ``norm_length`` (default ``T``) is
    the divisor of ``"seq-mean-token-sum-norm"``. Masked-out entries never reach the
    result, even when they are inf or nan; an all-masked batch gives 0."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {sorted(AGGREGATIONS)}")
    _check_same_shape(values=values, mask=mask)
    if values.ndim != 2:
        raise ValueError(f"values must be (B, T), got shape {tuple(values.shape)}")
    length = values.shape[-1] if norm_length is None else norm_length
    if length <= 0:
        raise ValueError(f"norm_length must be positive, got {norm_length}")
    keep = mask.bool()
    masked = torch.where(keep, values, torch.zeros_like(values))
    return AGGREGATIONS[aggregation](masked, keep.to(values.dtype), length)


# -- policy loss -----------------------------------------------------------------------


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """``exp(logp - old_logp)``: how much more likely the current policy makes a token
    than the policy that the advantages were computed for."""
    return torch.exp(logp - old_logp.detach())


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """PPO's per-token loss ``max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 +
    clip_high))``: the ratio earns no more credit once it has moved past the clip range
    in the direction the advantage pushes it (pessimistic bound)."""
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped policy loss (a scalar to minimise) and its metrics.

    ``logp``, ``old_logp``, ``mask``: ``(B, T)``; ``advantages``: ``(B,)`` (one per
    sequence, broadcast over its tokens) or ``(B, T)``. ``is_weights`` ``(B, T)``
    optionally multiplies each token's loss (the truncated importance-sampling
    correction of :func:`truncated_is_weights`). Gradients flow through ``logp`` only.
    Masked positions are zeroed before any exponential, so padding log-probs of any
    value (``-inf`` included) neither change the loss nor poison its gradient.

    Metrics (floats, over the masked tokens, token-mean whatever the aggregation):
    ``clip_fraction/low`` (ratio below ``1 - clip_low`` with a negative advantage: the
    token's gradient is clipped away), ``clip_fraction/high`` (above ``1 + clip_high``
    with a positive advantage), ``clip_fraction`` (their sum), ``approx_kl`` (k3
    estimate of KL(new || old)).
    """
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if logp.ndim != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    advantages = _per_token(advantages.detach(), logp)
    keep = mask.bool()
    zero = torch.zeros_like(logp)
    logp = torch.where(keep, logp, zero)
    old_logp = torch.where(keep, old_logp.detach(), zero)
    ratio = importance_ratio(logp, old_logp)
    losses = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    if is_weights is not None:
        _check_same_shape(logp=logp, is_weights=is_weights)
        losses = losses * torch.where(keep, is_weights.detach(), zero)
    loss = aggregate(losses, mask, aggregation, norm_length)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (advantages < 0)
        high = (ratio > 1.0 + clip_high) & (advantages > 0)
        metrics = {
            "clip_fraction/low": _masked_mean(low, keep),
            "clip_fraction/high": _masked_mean(high, keep),
            "clip_fraction": _masked_mean(low | high, keep),
            "approx_kl": _masked_mean(kl_k3(logp, old_logp), keep),
        }
    return loss, metrics


# -- KL penalty ------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``logp - ref``: unbiased for KL(policy || ref) on the policy's own samples, but
    high variance and can be negative per token."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``0.5 * (logp - ref)**2``: low variance, biased; its gradient is the true KL's to
    first order."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``: unbiased and never negative (Schulman's
    k3, GRPO's choice)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``(B, T)`` of the policy against the reference; reduce it
    with :func:`aggregate` like the policy loss. Gradients flow through ``logp`` only."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {sorted(KL_ESTIMATORS)}")
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    return KL_ESTIMATORS[kind](logp, ref_logp.detach())


# -- train / inference mismatch ---------------------------------------------------------


def truncated_is_weights(
    learner_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """``min(exp(learner - sampling), cap)`` per token, detached: the importance weight
    that turns samples drawn by the inference engine into samples of the learner's
    policy, truncated at ``cap`` so that a few tokens the engine found unlikely cannot
    dominate the update (truncated importance sampling). Multiply the per-token loss by
    it (``policy_loss(..., is_weights=...)``)."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be positive, got {cap}")
    _check_same_shape(learner_logp=learner_logp, sampling_logp=sampling_logp)
    with torch.no_grad():
        return torch.clamp(torch.exp(learner_logp - sampling_logp), max=cap)


def logprob_mismatch(
    learner_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the learner's log-probs of the sampled tokens are from the inference
    engine's, over the masked tokens (all 0 when none): ``logprob_mismatch/mean_abs``,
    ``logprob_mismatch/max_abs`` and ``logprob_mismatch/kl``, the k3 estimate of
    KL(sampler || learner) (the tokens are the sampler's samples)."""
    _check_same_shape(learner_logp=learner_logp, sampling_logp=sampling_logp, mask=mask)
    keep = mask.bool()
    with torch.no_grad():
        diff = torch.where(keep, learner_logp - sampling_logp, torch.zeros_like(learner_logp))
        return {
            "logprob_mismatch/mean_abs": _masked_mean(diff.abs(), keep),
            "logprob_mismatch/max_abs": float(diff.abs().max()) if keep.any() else 0.0,
            "logprob_mismatch/kl": _masked_mean(kl_k3(sampling_logp, learner_logp), keep),
        }


# -- helpers ---------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    values = torch.where(keep, values.to(torch.float64), torch.zeros((), dtype=torch.float64))
    return float(values.sum() / keep.sum().clamp(min=1))


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Advantages ``(B,)`` broadcast to ``like``'s ``(B, T)``; ``(B, T)`` as is."""
    if advantages.shape == like.shape:
        return advantages
    if advantages.shape == like.shape[:1]:
        return advantages.unsqueeze(-1).expand_as(like)
    raise ValueError(
        f"advantages must be (B,) or (B, T) = {tuple(like.shape)}, "
        f"got shape {tuple(advantages.shape)}"
    )


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}")

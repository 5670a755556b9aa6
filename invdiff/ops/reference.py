"""Plain-PyTorch reference implementations of invdiff's ops.

These are the test oracle, the benchmark baseline and the fallback path. They are written for
clarity and autograd, not speed; every fast backend must match them within the dtype-aware
tolerance of tests/utils.py.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch


def check_ratio(ratio: float) -> None:
    if not ratio > 0:
        raise ValueError(f"guidance ratio r must be > 0, got {ratio}")


def combine_coefficients(ratio: float) -> Tuple[float, float]:
    """(a, b) with combine(eps, g; r) = a*eps + b*g: (1-r, r) for r <= 1, (1, r) for r > 1.

    The fused kernels take these two numbers instead of branching on r per element.
    """
    check_ratio(ratio)
    return (1.0 - ratio, ratio) if ratio <= 1.0 else (1.0, ratio)


def guidance_combine(eps: torch.Tensor, g: torch.Tensor, ratio: float) -> torch.Tensor:
    """eps_tilde = r*g + (1-r)*eps for 0 < r <= 1 (interpolation), eps + r*g for r > 1 (residual).

    eps, g: any matching shape, e.g. (B, C, H, W). Returns the same shape.
    """
    check_ratio(ratio)
    if ratio <= 1.0:
        return ratio * g + (1.0 - ratio) * eps
    return eps + ratio * g


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) x (B, ...) -> (B,) mean squared error per sample, accumulated in fp32 or better."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.to(acc) - target.to(acc)
    return diff.pow(2).flatten(1).mean(1)


def group_risks(losses: torch.Tensor, weights: torch.Tensor):
    """Soft group means R_k = sum_i W_ik l_i / sum_i W_ik.

    losses: (B,), weights: (B, K) non-negative. Returns (R, present): R is (K,) with 0 where a
    group has no weight in the batch, present is the (K,) bool mask of groups that do.
    """
    weights = weights.to(losses.dtype)
    weight_sums = weights.sum(0)
    present = weight_sums > 0
    risks = (weights * losses.unsqueeze(1)).sum(0) / weight_sums.clamp_min(torch.finfo(losses.dtype).tiny)
    return torch.where(present, risks, torch.zeros_like(risks)), present


def invariant_objective(risks: torch.Tensor, present: torch.Tensor, lam: float) -> torch.Tensor:
    """L_e = mean_k R_k + lam * Var_k R_k (unbiased) over the groups present; mean alone if one."""
    r = risks[present]
    if r.numel() <= 1:
        return r.sum()  # one group: its mean risk (sum of one element keeps the graph)
    return r.mean() + lam * r.var(unbiased=True)


class InvariantLossStats(NamedTuple):
    """What one min-step evaluation knows besides L_e, for logging without another pass.

    loss: 0-dim L_e; per_sample: (B,) per-sample MSE; risks: (K,) group risks R_k (0 where a group
    has no weight in the batch); weight_sums: (K,) sum_i W_ik (a group is present where > 0).
    Only `loss` carries gradients.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    risks: torch.Tensor
    weight_sums: torch.Tensor


def check_invariant_loss_args(pred, target, weights, lam, g, ratio) -> None:
    """The argument checks every invariant_loss backend shares, with messages that name the fix."""
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if (g is None) != (ratio is None):
        raise ValueError("pass both g and ratio, or neither")
    if ratio is not None:
        check_ratio(ratio)
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError(f"pred must be (B, ...) with B >= 1, got {tuple(pred.shape)}")
    if target.shape != pred.shape or (g is not None and g.shape != pred.shape):
        shapes = {"pred": tuple(pred.shape), "target": tuple(target.shape)}
        if g is not None:
            shapes["g"] = tuple(g.shape)
        raise ValueError(f"pred, target (and g) must have one shape, got {shapes}")
    if weights.ndim != 2 or weights.shape[0] != pred.shape[0] or weights.shape[1] == 0:
        raise ValueError(f"weights must be (B, K) with B={pred.shape[0]} and K >= 1, got {tuple(weights.shape)}")


def invariant_loss_with_stats(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: torch.Tensor | None = None,
    ratio: float | None = None,
) -> InvariantLossStats:
    """`invariant_loss` plus the per-sample losses and group risks it computed on the way."""
    check_invariant_loss_args(pred, target, weights, lam, g, ratio)
    if g is not None:
        pred = guidance_combine(pred, g, ratio)
    losses = per_sample_mse(pred, target)
    risks, present = group_risks(losses, weights)
    loss = invariant_objective(risks, present, lam)
    weight_sums = weights.to(losses.dtype).sum(0)
    return InvariantLossStats(loss, losses.detach(), risks.detach(), weight_sums.detach())


def invariant_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: torch.Tensor | None = None,
    ratio: float | None = None,
) -> torch.Tensor:
    """The min-step objective L_e for one batch.

    pred: (B, C, H, W) model prediction, or the frozen eps when `g` and `ratio` are given;
    target: (B, C, H, W) the model's training target (noise or v);
    weights: (B, K) the batch's slice of the environment weights (rows need not sum to 1);
    g: optional (B, C, H, W) guidance output, combined with pred by `guidance_combine`.
    Returns a 0-dim fp32 (or fp64) tensor.
    """
    return invariant_loss_with_stats(pred, target, weights, lam, g=g, ratio=ratio).loss


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond). scale: float or (B,) per sample."""
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return uncond + scale * (cond - uncond)

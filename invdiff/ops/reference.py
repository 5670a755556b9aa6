"""Plain-PyTorch reference implementations of invdiff's ops.

These are the test oracle, the benchmark baseline and the fallback path. They are written for
clarity and autograd, not speed; every fast backend must match them within the dtype-aware
tolerance of tests/utils.py.
"""
from __future__ import annotations

import torch


def check_ratio(ratio: float) -> None:
    if not ratio > 0:
        raise ValueError(f"guidance ratio r must be > 0, got {ratio}")


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
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if (g is None) != (ratio is None):
        raise ValueError("pass both g and ratio, or neither")
    if weights.ndim != 2 or weights.shape[0] != pred.shape[0]:
        raise ValueError(f"weights must be (B, K) with B={pred.shape[0]}, got {tuple(weights.shape)}")
    if g is not None:
        pred = guidance_combine(pred, g, ratio)
    losses = per_sample_mse(pred, target)
    risks, present = group_risks(losses, weights)
    return invariant_objective(risks, present, lam)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond). scale: float or (B,) per sample."""
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return uncond + scale * (cond - uncond)

"""Plain-PyTorch reference implementations of invdiff's ops.

These are the test oracle, the benchmark baseline and the fallback path. They are written for
clarity and autograd, not speed; every fast backend must match them within the dtype-aware
tolerance of tests/utils.py.
"""
from __future__ import annotations

import torch

# The contract every backend shares (argument checks, the combine coefficients, the stats tuple,
# the guided step's coefficient layout) lives in a leaf module outside this package; see there.
from ..ops_contract import (  # noqa: F401 (re-exported)
    NUM_COEFFS,
    Col,
    InvariantLossStats,
    check_invariant_loss_args,
    check_ratio,
    combine_coefficients,
)


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
    # Masked sums, not risks[present]: a boolean index has a data-dependent shape, which syncs
    # with the host and breaks a torch.compile graph. Absent groups count as 0 in every sum, and
    # the counts are clamped at 1 so that the branch torch.where drops has a finite gradient.
    zero = torch.zeros_like(risks)
    r = torch.where(present, risks, zero)
    count = present.sum().to(risks.dtype)
    mean = r.sum() / count.clamp_min(1)
    var = torch.where(present, (r - mean).pow(2), zero).sum() / (count - 1).clamp_min(1)
    return torch.where(count > 1, mean + lam * var, mean)  # one group (or none): its mean risk


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


# The model outputs' dtype may be narrower than the sampler state's: an fp32 state (so that the
# sample is not rounded to 16 bits every step) fed by a bf16/fp16 UNet, read as it is. Mirrors
# supported_dtypes() in csrc/guided_step.h.
NARROW_MODEL_DTYPES = {torch.float32: (torch.float16, torch.bfloat16)}


def guided_step_dtypes_supported(state: torch.dtype, model: torch.dtype) -> bool:
    """Whether guided_step takes model outputs in `model` with x/noise/out in `state`."""
    return model == state or model in NARROW_MODEL_DTYPES.get(state, ())


def check_guided_step_args(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise=None, out=None) -> None:
    """The checks every guided_step backend shares, as ValueErrors that name the fix.

    Two dtype groups: the state (x, noise, out) shares x's dtype S; the model outputs (eps_uncond,
    eps_cond, g_uncond, g_cond) share eps_cond's dtype M; M == S, or S = fp32 and M in {bf16, fp16}.
    """
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"guided_step: x must be (B, ...) with B >= 1, got {tuple(x.shape)}")
    state = {"noise": noise, "out": out}
    model = {"eps_uncond": eps_uncond, "g_cond": g_cond, "g_uncond": g_uncond}  # the order csrc checks them in
    for name, t in {"eps_cond": eps_cond, **model, **state}.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"guided_step: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"guided_step: {name} is on {t.device} but x is on {x.device}")
    for name, t in state.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"guided_step: {name} is {t.dtype} but x is {x.dtype}; pass the state (x, noise, out) in one dtype")
    for name, t in model.items():
        if t is not None and t.dtype != eps_cond.dtype:
            raise ValueError(f"guided_step: {name} is {t.dtype} but eps_cond is {eps_cond.dtype}; pass the model outputs "
                             "(eps_uncond, eps_cond, g_uncond, g_cond) in one dtype")
    if not guided_step_dtypes_supported(x.dtype, eps_cond.dtype):
        raise ValueError(f"guided_step: the model outputs are {eps_cond.dtype} but x is {x.dtype}; the model outputs must be "
                         "in x's dtype, or float16/bfloat16 with a float32 x (an fp32 sampler state fed by a 16-bit model)")
    if g_uncond is not None and eps_uncond is None:
        raise ValueError("guided_step: g_uncond was given without eps_uncond (no classifier-free guidance)")
    if eps_uncond is not None and g_cond is not None and g_uncond is None:
        raise ValueError("guided_step: with eps_uncond (CFG) and g_cond, pass g_uncond too: G guides both branches")
    if coeffs.ndim != 2 or coeffs.shape != (x.shape[0], NUM_COEFFS) or coeffs.dtype != torch.float32:
        raise ValueError(
            f"guided_step: coeffs must be a float32 ({x.shape[0]}, {NUM_COEFFS}) table from invdiff.sampling.step_coeffs, "
            f"got {coeffs.dtype} {tuple(coeffs.shape)}"
        )
    if coeffs.device != x.device:
        raise ValueError(f"guided_step: coeffs is on {coeffs.device} but x is on {x.device}")


def guided_step(
    x: torch.Tensor,
    eps_uncond: torch.Tensor | None,
    eps_cond: torch.Tensor,
    g_uncond: torch.Tensor | None,
    g_cond: torch.Tensor | None,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided sampling step from a per-sample coefficient table (invdiff.sampling.step_coeffs).

    x, eps_*, g_*, noise: (B, C, H, W); coeffs: (B, 16) float32. Optional inputs are None:
    no eps_uncond means no classifier-free guidance, no g_* means no guidance module, no noise
    means NOISE_SCALE is ignored; `out` (x's shape and dtype, may be x itself) receives the
    result. eps_* and g_* may be bf16/fp16 with an fp32 x (check_guided_step_args). Math in fp32
    (fp64 for fp64 inputs); returns x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    c = coeffs.to(acc).view(coeffs.shape[0], coeffs.shape[1], *([1] * (x.ndim - 1)))

    def col(name):
        return c[:, Col[name]]

    def branch(eps, g):
        m = col("C_EPS") * eps.to(acc)
        return m if g is None else m + col("C_G") * g.to(acc)

    m = branch(eps_cond, g_cond)
    if eps_uncond is not None:
        m_u = branch(eps_uncond, g_uncond)
        m = m_u + col("CFG_SCALE") * (m - m_u)
    xf = x.to(acc)
    x0 = col("X0_FROM_X") * xf + col("X0_FROM_M") * m
    clip = col("CLIP")
    x0 = torch.where(clip > 0, torch.minimum(torch.maximum(x0, -clip), clip), x0)
    eps = col("EPS_FROM_X") * xf + col("EPS_FROM_M") * m + col("EPS_FROM_X0") * x0
    x_prev = col("PREV_FROM_X0") * x0 + col("PREV_FROM_EPS") * eps + col("PREV_FROM_X") * xf
    if noise is not None:
        x_prev = x_prev + col("NOISE_SCALE") * noise.to(acc)
    if out is not None:
        return out.copy_(x_prev)
    return x_prev.to(x.dtype)

"""Fused min-step objective L_e, forward and backward, as one `torch.autograd.Function`.

    eps_tilde_i = a*pred_i + b*g_i                 (or pred_i alone: ERM, the base model)
    l_i         = ||eps_tilde_i - target_i||^2 / D
    R_k         = sum_i W_ik l_i / sum_i W_ik      over the groups present (sum_i W_ik > 0)
    L_e         = mean_k R_k + lam * Var_k R_k     (unbiased; the mean alone for one group)

The work is memory-bound, so the kernels are built around the bytes:
- forward (`_sq_partial_kernel`, grid (B, splits): rows on grid dimension 0, splits <= 128 on
  dimension 1): reads pred, g and target once and writes one fp32 partial sum of squares per
  (sample, split). The split keeps a small batch of large samples (B=1 at 4x64x64) spread over
  the GPU. A second, one-program launch (`_group_kernel`) does the tiny K-dimensional algebra
  (`_group_body`): it sums the partials into l_i, forms the group sums,
  drops empty groups, and writes L_e together with the per-sample chain-rule coefficient
  c_i = dL_e/dl_i = sum_k W_ik (dL/dR_k) / sum_j W_jk. With TUNING["fuse_group"] on, the last
  program of pass 1 to finish (an atomic ticket on a zeroed int32 counter) does it instead, so the
  forward is one launch (plus the counter's 4-byte fill): same arithmetic in a program of the
  same num_warps (the launch plan's), so bitwise the same results. It is off by default until a
  GPU run has checked its memory ordering.
- backward (`_grad_kernel`, the forward's grid): reads pred, g and target once more, recomputes
  the residual instead of having stored it, and writes
      grad_g = grad_out * c_i * 2 (eps_tilde_i - target_i) / D * b
  (and grad_pred with a, grad_target with -1, only where autograd asks for them).
Traffic for forward + backward with g, in passes over a B x D tensor (plus O(B*K)):
- this design: 3 reads forward, 3 reads + 1 write backward: 7 passes.
- the minimum: 3 reads forward and 1 write (grad_g) backward, 4 passes, is out of reach with
  autograd's separate forward and backward, since the backward needs the residual and c_i needs
  the whole batch's forward. Keeping the residual from the forward reaches 3R + 1W forward and
  1R + 1W backward: 6 passes, at the cost of a B x D tensor held between the two. Not done yet.
Everything accumulates in fp32, and the partials are summed in a fixed order by one program, so
the result is deterministic (the one atomic only elects that program). No op reads a value back
to the host, so a training step can be captured in one CUDA graph.

The plain-PyTorch oracle is invdiff.ops.reference.invariant_loss(_with_stats).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from invdiff.ops_contract import InvariantLossStats, check_invariant_loss_args, combine_coefficients  # not invdiff.ops.*: see there

from . import utils  # launch_device through the module, so that tests can spy on the guard
from .utils import TUNING, as_rows, emulate_bf16_rounding, next_power_of_2, split_plan, store_value


@triton.jit
def _sq_partial_kernel(
    pred_ptr, g_ptr, target_ptr, partial_ptr,
    D, chunk, n_splits, stride_pred, stride_g, stride_target,
    a, b,
    # The group reduction, run by the last program to finish when FUSE_GROUP (see _group_body).
    counter_ptr, weight_ptr,
    loss_ptr, per_sample_ptr, risk_ptr, weight_sum_ptr, group_coeff_ptr, coeff_ptr,
    B, K, stride_wb, stride_wk, inv_D, lam,
    HAS_G: tl.constexpr, BLOCK: tl.constexpr, FUSE_GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, chunk, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = cols < D  # chunk is a multiple of BLOCK, so only the last split runs past D
        p = tl.load(pred_ptr + row * stride_pred + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row * stride_target + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            gg = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            p = a * p + b * gg
        r = p - t
        acc += r * r
    tl.store(partial_ptr + row * n_splits + split, tl.sum(acc, axis=0))
    if FUSE_GROUP:
        # The last program to arrive does the group reduction (the CUDA threadFenceReduction
        # pattern): every thread's stores are issued before the barrier, one thread's acq_rel
        # atomic at GPU scope publishes this program's partial and, in the last program, makes
        # every other program's visible; the barrier after it extends that to all its threads,
        # which then read the partials past L1 (.cg). The counter is zeroed per launch.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if ticket == B * n_splits - 1:
            _group_body(partial_ptr, weight_ptr,
                        loss_ptr, per_sample_ptr, risk_ptr, weight_sum_ptr, group_coeff_ptr, coeff_ptr,
                        B, K, n_splits, stride_wb, stride_wk, inv_D, lam, BLOCK_B, BLOCK_S, BLOCK_K)


@triton.jit
def _group_kernel(
    partial_ptr, weight_ptr,
    loss_ptr, per_sample_ptr, risk_ptr, weight_sum_ptr, group_coeff_ptr, coeff_ptr,
    B, K, n_splits, stride_wb, stride_wk,
    inv_D, lam,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The group reduction as its own one-program launch (TUNING["fuse_group"] off)."""
    _group_body(partial_ptr, weight_ptr,
                loss_ptr, per_sample_ptr, risk_ptr, weight_sum_ptr, group_coeff_ptr, coeff_ptr,
                B, K, n_splits, stride_wb, stride_wk, inv_D, lam, BLOCK_B, BLOCK_S, BLOCK_K)


@triton.jit
def _group_body(
    partial_ptr, weight_ptr,
    loss_ptr, per_sample_ptr, risk_ptr, weight_sum_ptr, group_coeff_ptr, coeff_ptr,
    B, K, n_splits, stride_wb, stride_wk,
    inv_D, lam,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: partials (B, n_splits) -> l_i, the K group risks, L_e and the chain-rule
    coefficients. It sums the partials in a fixed order, so the result is deterministic."""
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    ss = tl.arange(0, BLOCK_S)
    weight_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    weighted_loss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_mask = bs < B
        part = tl.load(partial_ptr + bs[:, None] * n_splits + ss[None, :],
                       mask=b_mask[:, None] & (ss[None, :] < n_splits), other=0.0, cache_modifier=".cg")
        loss_i = tl.sum(part, axis=1) * inv_D
        tl.store(per_sample_ptr + bs, loss_i, mask=b_mask)
        w = tl.load(weight_ptr + bs[:, None] * stride_wb + ks[None, :] * stride_wk,
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        weight_sum += tl.sum(w, axis=0)
        weighted_loss += tl.sum(w * loss_i[:, None], axis=0)

    present = weight_sum > 0.0
    safe_sum = tl.where(present, weight_sum, 1.0)
    risk = tl.where(present, weighted_loss / safe_sum, 0.0)
    n = tl.sum(present.to(tl.float32), axis=0)
    mean = tl.sum(risk, axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(present, risk - mean, 0.0)
    dof = tl.maximum(n - 1.0, 1.0)
    several = n > 1.5
    var = tl.sum(dev * dev, axis=0) / dof
    loss = mean + tl.where(several, lam * var, 0.0)
    # dL/dR_k: 1/n + 2 lam (R_k - mean) / (n - 1); 1 for a single group; 0 for an absent one.
    d_risk = tl.where(present, 1.0 / tl.maximum(n, 1.0) + tl.where(several, 2.0 * lam * dev / dof, 0.0), 0.0)
    group_coeff = d_risk / safe_sum
    tl.store(loss_ptr, loss)
    tl.store(risk_ptr + ks, risk, mask=k_mask)
    tl.store(weight_sum_ptr + ks, weight_sum, mask=k_mask)
    tl.store(group_coeff_ptr + ks, group_coeff, mask=k_mask)

    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_mask = bs < B
        w = tl.load(weight_ptr + bs[:, None] * stride_wb + ks[None, :] * stride_wk,
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        tl.store(coeff_ptr + bs, tl.sum(w * group_coeff[None, :], axis=1), mask=b_mask)


@triton.jit
def _grad_kernel(
    pred_ptr, g_ptr, target_ptr, coeff_ptr, grad_loss_ptr,
    grad_pred_ptr, grad_g_ptr, grad_target_ptr,
    D, chunk, stride_pred, stride_g, stride_target,
    a, b, two_over_D,
    HAS_G: tl.constexpr, WRITE_PRED: tl.constexpr, WRITE_G: tl.constexpr, WRITE_TARGET: tl.constexpr,
    BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk
    # grad_out arrives as a device scalar: reading it here avoids a host sync per step.
    scale = tl.load(coeff_ptr + row) * tl.load(grad_loss_ptr).to(tl.float32) * two_over_D
    for offset in range(0, chunk, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = cols < D
        p = tl.load(pred_ptr + row * stride_pred + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row * stride_target + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            gg = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            p = a * p + b * gg
        d = scale * (p - t)
        if WRITE_PRED:
            tl.store(grad_pred_ptr + row * D + cols, store_value(a * d, grad_pred_ptr, BF16_RTNE), mask=mask)
        if WRITE_G:
            tl.store(grad_g_ptr + row * D + cols, store_value(b * d, grad_g_ptr, BF16_RTNE), mask=mask)
        if WRITE_TARGET:
            tl.store(grad_target_ptr + row * D + cols, store_value(-d, grad_target_ptr, BF16_RTNE), mask=mask)


@torch.library.custom_op("invdiff::invariant_loss_fwd", mutates_args=())
def invariant_loss_fwd(
    pred: torch.Tensor, g: Optional[torch.Tensor], target: torch.Tensor, weights: torch.Tensor,
    lam: float, a: float, b: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss (), per_sample (B,), risks (K,), weight_sums (K,), coeff (B,), group_coeff (K,)),
    all fp32. coeff and group_coeff are dL/dl_i and (dL/dR_k)/sum_i W_ik, kept for the backward."""
    pred_rows, stride_pred = as_rows(pred)
    target_rows, stride_target = as_rows(target)
    g_rows, stride_g = as_rows(g) if g is not None else (pred_rows, stride_pred)
    rows, length = pred_rows.shape
    n_groups = weights.shape[1]
    plan = split_plan(rows, length, pred.device)
    f32 = dict(dtype=torch.float32, device=pred.device)
    partial = torch.empty((rows, plan.splits), **f32)
    loss = torch.empty((), **f32)
    per_sample = torch.empty(rows, **f32)
    coeff = torch.empty(rows, **f32)
    risks, weight_sums, group_coeff = (torch.empty(n_groups, **f32) for _ in range(3))
    block_k = next_power_of_2(n_groups)
    block_s = next_power_of_2(plan.splits)
    block_b = max(1, min(next_power_of_2(rows), TUNING["group_tile"] // max(block_k, block_s)))
    fuse = bool(TUNING["fuse_group"])
    # The last-program ticket. A fresh zeroed counter per call, not a cached self-resetting one,
    # so that concurrent streams and CUDA-graph capture need no special care.
    counter = torch.zeros(1, dtype=torch.int32, device=pred.device) if fuse else partial
    group_outputs = (loss, per_sample, risks, weight_sums, group_coeff, coeff)
    with utils.launch_device(pred):
        # Rows on grid dimension 0, splits (<= min(max_splits, MAX_GRID_DIM)) on dimension 1.
        _sq_partial_kernel[(rows, plan.splits)](
            pred_rows, g_rows, target_rows, partial,
            length, plan.chunk, plan.splits, stride_pred, stride_g, stride_target, float(a), float(b),
            counter, weights, *group_outputs,
            rows, n_groups, weights.stride(0), weights.stride(1), 1.0 / length, float(lam),
            HAS_G=g is not None, BLOCK=plan.block, FUSE_GROUP=fuse,
            BLOCK_B=block_b, BLOCK_S=block_s, BLOCK_K=block_k, num_warps=plan.num_warps,
        )
        if not fuse:
            _group_kernel[(1,)](
                partial, weights, *group_outputs,
                rows, n_groups, plan.splits, weights.stride(0), weights.stride(1), 1.0 / length, float(lam),
                # The plan's num_warps, as the folded reduction runs with in pass 1's program: the
                # tile's reduction order follows the warp count, and the two paths promise
                # bitwise the same results (gpu_correctness.py checks it on a GPU).
                BLOCK_B=block_b, BLOCK_S=block_s, BLOCK_K=block_k, num_warps=plan.num_warps,
            )
    return loss, per_sample, risks, weight_sums, coeff, group_coeff


@invariant_loss_fwd.register_fake
def _(pred, g, target, weights, lam, a, b):
    rows, n_groups = pred.shape[0], weights.shape[1]
    f32 = dict(dtype=torch.float32, device=pred.device)
    return (torch.empty((), **f32), torch.empty(rows, **f32), torch.empty(n_groups, **f32),
            torch.empty(n_groups, **f32), torch.empty(rows, **f32), torch.empty(n_groups, **f32))


@torch.library.custom_op("invdiff::invariant_loss_bwd", mutates_args=())
def invariant_loss_bwd(
    grad_loss: torch.Tensor, pred: torch.Tensor, g: Optional[torch.Tensor], target: torch.Tensor,
    coeff: torch.Tensor, a: float, b: float, need_pred: bool, need_g: bool, need_target: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_pred, grad_g, grad_target), each in its input's dtype and shape; a gradient not asked
    for is an empty tensor and costs no bytes."""
    pred_rows, stride_pred = as_rows(pred)
    target_rows, stride_target = as_rows(target)
    g_rows, stride_g = as_rows(g) if g is not None else (pred_rows, stride_pred)
    rows, length = pred_rows.shape
    plan = split_plan(rows, length, pred.device)

    def grad_like(t, needed):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if needed else t.new_empty(0)

    grad_pred = grad_like(pred, need_pred)
    grad_g = grad_like(g, need_g) if g is not None else pred.new_empty(0)
    grad_target = grad_like(target, need_target)
    write_g = need_g and g is not None
    if need_pred or write_g or need_target:
        grad_loss = grad_loss.to(torch.float32).reshape(())
        with utils.launch_device(pred):
            _grad_kernel[(rows, plan.splits)](  # the forward's (rows, splits) grid
                pred_rows, g_rows, target_rows, coeff, grad_loss,
                grad_pred if need_pred else pred_rows, grad_g if write_g else pred_rows,
                grad_target if need_target else pred_rows,
                length, plan.chunk, stride_pred, stride_g, stride_target, float(a), float(b), 2.0 / length,
                HAS_G=g is not None, WRITE_PRED=need_pred, WRITE_G=write_g, WRITE_TARGET=need_target,
                BF16_RTNE=emulate_bf16_rounding(pred.dtype), BLOCK=plan.block, num_warps=plan.num_warps,
            )
    return grad_pred, grad_g, grad_target


@invariant_loss_bwd.register_fake
def _(grad_loss, pred, g, target, coeff, a, b, need_pred, need_g, need_target):
    def like(t, needed):
        return t.new_empty(t.shape) if (needed and t is not None) else pred.new_empty(0)

    return like(pred, need_pred), like(g, need_g), like(target, need_target)


class InvariantLoss(torch.autograd.Function):
    """L_e and its statistics forward; grad_pred / grad_g / grad_target / grad_weights backward."""

    @staticmethod
    def forward(ctx, pred, g, target, weights, lam: float, a: float, b: float):
        loss, per_sample, risks, weight_sums, coeff, group_coeff = torch.ops.invdiff.invariant_loss_fwd(
            pred, g, target, weights, lam, a, b
        )
        ctx.a, ctx.b = a, b
        ctx.save_for_backward(pred, g, target, coeff, per_sample, risks, group_coeff)
        ctx.mark_non_differentiable(per_sample, risks, weight_sums)
        return loss, per_sample, risks, weight_sums

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        pred, g, target, coeff, per_sample, risks, group_coeff = ctx.saved_tensors
        need_pred, need_g, need_target, need_weights = ctx.needs_input_grad[:4]
        grad_pred, grad_g, grad_target = torch.ops.invdiff.invariant_loss_bwd(
            grad_loss, pred, g, target, coeff, ctx.a, ctx.b, need_pred, need_g and g is not None, need_target
        )
        grad_weights = None
        if need_weights:  # B x K, tiny: dL/dW_ik = (l_i - R_k) (dL/dR_k) / sum_j W_jk
            grad_weights = grad_loss.float() * (per_sample[:, None] - risks[None, :]) * group_coeff[None, :]
        return (
            grad_pred if need_pred else None,
            grad_g if (need_g and g is not None) else None,
            grad_target if need_target else None,
            grad_weights,
            None, None, None,
        )


def invariant_loss_with_stats(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: Optional[torch.Tensor] = None,
    ratio: Optional[float] = None,
) -> InvariantLossStats:
    """Fused L_e with its per-sample losses and group risks. Shapes as invariant_loss."""
    check_invariant_loss_args(pred, target, weights, lam, g, ratio)
    a, b = combine_coefficients(ratio) if g is not None else (1.0, 0.0)
    if not weights.is_floating_point():
        weights = weights.to(torch.float32)
    loss, per_sample, risks, weight_sums = InvariantLoss.apply(pred, g, target, weights, float(lam), a, b)
    return InvariantLossStats(loss, per_sample, risks, weight_sums)


def invariant_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: Optional[torch.Tensor] = None,
    ratio: Optional[float] = None,
) -> torch.Tensor:
    """Fused L_e. pred, target, g: (B, ...) of one dtype; weights: (B, K). Returns a 0-dim fp32."""
    return invariant_loss_with_stats(pred, target, weights, lam, g=g, ratio=ratio).loss

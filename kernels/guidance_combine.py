"""Fused guidance combine, forward and backward, as one `torch.autograd.Function`.

combine(eps, g; r) = a*eps + b*g with (a, b) = (1-r, r) for r <= 1 and (1, r) for r > 1, and the
classifier-free-guidance form uncond + w*(cond - uncond) = (1-w)*uncond + w*cond, with w a float
or one value per sample. Both are the same memory-bound "a*x + b*y" over (B, D) rows: one kernel
reads x and y once and writes the result once; the backward reads grad_out once and writes
grad_x and grad_y in the same pass. Arithmetic is fp32 whatever the storage dtype. The grid is
(rows, programs per row), each program one BLOCK of a row, or several in a loop for rows past
65535 blocks (CUDA's cap on grid dimension 1; utils.row_grid).

The plain-PyTorch oracle is invdiff.ops.reference.guidance_combine / cfg_combine.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from invdiff.ops_contract import combine_coefficients  # not invdiff.ops.*: that package imports this one

from . import utils  # row_grid, launch_device: looked up per call, so that tests can patch them
from .utils import TUNING, as_rows, emulate_bf16_rounding, store_value


@triton.jit
def _row_coefficients(row_weight_ptr, row, a, b, HAS_ROW_WEIGHT: tl.constexpr):
    """(coefficient of x, coefficient of y) for one row: (1 - w_row, w_row) for a per-row CFG
    weight, else the scalars (a, b)."""
    if HAS_ROW_WEIGHT:
        w = tl.load(row_weight_ptr + row).to(tl.float32)
        return 1.0 - w, w
    else:
        return a, b


@triton.jit
def _axpby_fwd_kernel(
    x_ptr, y_ptr, out_ptr, row_weight_ptr,
    D, chunk, stride_x, stride_y,
    a, b,
    HAS_ROW_WEIGHT: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    # Grid (rows, cdiv(D, chunk)); chunk is one BLOCK unless that would put more than
    # MAX_GRID_DIM programs on dimension 1 (utils.row_grid), when each program loops.
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk
    coef_x, coef_y = _row_coefficients(row_weight_ptr, row, a, b, HAS_ROW_WEIGHT)
    for offset in range(0, chunk, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        out = coef_x * x + coef_y * y
        tl.store(out_ptr + row * D + cols, store_value(out, out_ptr, BF16_RTNE), mask=mask)


@triton.jit
def _axpby_bwd_kernel(
    grad_out_ptr, grad_x_ptr, grad_y_ptr, row_weight_ptr,
    D, chunk, stride_go,
    a, b,
    HAS_ROW_WEIGHT: tl.constexpr, WRITE_X: tl.constexpr, WRITE_Y: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk  # as in the forward
    coef_x, coef_y = _row_coefficients(row_weight_ptr, row, a, b, HAS_ROW_WEIGHT)
    for offset in range(0, chunk, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        mask = cols < D
        go = tl.load(grad_out_ptr + row * stride_go + cols, mask=mask, other=0.0).to(tl.float32)
        if WRITE_X:
            tl.store(grad_x_ptr + row * D + cols, store_value(coef_x * go, grad_x_ptr, BF16_RTNE), mask=mask)
        if WRITE_Y:
            tl.store(grad_y_ptr + row * D + cols, store_value(coef_y * go, grad_y_ptr, BF16_RTNE), mask=mask)


def _row_weight_arg(row_weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer even when the branch is compiled out.
    return row_weight.to(torch.float32).contiguous() if row_weight is not None else like


@torch.library.custom_op("invdiff::axpby", mutates_args=())
def axpby(x: torch.Tensor, y: torch.Tensor, a: float, b: float, row_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """a*x + b*y, or (1-w_i)*x_i + w_i*y_i with row_weight w (B,). x, y: (B, ...) -> (B, ...)."""
    x_rows, stride_x = as_rows(x)
    y_rows, stride_y = as_rows(y)
    rows, length = x_rows.shape
    out = torch.empty((rows, length), dtype=x.dtype, device=x.device)
    if out.numel():
        grid, block, chunk = utils.row_grid(rows, length)
        with utils.launch_device(out):
            _axpby_fwd_kernel[grid](
                x_rows, y_rows, out, _row_weight_arg(row_weight, out),
                length, chunk, stride_x, stride_y, float(a), float(b),
                HAS_ROW_WEIGHT=row_weight is not None, BF16_RTNE=emulate_bf16_rounding(out.dtype), BLOCK=block,
                num_warps=TUNING["num_warps"],
            )
    return out.view(x.shape)


@axpby.register_fake
def _(x, y, a, b, row_weight):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("invdiff::axpby_backward", mutates_args=())
def axpby_backward(
    grad_out: torch.Tensor, a: float, b: float, row_weight: Optional[torch.Tensor], need_x: bool, need_y: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a*grad_out, b*grad_out) in one read of grad_out; a gradient not asked for is an empty tensor."""
    go_rows, stride_go = as_rows(grad_out)
    rows, length = go_rows.shape

    def output(needed):
        # A fresh tensor per output, even an empty one: a custom op's outputs must not alias each
        # other, and with only a learned CFG scale asking for a gradient neither is needed.
        shape = grad_out.shape if needed else (0,)
        return torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device)

    grad_x, grad_y = output(need_x), output(need_y)
    if (need_x or need_y) and grad_out.numel():
        grid, block, chunk = utils.row_grid(rows, length)
        with utils.launch_device(grad_out):
            _axpby_bwd_kernel[grid](
                go_rows, grad_x if need_x else go_rows, grad_y if need_y else go_rows, _row_weight_arg(row_weight, go_rows),
                length, chunk, stride_go, float(a), float(b),
                HAS_ROW_WEIGHT=row_weight is not None, WRITE_X=need_x, WRITE_Y=need_y,
                BF16_RTNE=emulate_bf16_rounding(grad_out.dtype), BLOCK=block,
                num_warps=TUNING["num_warps"],
            )
    return grad_x, grad_y


@axpby_backward.register_fake
def _(grad_out, a, b, row_weight, need_x, need_y):
    def like(needed):
        return grad_out.new_empty(grad_out.shape) if needed else grad_out.new_empty(0)

    return like(need_x), like(need_y)


class Axpby(torch.autograd.Function):
    """Forward and backward of a*x + b*y (or the per-row CFG weights) through the fused kernels."""

    @staticmethod
    def forward(ctx, x, y, a: float, b: float, row_weight: Optional[torch.Tensor]):
        ctx.a, ctx.b = a, b
        ctx.save_for_backward(x, y, row_weight)
        return torch.ops.invdiff.axpby(x, y, a, b, row_weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, row_weight = ctx.saved_tensors
        need_x, need_y, _, _, need_w = ctx.needs_input_grad
        grad_x, grad_y = torch.ops.invdiff.axpby_backward(grad_out, ctx.a, ctx.b, row_weight, need_x, need_y)
        grad_w = None
        if need_w:  # rare (a learned CFG scale): d/dw_i of (1-w_i) x_i + w_i y_i
            diff = y.float() - x.float()
            grad_w = (grad_out.float() * diff).flatten(1).sum(1).to(row_weight.dtype)
        return (grad_x if need_x else None), (grad_y if need_y else None), None, None, grad_w


def guidance_combine(eps: torch.Tensor, g: torch.Tensor, ratio: float) -> torch.Tensor:
    """eps_tilde = combine(eps, g; r). eps, g: (B, ...) of one dtype -> (B, ...) in that dtype."""
    a, b = combine_coefficients(ratio)
    return Axpby.apply(eps, g, a, b, None)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + w*(cond - uncond). uncond, cond: (B, ...); scale: a float or a (B,) tensor."""
    if torch.is_tensor(scale) and scale.ndim == 1:
        return Axpby.apply(uncond, cond, 0.0, 0.0, scale)
    w = float(scale)
    return Axpby.apply(uncond, cond, 1.0 - w, w, None)

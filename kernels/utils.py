"""Launch helpers the kernels share: row views, launch plans, device guards, and the interpreter
switch."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import interpreting

# CUDA caps grid dimensions 1 and 2 at 65535 programs (dimension 0 at 2**31 - 1). Every launch
# puts rows on dimension 0 and keeps dimension 1 at or below this; tests lower it to walk the
# looping path on small tensors. Read at launch time, so monkeypatching the module works.
MAX_GRID_DIM = 65535

# Tuning knobs. The defaults are the launch plan; tests lower "block" so that the interpreter
# walks the multi-split, multi-iteration paths on small tensors.
TUNING = {
    # Elements one program touches per loop iteration. 2048 fp32/bf16 elements with 8 warps is
    # 8 elements per thread: wide enough for 16-byte loads in every dtype.
    "block": 2048,
    "num_warps": 8,
    # Programs per SM the split reduction aims for, so a small batch still fills the GPU.
    "programs_per_sm": 4,
    # Programs the interpreter aims for: it runs them one after another, so fewer is faster.
    "interpreter_programs": 1,
    # The invariant loss's group kernel is one program over a (BLOCK_B, max(BLOCK_K, BLOCK_S))
    # tile of weights and partial sums; this bounds the tile.
    "group_tile": 4096,
    # Whether the invariant loss's group reduction runs in the last program of pass 1 (one
    # launch, an atomic ticket) rather than as a second one-program launch. Off until a GPU run
    # has checked it: its memory ordering (barrier, then a GPU-scope acq_rel ticket) is right by
    # reasoning only, and the interpreter runs programs one after another, so it cannot show a
    # race. benchmarks/gpu_check.sh checks and times both settings.
    "fuse_group": False,
    # A cap on the splits of one sample, which bounds the partial-sum buffer and the width of
    # the single-program group kernel's tile.
    "max_splits": 128,
}


def as_rows(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(B, ...) -> a (B, D) tensor whose rows are unit-stride, and its row stride.

    A batch slice such as x[::2] or one half of a CFG-doubled batch is used in place through its
    row stride; only a layout whose rows are not unit-stride (channels-last, a transpose) is
    copied, since the kernels read each row as one contiguous run.
    """
    if t.ndim == 0:
        t = t.reshape(1, 1)
    elif t.ndim == 1:
        t = t.reshape(1, -1)
    rows = t.reshape(t.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def launch_device(where) -> contextlib.AbstractContextManager:
    """The context every kernel launch runs in: `torch.cuda.device(...)` for a CUDA tensor or
    device, a null context otherwise. where: a tensor or a torch.device.

    Triton launches on the *current* CUDA device. Without the guard, tensors on cuda:1 in a
    process whose current device is cuda:0 (no torch.cuda.set_device) would have their kernel run
    on cuda:0 with cuda:1 pointers: an illegal address.
    """
    device = where.device if torch.is_tensor(where) else torch.device(where)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class SplitPlan:
    """How a (B, D) row reduction is cut: `splits` programs per row, each `chunk` elements long
    (a multiple of `block`), launched on a (B, splits) grid: rows on dimension 0 (up to 2**31 - 1),
    splits on dimension 1 (at most min(max_splits, MAX_GRID_DIM))."""

    block: int
    chunk: int
    splits: int
    num_warps: int


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def split_plan(rows: int, length: int, device: torch.device) -> SplitPlan:
    """Enough programs to fill the device, few enough that each streams a long unit-stride run."""
    block = max(16, min(TUNING["block"], next_power_of_2(length)))
    if device.type == "cuda":
        target = TUNING["programs_per_sm"] * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = TUNING["interpreter_programs"]
    most = min(TUNING["max_splits"], MAX_GRID_DIM, -(-length // block))
    splits = max(1, min(most, -(-target // rows)))
    chunk = -(-(-(-length // splits)) // block) * block
    splits = -(-length // chunk)
    assert splits <= MAX_GRID_DIM, (splits, MAX_GRID_DIM)
    # Column offsets are int32 in the kernels (row offsets are int64); the last is splits*chunk - 1.
    if splits * chunk > 2**31:
        raise ValueError(f"rows of {length} elements are past the kernels' int32 column offsets")
    return SplitPlan(block=block, chunk=chunk, splits=splits, num_warps=TUNING["num_warps"])


def row_grid(rows: int, length: int) -> Tuple[Tuple[int, int], int, int]:
    """Launch plan of an elementwise pass over (rows, length): (grid, block, chunk).

    grid = (rows, programs per row). Rows go on dimension 0. Each program covers `chunk`
    elements (a multiple of `block`) in chunk // block loop iterations, and chunk grows past one
    block only when length / block would put more than MAX_GRID_DIM programs on dimension 1
    (length > 65535 * 2048, about 134M elements per row, at the default block).
    """
    block = max(16, min(TUNING["block"], next_power_of_2(length)))
    blocks = -(-length // block)
    per_row = min(blocks, MAX_GRID_DIM)
    chunk = -(-blocks // per_row) * block
    per_row = -(-length // chunk)
    assert rows <= 2**31 - 1 and per_row <= MAX_GRID_DIM, (rows, per_row, MAX_GRID_DIM)
    # Column offsets are int32 in the kernels (row offsets are int64); the last is per_row*chunk - 1.
    if per_row * chunk > 2**31:
        raise ValueError(f"rows of {length} elements are past the kernels' int32 column offsets")
    return (rows, per_row), block, chunk


def emulate_bf16_rounding(dtype: torch.dtype) -> bool:
    """Whether a kernel storing `dtype` must round to bf16 by hand.

    GPUs convert fp32 to bf16 rounding to nearest even. Triton's CPU interpreter (3.8) truncates
    instead, which makes a bf16 result up to one ulp off and fails the tolerance rule against a
    PyTorch reference that rounds. Under the interpreter the kernels therefore round in integer
    arithmetic (`store_value`); compiled kernels keep the hardware conversion.
    """
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def _bf16_round_to_nearest_even(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_value(x, ptr, BF16_RTNE: tl.constexpr):
    """x (fp32) converted to the element type of `ptr`, rounding to nearest even."""
    if BF16_RTNE:
        return _bf16_round_to_nearest_even(x)
    else:
        return x.to(ptr.dtype.element_ty)

"""What every backend of invdiff.ops shares: the argument checks, the combine coefficients, the
invariant loss's stats tuple and the guided step's coefficient layout (mirrored by
csrc/guided_step.h). invdiff.ops.reference re-exports all of it.

A leaf (torch only, nothing of invdiff), kept outside the invdiff.ops package on purpose: the
backends (the Triton kernels of kernels/, the extension loader _ext.py) import it, and importing
any module inside invdiff.ops first runs invdiff/ops/__init__.py, which builds its backend table
from those same backends, an import cycle (tests/test_import_graph.py).
"""
from __future__ import annotations

from enum import IntEnum
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


# The guided step's per-sample coefficient table: one row of NUM_COEFFS float32 per sample.
# invdiff.sampling.step_coeffs fills it from a scheduler; the layout mirrors csrc/guided_step.h.
class Col(IntEnum):
    C_EPS = 0
    C_G = 1
    CFG_SCALE = 2
    X0_FROM_X = 3
    X0_FROM_M = 4
    CLIP = 5
    EPS_FROM_X = 6
    EPS_FROM_M = 7
    EPS_FROM_X0 = 8
    PREV_FROM_X0 = 9
    PREV_FROM_EPS = 10
    PREV_FROM_X = 11
    NOISE_SCALE = 12


NUM_COEFFS = 16  # padded to 64 bytes a row, as in csrc/guided_step.h
